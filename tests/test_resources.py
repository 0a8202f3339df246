"""The memory estimate: its shape, its match with a measured peak, and the early refusal it drives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from nst_lightning import resources
from nst_lightning.api import fit
from nst_lightning.config import DEFAULT_STYLE_LAYERS, EXAMPLE_STYLE, all_layers, load_config
from nst_lightning.errors import ResourceError
from nst_lightning.images import read_size
from nst_lightning.free_memory import available_cpu_memory
from nst_lightning.memory import PRECONDITIONER_COPIES, GiB, TILED_IMAGE_COPIES, activation_bytes, estimate_memory, target_pass_bytes
from nst_lightning.resources import estimate_for, is_out_of_memory, largest_size

LAYERS = [*DEFAULT_STYLE_LAYERS, "relu4_2"]


def _total(size: int, **kw: object) -> int:
    return estimate_memory((size, size), [(size, size)], LAYERS, **kw).total


def test_estimate_grows_with_size_history_and_falls_with_bf16():
    totals = [_total(s) for s in (64, 128, 256, 512, 1024, 2048)]
    assert totals == sorted(totals) and totals[-1] > 12 * totals[-3]  # activations scale with pixels
    assert _total(512, history_size=50) > _total(512, history_size=10)
    assert _total(512, precision="bf16-mixed") < 0.9 * _total(512)
    assert _total(512, optimizer="adam") < _total(512, optimizer="lbfgs", history_size=20)
    shallow = estimate_memory((512, 512), [(512, 512)], ["relu1_1", "relu2_1"], ["relu2_1"]).activations
    assert shallow < estimate_memory((512, 512), [(512, 512)], LAYERS).activations


def test_the_estimate_counts_the_preconditioner_where_the_config_applies_it(tiny_config):
    image = 3 * 400 * 300 * 4
    sources = (600, 800), [(1000, 1000)]
    preconditioned = estimate_for(tiny_config(), *sources, size=400).optimizer
    assert preconditioned - estimate_for(tiny_config(**{"optim.precondition_levels": 0}), *sources, size=400).optimizer \
        == PRECONDITIONER_COPIES * image
    adam = {"optim.name": "adam"}
    assert estimate_for(tiny_config(**adam), *sources, size=400).optimizer == estimate_memory(
        (300, 400), [(400, 400)], LAYERS, optimizer="adam", preconditioned=True).optimizer  # nothing to precondition


def test_checkpointing_more_blocks_lowers_the_estimate_until_the_blocks_run_out():
    held = [
        estimate_memory((2048, 2048), [(2048, 2048)], LAYERS, checkpoint_blocks=n).activations for n in range(5)
    ]
    assert all(a > b for a, b in zip(held, held[1:]))
    assert held[2] < 0.8 * held[0]
    shallow = ["relu1_1", "relu2_1"]  # one pooling layer before relu2_1: only block 1 can be recomputed
    one, four = (estimate_memory((512, 512), [(512, 512)], shallow, shallow, checkpoint_blocks=n) for n in (1, 4))
    assert one.total == four.total


def test_one_style_scale_per_style_image_sizes_each_style(tiny_config):
    cfg = tiny_config(**{"style": f"[{EXAMPLE_STYLE},{EXAMPLE_STYLE}]", "image.style_scale": "[1.0,0.5]"})
    shape, styles = resources.run_shapes(cfg, (600, 800), [(1000, 1000), (1000, 1000)], 400)
    assert shape == (300, 400) and styles == [(400, 400), (200, 200)]
    scaled = estimate_for(cfg, (600, 800), [(1000, 1000), (1000, 1000)], size=400)
    assert scaled.targets == estimate_memory(
        (300, 400), [(400, 400), (200, 200)], all_layers(cfg), cfg.loss.content_layers,
        precision="32-true", source_pixels=1000 * 1000, checkpoint_blocks=4,
    ).targets
    same = tiny_config(**{"style": f"[{EXAMPLE_STYLE},{EXAMPLE_STYLE}]", "image.style_scale": "[1.0,1.0]"})
    full = estimate_for(same, (600, 800), [(1000, 1000), (1000, 1000)], size=400)
    assert full.targets - scaled.targets == 3 * 4 * (400 * 400 - 200 * 200)  # the smaller style's pixels, fp32 RGB


def test_large_sources_and_style_scale_raise_the_peak():
    base = estimate_memory((256, 256), [(256, 256)], LAYERS)
    big_style = estimate_memory((256, 256), [(2048, 2048)], LAYERS)
    huge_source = estimate_memory((256, 256), [(256, 256)], LAYERS, source_pixels=100_000_000)
    assert big_style.total > base.total and huge_source.total > 2 * 1024**3


MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from nst_lightning.images import load_image
    from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE
    from nst_lightning.module import StyleTransferModule
    torch.set_num_threads(1)
    blocks = int(sys.argv[1])
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    content, style = load_image(EXAMPLE_CONTENT, 256), load_image(EXAMPLE_STYLE, 256)
    module = StyleTransferModule(content, style, optim={"history_size": 2}, features={"checkpoint_blocks": blocks})
    module.prepare_targets()
    optimizer = module.configure_optimizers()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
    base = status("VmRSS")
    def closure():
        optimizer.zero_grad()
        loss = module()["loss"]
        loss.backward()
        return loss
    for _ in range(3):  # the L-BFGS history (2 pairs) is full by the third step
        before = module.image.detach().clone()  # the module keeps this copy in a real step
        optimizer.step(closure)
    print(json.dumps({"shape": list(content.shape[-2:]), "peak": status("VmHWM") - base}))
    """
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("blocks", [0, 2])
def test_estimate_is_close_to_the_measured_peak_of_a_step(blocks):
    # big blocks always from mmap, so freed memory leaves the resident size and the peak is the live peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(blocks)], capture_output=True, text=True, check=True, env=env)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    h, w = measured["shape"]
    estimate = estimate_memory((h, w), [(h, w)], LAYERS, history_size=2, checkpoint_blocks=blocks)
    predicted = estimate.activations + estimate.optimizer
    assert 0.85 * measured["peak"] < predicted < 1.3 * measured["peak"], (predicted, measured["peak"])


