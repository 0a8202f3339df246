# Two entry points (see README): `make example` installs and stylises the bundled example,
# `make test` installs and runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the pair the project is tested with (a plain `pip install torchvision`
# beside another torch breaks at import).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install example test benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) -e '.[test,onnx,video]'
	touch $@

example: install
	$(VENV)/bin/nst-lightning fit --config configs/example.yaml --overwrite

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
