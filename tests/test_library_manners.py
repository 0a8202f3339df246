"""Library manners: nst_lightning.fit shows none of Lightning's start-up chatter unless asked and leaves
Lightning's logger levels and the warning filters as it found them; errors name Python arguments, which the
command line says as its flags."""

from __future__ import annotations

import logging
import warnings

from nst_lightning.api import fit
from nst_lightning.quiet import LIGHTNING_LOGGERS, lightning_quiet


def test_fit_hides_lightnings_start_up_lines_and_restores_the_logger_levels(tiny_config, tmp_path, caplog):
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.setLevel(logging.INFO)  # as Lightning's import leaves it
    filters = list(warnings.filters)
    fit(tiny_config(steps=1, output=tmp_path / "quiet"), progress=False)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert lightning_log.level == logging.INFO and warnings.filters == filters

    fit(tiny_config(steps=1, output=tmp_path / "verbose"), progress=False, verbose=True)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "GPU available" in said and "Tip" in said


def test_known_deprecations_are_hidden_inside_the_block_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with lightning_quiet():
            assert all(logging.getLogger(name).level == logging.WARNING for name in LIGHTNING_LOGGERS)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)
    assert len(seen) == 1


def test_messages_name_python_arguments_and_the_command_line_says_its_flags():
    from nst_lightning.errors import for_cli

    message = 'output runs/x holds a previous run; add resume="last" to continue it, overwrite=True to replace it, ' \
              "or choose another output= directory"
    assert for_cli(message) == (
        "output runs/x holds a previous run; add --resume last to continue it, --overwrite to replace it, "
        "or choose another --output directory"
    )
    assert for_cli("no checkpoint at runs/x/last.ckpt; run without resume= to start it") == (
        "no checkpoint at runs/x/last.ckpt; run without --resume to start it"
    )
    assert for_cli('no checkpoint at a.ckpt; resume from another of the run\'s: resume="runs/x/step-3.ckpt"') == (
        "no checkpoint at a.ckpt; resume from another of the run's: --resume runs/x/step-3.ckpt"
    )
    assert for_cli("add resume=True to finish its unfinished cells") == "add --resume to finish its unfinished cells"
    assert for_cli("--set 'output=runs/x' is not of the form key.sub=value") == "--set 'output=runs/x' is not of the form key.sub=value"


def test_cudnn_benchmark_is_on_for_a_cuda_fit_only_and_restored_after_it_even_when_it_fails():
    from types import SimpleNamespace

    import torch

    from nst_lightning.callbacks import CudnnBenchmark

    def trainer(device: str):
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        callback = CudnnBenchmark()
        callback.setup(trainer("cpu"), None, "fit")
        assert torch.backends.cudnn.benchmark is False
        callback.setup(trainer("cuda:0"), None, "fit")
        assert torch.backends.cudnn.benchmark is True
        callback.teardown(trainer("cuda:0"), None, "fit")
        assert torch.backends.cudnn.benchmark is False
        callback.setup(trainer("cuda:0"), None, "fit")
        callback.on_exception(trainer("cuda:0"), None, RuntimeError("CUDA out of memory"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_importing_the_package_sets_no_warning_filter():
    import subprocess
    import sys

    code = (
        "import warnings, torch, lightning.pytorch, torchvision\n"  # they set filters of their own
        "before = list(warnings.filters)\n"
        "import nst_lightning.module, nst_lightning.data, nst_lightning.runs, nst_lightning.callbacks\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "print(len(added), added)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 "), out


def test_a_users_trainer_fitting_the_module_hears_no_warning_about_what_the_package_does_on_purpose(tmp_path):
    import lightning as L
    import torch

    from nst_lightning.callbacks import StepCheckpoint
    from nst_lightning.module import StyleTransferModule

    content, style = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    module = StyleTransferModule(content, style, loss={"style_layers": ["relu1_1", "relu2_1"]})
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "eval mode" in m or "ModelCheckpoint with manual optimization" in m], said
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