def test_available_memory_is_read_from_the_system():
    free = available_cpu_memory()
    total = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) * 1024
    assert free is not None and 0 < free <= total


def test_a_run_that_cannot_fit_fails_early_with_the_largest_size_that_would(tiny_config, monkeypatch):
    cfg = tiny_config(**{"image.size": 1024, "trainer.precision": "32-true"})
    sources = (read_size(cfg.content), [read_size(s) for s in cfg.styles])
    available = estimate_for(cfg, *sources, size=300).total + 1
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: available)
    fits = largest_size(cfg, *sources, available)
    assert fits is not None and 300 <= fits < 1024
    assert estimate_for(cfg, *sources, size=fits).total <= available < estimate_for(cfg, *sources, size=fits + 1).total

    with pytest.raises(ResourceError) as err:
        fit(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("image.size=1024 needs about ") and f"set image.size={fits} or lower" in message
    assert "trainer.precision=bf16-mixed" in message and "\n" not in message
    assert not Path(cfg.output).exists()
    smaller = load_config(None, [f"image.size={fits}", "trainer.accelerator=cpu"])
    assert resources.check_fits(smaller, *sources)[1].total <= available


def test_out_of_memory_errors_are_recognised():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


class _SeenBlocks(Callback):
    """Records how many VGG blocks the running module recomputes."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.blocks = pl_module.checkpoint_blocks


def _sources(cfg):
    return read_size(cfg.content), [read_size(s) for s in cfg.styles]


def test_auto_checkpointing_uses_no_blocks_when_memory_is_plentiful(tiny_config):
    cfg = tiny_config(steps=1)
    assert resources.plan_memory(cfg, *_sources(cfg), available=1 << 40)[0] == 0
    seen = _SeenBlocks()
    fit(cfg, progress=False, callbacks=[seen])
    assert seen.blocks == 0


def test_auto_checkpointing_recomputes_the_fewest_blocks_that_make_a_run_fit(tiny_config, monkeypatch):
    cfg = tiny_config(steps=2, **{"image.size": 96, "trainer.precision": "32-true"})
    sources = _sources(cfg)
    totals = [estimate_for(cfg, *sources, checkpoint_blocks=n).total for n in range(5)]
    available = totals[2] + 1  # fits with two blocks recomputed, not with one
    assert totals[1] > available
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: available)
    assert resources.plan_memory(cfg, *sources, available)[0] == 2
    assert "with 2 VGG blocks checkpointed" in resources.summary(cfg, *sources)
    seen = _SeenBlocks()
    fit(cfg, progress=False, callbacks=[seen])
    assert seen.blocks == 2 and (Path(cfg.output) / "final.png").is_file()


def test_a_fixed_checkpoint_setting_is_kept_and_judged_as_set(tiny_config, monkeypatch):
    cfg = tiny_config(steps=1, **{"image.size": 96, "trainer.precision": "32-true", "features.checkpoint_blocks": 0})
    sources = _sources(cfg)
    available = estimate_for(cfg, *sources, checkpoint_blocks=4).total + 1  # auto would fit, 0 blocks does not
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: available)
    with pytest.raises(ResourceError, match="image.size=96 needs about"):
        fit(cfg, progress=False)
    pinned = tiny_config(steps=1, output=Path(cfg.output).with_name("pinned"), **{"features.checkpoint_blocks": 3})
    seen = _SeenBlocks()
    fit(pinned, progress=False, callbacks=[seen])
    assert seen.blocks == 3


def test_the_target_pass_is_planned_in_fp32_whatever_the_run_precision():
    # targets come from the fp32 extractor: under bf16 with blocks recomputed, that pass is the peak
    target_pass = target_pass_bytes(2048, 2048, LAYERS)
    bf16 = estimate_memory((2048, 2048), [(1024, 1024)], LAYERS, precision="bf16-mixed", checkpoint_blocks=4)
    assert bf16.activations == target_pass > activation_bytes(2048, 2048, LAYERS, "bf16-mixed", "max", 4)
    assert target_pass_bytes(2048, 2048, LAYERS) > 1.9 * target_pass_bytes(1448, 1448, LAYERS)


# --- tiled evaluation (features.tile) -------------------------------------------------------------


def test_a_tiled_evaluation_needs_memory_set_by_the_tile_not_the_image():
    image = lambda size: 3 * size * size * 4
    tiled = {s: estimate_memory((s, s), [(256, 256)], LAYERS, tile=512) for s in (2048, 4096)}
    whole = {s: estimate_memory((s, s), [(256, 256)], LAYERS) for s in (2048, 4096)}
    network = {s: tiled[s].activations - TILED_IMAGE_COPIES * image(s) for s in tiled}
    assert network[2048] == network[4096]  # the tile's pass; only the image's own copies grow
    assert whole[4096].activations > 3.5 * whole[2048].activations
    assert tiled[4096].total < 0.6 * whole[4096].total and tiled[4096].tile == 512
    assert "tiled by 512 px" in tiled[4096].describe()


def test_auto_tiling_is_used_only_when_the_whole_image_does_not_fit_and_then_with_the_largest_tile_that_does(tiny_config):
    cfg = tiny_config(**{"image.size": 1024, "trainer.precision": "32-true", "features.tile": "auto"})
    sources = _sources(cfg)
    untiled = estimate_for(cfg, *sources, tile=0).total
    assert resources.plan_memory(cfg, *sources, available=untiled + 1)[1].tile == 0
    tiles = [t for t in resources.tile_choices(cfg, (1024, 1024)) if t]
    totals = {t: estimate_for(cfg, *sources, tile=t).total for t in tiles}
    available = totals[256] + 1
    blocks, plan = resources.plan_memory(cfg, *sources, available=available)
    assert blocks == 0 and plan.tile == 256 and totals[512] > available  # the largest that fits


def test_a_run_too_large_untiled_is_told_to_tile_when_tiles_would_fit(tiny_config, monkeypatch):
    cfg = tiny_config(**{"image.size": 1024, "trainer.precision": "32-true"})
    sources = _sources(cfg)
    available = estimate_for(cfg, *sources, tile=256).total
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: available)
    with pytest.raises(ResourceError, match=r"; set features.tile=auto \(exact tiled evaluation"):
        resources.check_fits(cfg, *sources)


def test_at_print_size_the_lbfgs_history_is_lowered_where_no_tile_fits_and_with_the_cheapest_tile_that_then_does(tiny_config):
    """At 4096 px twenty pairs of L-BFGS history are 8.8 GiB: no tile alone fits 8 GiB."""
    cfg = tiny_config(**{"image.size": 4096, "features.tile": "auto"})
    sources = _sources(cfg)
    need = lambda tile, history: estimate_for(cfg, *sources, tile=tile, history_size=history).total
    assert estimate_for(cfg, *sources).optimizer > 8 * GiB and need(64, 20) > need(512, 5)
    _, plan = resources.plan_memory(cfg, *sources, available=need(512, 5) + 1)
    assert (plan.tile, plan.history_size) == (512, 5)  # the 512 px tile's halo costs far less than a 64 px one's
    _, plan = resources.plan_memory(cfg, *sources, available=need(1024, 10) + 1)
    assert (plan.tile, plan.history_size) == (1024, 10)  # half the history kept with the largest tile that allows it
    assert resources.plan_memory(cfg, *sources, available=need(64, resources.MIN_HISTORY) - 1)[1].history_size == 20
    adam = tiny_config(**{"image.size": 4096, "features.tile": "auto", "optim.name": "adam"})
    assert resources.plan_memory(adam, *sources, available=need(512, 5) + 1)[1].history_size == 0


def test_fit_runs_with_the_lowered_history_says_so_and_estimate_shows_it(tiny_config, monkeypatch, caplog):
    from dataclasses import replace

    from .test_cli import invoke, sets

    cfg = tiny_config(steps=2, **{"image.size": 96})
    real = resources.estimate_for

    def a_huge_history(*args, **kw):  # as if each of the image's copies were print-size
        estimate = real(*args, **kw)
        return replace(estimate, optimizer=estimate.optimizer * 10_000)

    monkeypatch.setattr(resources, "estimate_for", a_huge_history)
    available = a_huge_history(cfg, *_sources(cfg), checkpoint_blocks=0, history_size=8).total + 1
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: available)
    seen = _SeenHistory()
    with caplog.at_level("WARNING"):
        fit(cfg, progress=False, callbacks=[seen])
    assert seen.history == 8 and (Path(cfg.output) / "final.png").is_file()
    assert "optim.history_size lowered from 20 to 8 so the L-BFGS history fits" in caplog.text
    r = invoke("estimate", *sets([f"content={cfg.content}", "image.size=96", "trainer.accelerator=cpu", "trainer.precision=32-true"]))
    assert r.exit_code == 0 and "lbfgs (history 20, lowered to 8 to fit)" in r.stdout, r.output
    assert "largest image.size that fits with history 20: " in r.stdout  # as configured, without the lowering


class _SeenHistory(Callback):
    """Records the L-BFGS history the running optimiser keeps."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.history = trainer.optimizers[0].param_groups[0]["history_size"]


def test_fit_tiles_a_run_the_memory_plan_says_does_not_fit_whole(tiny_config, monkeypatch):
    from dataclasses import replace

    cfg = tiny_config(steps=1, **{"image.size": 96, "trainer.precision": "32-true", "features.tile": "auto"})
    real = resources.estimate_for

    def whole_images_are_huge(*args, tile=None, **kw):  # as if the image were too large to evaluate at once
        estimate = real(*args, tile=tile, **kw)
        return replace(estimate, activations=estimate.activations * 1000) if estimate.tile == 0 else estimate

    monkeypatch.setattr(resources, "estimate_for", whole_images_are_huge)
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: real(cfg, *_sources(cfg), tile=64).total + 1)
    seen = _SeenTile()
    fit(cfg, progress=False, callbacks=[seen])
    assert seen.tile == 64 and (Path(cfg.output) / "final.png").is_file()


class _SeenTile(Callback):
    """Records the tile side the running module evaluates with."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.tile = pl_module.tile


def test_the_w2_style_loss_is_never_tiled_a_set_tile_is_refused_and_auto_stays_whole(tiny_config, monkeypatch):
    from nst_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="features.tile=64 cannot evaluate loss.style_loss=w2 by tiles"):
        tiny_config(**{"features.tile": 64, "loss.style_loss": "w2"})
    cfg = tiny_config(**{"image.size": 1024, "trainer.precision": "32-true", "features.tile": "auto",
                         "loss.style_loss": "w2"})
    assert resources.tile_choices(cfg, (1024, 1024)) == [0]
    sources = _sources(cfg)
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: estimate_for(cfg, *sources, tile=256).total)
    with pytest.raises(ResourceError) as refused:  # tiles would fit a Gram loss, but w2 is not told to tile
        resources.check_fits(cfg, *sources)
    assert "features.tile" not in str(refused.value)
