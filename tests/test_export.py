"""ONNX: export the extractor, check and validate the graph against onnxruntime, and use it in fit."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import onnx
import pytest
import torch
from onnx import numpy_helper

from nst_lightning import api, export
from nst_lightning.config import load_config
from nst_lightning.errors import ConfigError, OnnxError
from nst_lightning.export import (
    CPU,
    CUDA,
    DEFAULT_RTOL,
    METADATA_KEY,
    ExtractorSpec,
    OnnxFeatures,
    export_onnx,
    sidecar_path,
    validate_onnx,
)
from nst_lightning.features import TORCHVISION, build_extractor
from nst_lightning.images import resize

from .conftest import CONFIGS
from .test_cli import cli, sets

NETWORK_ORDER = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _pristine_extractor):
    """The default config's extractor (caffe weights, relu1_1..relu5_1 and relu4_2), exported once."""
    path = tmp_path_factory.mktemp("export") / "vgg19.onnx"
    info = export_onnx(copy.deepcopy(_pristine_extractor), path, "caffe")
    return path, info


@pytest.fixture(scope="module")
def graph(exported):
    return OnnxFeatures(exported[0])


def tamper(source, target, shape=(256, 128, 3, 3), factor=1.01):
    """Copy a graph with the convolution weights of the given shape (conv3_1 by default) scaled by ``factor``."""
    model = onnx.load(str(source))
    (weight,) = [t for t in model.graph.initializer if tuple(t.dims) == shape]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    onnx.save(model, str(target))
    return target


def test_export_writes_one_fully_checked_opset18_graph_with_named_outputs_and_free_sides(exported):
    path, info = exported
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == [1, 3, "height", "width"]
    assert [o.name for o in model.graph.output] == NETWORK_ORDER
    assert sorted(p.name for p in path.parent.iterdir()) == ["vgg19.onnx", "vgg19.onnx.json"]  # no external data
    assert info.min_side == 16 and info.example_size == (32, 48)


def test_sidecar_and_embedded_metadata_record_weights_preprocessing_layers_and_versions(exported):
    path, _ = exported
    sidecar = json.loads(sidecar_path(path).read_text())
    embedded = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])
    assert sidecar == embedded
    assert sidecar["extractor"]["weights"] == "caffe" and sidecar["extractor"]["pooling"] == "max"
    assert sidecar["extractor"]["layers"] == NETWORK_ORDER
    assert sidecar["extractor"]["preprocessing"] == {
        "name": "caffe", "bgr": True, "scale": 255.0, "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]
    }
    assert sidecar["graph"]["opset"] == 18 and sidecar["graph"]["min_side"] == 16
    assert sidecar["versions"]["torch"] == torch.__version__ and sidecar["versions"]["onnx"] == onnx.__version__


def test_export_never_replaces_a_graph_unless_asked_and_wants_an_onnx_path(exported):
    path = exported[0]
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists; add overwrite=True to replace it"):
        export.export_features(load_config(), path)
    with pytest.raises(ConfigError, match="is not a .onnx file path"):
        export.export_features(load_config(), path.parent)
    assert path.read_bytes() == before
    assert export.default_export_path(load_config()).as_posix() == "export/vgg19_caffe_max_to_relu5_1.onnx"


def test_parity_with_torch_at_sizes_other_than_the_export_size(graph, extractor, content_small, style_small):
    inputs = {
        "content 40x56": resize(content_small, (40, 56)),
        "style 61x37": resize(style_small, (61, 37)),
        "random 17x90": torch.rand(1, 3, 17, 90, generator=torch.Generator().manual_seed(0)),
    }
    report = validate_onnx(graph, extractor, inputs)
    assert report.ok, "\n".join(report.lines())
    assert [e.layer for e in report.layers] == NETWORK_ORDER
    assert all(e.relative < DEFAULT_RTOL / 10 for e in report.layers)
    assert report.providers[-1] == CPU and set(report.providers) <= {CUDA, CPU}


def test_graph_output_is_what_the_loss_reads(graph, extractor, content_small):
    got, ref = graph(content_small), extractor(content_small)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-3 * ref[name].abs().max().item())


def test_tampered_weights_fail_validation_from_the_tampered_layer_down(exported, extractor, content_small, tmp_path):
    tampered = OnnxFeatures(tamper(exported[0], tmp_path / "tampered.onnx"))
    tampered.check_matches(ExtractorSpec.of(extractor, "caffe"))  # its metadata still claims the real weights
    report = validate_onnx(tampered, extractor, {"content": content_small})
    assert not report.ok
    assert [e.layer for e in report.failed] == ["relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    assert all(e.relative > 5e-3 for e in report.failed)


def test_metadata_is_read_from_the_sidecar_when_the_graph_has_none(exported, tmp_path):
    model = onnx.load(str(exported[0]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(OnnxError, match="carries no nst-lightning metadata and has no bare.onnx.json sidecar"):
        OnnxFeatures(bare)
    sidecar_path(bare).write_text(sidecar_path(exported[0]).read_text())
    assert OnnxFeatures(bare).info == exported[1]


def test_every_kind_of_mismatch_is_named(exported):
    theirs = exported[1].extractor
    ours = dataclasses.replace(
        theirs, layers=("relu1_1", "relu2_1"), weights="torchvision", pooling="avg", preprocessing=TORCHVISION
    )
    diffs = theirs.differences(ours)
    assert len(diffs) == 4
    assert "the config needs relu1_1, relu2_1" in diffs[0]
    assert "weights caffe but the config uses torchvision" in diffs[1]
    assert "max pooling but the config uses avg" in diffs[2]
    assert "caffe preprocessing but the config uses torchvision" in diffs[3]
    same_name = dataclasses.replace(theirs, weights_digest="0" * 32)
    assert theirs.differences(same_name) == [
        "the graph has weights caffe but the config uses caffe (same name, other values)"
    ]
    moved_file = dataclasses.replace(theirs, weights="/elsewhere/vgg19.pth")  # same values under another name
    assert theirs.differences(moved_file) == theirs.differences(theirs) == []


def test_fit_refuses_a_graph_exported_for_other_layers_before_writing_anything(tmp_path, tiny_config):
    other = tmp_path / "shallow.onnx"
    export_onnx(build_extractor(["relu1_1", "relu2_1"]), other, "caffe")
    config = tiny_config(**{"features.onnx": other})
    with pytest.raises(OnnxError, match=r"has layers relu1_1, relu2_1 but the config needs relu1_1, .*relu5_1; re-export"):
        api.fit(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_graph_exported_with_replicate_padding_is_accepted_by_a_run_with_that_padding(tmp_path, tiny_config):
    graph = tmp_path / "replicate.onnx"
    export.export_features(tiny_config(**{"features.padding": "replicate"}), graph)
    config = tiny_config(steps=1, **{"features.padding": "replicate", "features.onnx": graph})
    assert api.fit(config, progress=False).final.is_file()


def graph_inputs(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the images every ONNX graph is run on from now on, in order (the graph still runs)."""
    seen: list[tuple[int, ...]] = []
    run_graph = OnnxFeatures.__call__

    def spy(self, image):
        seen.append(tuple(image.shape))
        return run_graph(self, image)

    monkeypatch.setattr(OnnxFeatures, "__call__", spy)
    return seen


def test_fit_validates_the_graph_and_computes_the_targets_with_it(exported, tiny_config, monkeypatch):
    seen = graph_inputs(monkeypatch)
    config = tiny_config(steps=2, **{"features.onnx": exported[0], "features.validate_onnx": "true"})
    outputs = api.fit(config, progress=False)
    assert outputs.final.is_file()
    content, styles = api.load_images(config)
    assert seen == [tuple(content.shape), *(tuple(s.shape) for s in styles)] * 2  # validation, then targets


def test_targets_from_onnxruntime_match_the_torch_targets(exported, tiny_config):
    config = tiny_config(**{"features.onnx": exported[0]})
    content, styles = api.load_images(config)
    with_onnx, with_torch = api.build_module(config, content, styles), api.build_module(config, content, styles)
    export.onnx_targets(config, with_onnx)
    with_torch.prepare_targets()
    def targets(module):
        return {k: v for k, v in module.criteria[0].named_buffers() if k.startswith(("content_", "gram"))}

    from_onnx, from_torch = targets(with_onnx), targets(with_torch)
    assert sorted(from_onnx) == sorted(from_torch) and len(from_torch) == 6  # relu4_2 content, five style Grams
    for name, target in from_torch.items():
        torch.testing.assert_close(from_onnx[name], target, rtol=1e-4, atol=1e-4 * target.abs().max().item())


def test_graph_and_validation_keys_in_the_config(tmp_path):
    (tmp_path / "run.yaml").write_text("features:\n  onnx: graphs/vgg.onnx\n  validate_onnx: true\n")
    assert load_config(tmp_path / "run.yaml").features.onnx == str(tmp_path / "graphs" / "vgg.onnx")
    with pytest.raises(ConfigError, match="features.validate_onnx=true needs features.onnx"):
        load_config(None, ["features.validate_onnx=true"])


def test_a_missing_onnxruntime_names_the_extra_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxError, match=r"needs the 'onnxruntime' package; .*`pip install 'nst-lightning\[onnx\]'`"):
        OnnxFeatures(exported[0])


@pytest.mark.parametrize("command", ["export", "validate-onnx"])
def test_onnx_commands_have_help(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "--config" in r.stdout and "--set" in r.stdout


def test_export_and_validate_onnx_on_the_command_line(exported, tmp_path):
    shallow = sets(["loss.content_layers=[relu2_1]", "loss.style_layers=[relu1_1]", "image.size=40"])
    example = ["--config", str(CONFIGS / "example.yaml"), *shallow]
    path = tmp_path / "g.onnx"
    r = cli("export", *example, "--output", str(path))
    assert r.returncode == 0, r.stderr
    assert f"wrote {path} and g.onnx.json: outputs relu1_1, relu2_1" in r.stdout and "full check passed" in r.stdout


    r = cli("validate-onnx", str(path), *example)
    assert r.returncode == 0, r.stderr
    assert f"providers: {CPU}" in r.stdout and "passed: tolerance 0.001" in r.stdout
    assert "inputs:    content 40x40, style 40x25, random 40x31, content 20x20, style 20x12, random 20x15" in r.stdout
    assert verdicts(r.stdout) == {"relu1_1": "ok", "relu2_1": "ok"}

    tamper(path, path, shape=(64, 64, 3, 3), factor=1.05)  # conv1_2 feeds relu2_1, not relu1_1
    r = cli("validate-onnx", str(path), *example)
    assert r.returncode == 1 and verdicts(r.stdout) == {"relu1_1": "ok", "relu2_1": "FAIL"}
    assert r.stderr.strip().splitlines() == [f"error: {path} disagrees with the torch extractor past rtol 0.001 at relu2_1"]


def verdicts(report: str) -> dict[str, str]:
    """Layer -> ok/FAIL from the per-layer rows of a printed validation report."""
    return {row[0]: row[4] for row in map(str.split, report.splitlines()) if row and row[0].startswith("relu")}


def test_fit_on_the_command_line_refuses_another_config_s_graph_in_one_line(exported, tmp_path):
    overrides = [f"features.onnx={exported[0]}", "features.pooling=avg", "image.size=48"]
    r = cli("fit", "-q", "--output", str(tmp_path / "r"), *sets(overrides))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "the graph has max pooling but the config uses avg" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_a_bf16_multiscale_run_uses_the_graph_in_every_stage(exported, tiny_config):
    """setup() used to cast the shared VGG to bf16 in place: from stage 2 on its weights digest no longer
    matched the graph's, and the run was refused there."""
    config = tiny_config(steps=2, **{"features.onnx": exported[0], "trainer.precision": "bf16-mixed",
                                     "scales": "[32,48]", "scale_steps": "[2,2]", "snapshot.every_n_steps": 0})
    outputs = api.fit(config, progress=False)
    assert outputs.final.is_file() and (outputs.checkpoints / "stage2" / "last.ckpt").is_file()


def test_a_clip_computes_every_frames_targets_with_the_graph_opened_once_and_refuses_a_bad_one_before_writing(
    exported, tiny_config, tmp_path, monkeypatch, caplog
):
    from .test_video import pan, write_clip

    clip = write_clip(tmp_path / "a.mp4", pan(3))
    seen = graph_inputs(monkeypatch)
    config = tiny_config(steps=1, content=clip, **{"features.onnx": exported[0], "features.validate_onnx": "true"})
    with caplog.at_level("INFO", logger="nst_lightning"):
        outputs = api.run(config, progress=False)
    assert len(list(outputs.frames.glob("*.png"))) == 3
    assert sum("onnxruntime providers" in r.getMessage() for r in caplog.records) == 1
    frames = [s for s in seen if s[-2:] == (36, 48)]
    assert len(frames) == 1 + 1 + 3  # validation and the scale on frame 1, then each frame's targets
    bad = tiny_config(
        steps=1, content=clip, output=tmp_path / "bad",
        **{"features.onnx": tamper(exported[0], tmp_path / "tampered.onnx", factor=1.5), "features.validate_onnx": "true"},
    )
    with pytest.raises(OnnxError, match="disagrees with the torch extractor on this run's images"):
        api.run(bad, progress=False)
    assert not (tmp_path / "bad").exists()
