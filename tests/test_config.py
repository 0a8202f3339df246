"""The config schema: defaults, YAML files, --set overrides and one-line errors naming the key."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nst_lightning.config import RunConfig, apply_overrides, build_config, dump_config, load_config
from nst_lightning.errors import ConfigError

from .conftest import CONFIGS


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.loss.content_layers == ["relu4_2"]
    assert cfg.loss.style_layers == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert cfg.optim.name == "lbfgs" and cfg.trainer.precision == "auto"
    assert cfg.loss.layer_weights() == [0.2] * 5


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "lightning_cli.yaml")  # that one is LightningCLI's


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_points_at_real_images(path):
    cfg = load_config(path)
    from pathlib import Path

    assert Path(cfg.content).is_file()
    assert all(Path(s).is_file() for s in cfg.styles)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"example.yaml", "gatys2015.yaml", "keras_example.yaml", "lightning_cli.yaml"} <= names


def test_keras_aliases_become_canonical_layers():
    cfg = load_config(CONFIGS / "keras_example.yaml")
    assert cfg.loss.content_layers == ["relu5_2"]
    assert cfg.loss.style_layers == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def test_set_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(
        None,
        [
            "image.size=96",
            "optim.name=adam",
            "optim.lr=0.05",
            "loss.style_weight=1e4",
            "style=[a.jpg, b.jpg]",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.num_nodes=2",
        ],
    )
    assert cfg.image.size == 96 and cfg.optim.name == "adam" and cfg.optim.learning_rate == 0.05
    assert cfg.loss.style_weight == 1e4 and cfg.styles == ["a.jpg", "b.jpg"]
    assert (cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.num_nodes) == (2, "ddp", 2)


def test_a_bare_off_for_features_tile_is_off_though_yaml_reads_it_as_false(tmp_path):
    """`--set features.tile=off`, as the README writes it, was refused as "got False"."""
    assert load_config(None, ["features.tile=off"]).features.tile == "off"
    (tmp_path / "c.yaml").write_text("features:\n  tile: off\n")
    assert load_config(tmp_path / "c.yaml").features.tile == "off"
    assert load_config(None, ["features.tile=auto"]).features.tile == "auto"


def test_yaml_input_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    f = tmp_path / "cfg" / "run.yaml"
    f.write_text("content: ../img/c.jpg\nstyle: [s1.jpg, /abs/s2.jpg]\ninit: noise\n")
    cfg = load_config(f)
    assert cfg.content == str(tmp_path / "img" / "c.jpg")
    assert cfg.styles == [str(tmp_path / "cfg" / "s1.jpg"), "/abs/s2.jpg"]
    assert cfg.init == "noise"


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["image.size=200", "loss.tv_weight=0.5"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["imagee.size=3"], "imagee: unknown key; did you mean 'image'?"),
        (["image.sise=3"], "image.sise: unknown key; did you mean 'size'?"),
        (["image.size=big"], "image.size"),
        (["image.size=4"], "image.size"),
        (["loss.style_weight=-1"], "loss.style_weight"),
        (["trainer.max_steps=-5"], "trainer.max_steps"),
        (["loss.content_layers=[relu9_9]"], "unknown VGG19 layer 'relu9_9'"),
        (["loss.style_layer_weights=[1, 2]"], "one weight per layer"),
        (["trainer.precision=16-mixed"], "16-mixed is not supported"),
        (["optim.name=sgd"], "optim.name"),
        (["features.checkpoint_blocks=7"], "features.checkpoint_blocks: must be auto or a whole number 0..4, got 7"),
        (["features.tile=8"], "features.tile: must be auto, off or a tile side of at least 16 px, got 8"),
        (["style=[]"], "at least one style image"),
        (["image=3"], "image"),
        (["image.size=64", "image.size.x=3"], "image.size is a value, not a section"),
        (["noequals"], "not of the form key.sub=value"),
        (["style=[a.jpg, b.jpg]", "style_blend=[1]"], "style_blend has 1 entries for 2 style image(s)"),
        (["style_blend=[-1]"], "style_blend weights must be >= 0"),
        (["style=[a.jpg, b.jpg]", "image.style_scale=[1, 2, 3]"], "image.style_scale has 3 entries"),
        (["image.style_scale=9"], "style_scale must be in (0, 8]"),
        (["style_masks=[m.png, n.png]"], "style_masks has 2 entries for 1 style"),
        (["color=sepia"], "color"),
        (["scales=[512, 256]"], "scales must be increasing"),
        (["image.size=300", "scales=[128, 256]"], "scales end at 256 but image.size is 300"),
        (["scales=[128, 256]", "scale_steps=[10]"], "scale_steps has 1 entries for 2 scales"),
        (["scale_steps=[10]"], "scale_steps needs scales"),
        (["optim.average=0.99"], "optim.average (iterate averaging) needs optim.name=adam"),
        (["optim.name=adam", "optim.average=1.5"], "optim.average"),
        (["optim.cuda_graph=maybe"], "optim.cuda_graph: must be auto, true or false, got 'maybe'"),
        (["optim.cuda_graph=true", "trainer.accelerator=cpu"], "optim.cuda_graph=true needs a CUDA run"),
        (["optim.cuda_graph=true", "optim.line_search=strong_wolfe"], "cannot capture line_search=strong_wolfe"),
        (["video.fsp=12"], "video.fsp: unknown key; did you mean 'fps'?"),
        (["video.temporal_weight=-1"], "video.temporal_weight"),
        (["video.flow=lucas"], "video.flow"),
        (["video.init=noise"], "video.init"),
        (["video.passes=0"], "video.passes"),
        (["video.every_nth_frame=0"], "video.every_nth_frame"),
        (["video.fps=0"], "video.fps"),
    ],
)
def test_bad_settings_raise_one_line_errors_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_16_mixed_is_refused_whatever_the_optimiser():
    with pytest.raises(ConfigError, match="16-mixed is not supported"):
        load_config(None, ["trainer.precision=16-mixed", "optim.name=adam"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("content: [unclosed\n", "not valid YAML at line"),
        ("- a\n- b\n", "must be a mapping"),
        ("loss:\n  style_weight: lots\n", "loss.style_weight"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, text, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(f)


def test_missing_and_directory_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_overrides_apply_in_order():
    raw = apply_overrides({}, ["image.size=100", "image.size=120"])
    assert RunConfig.model_validate(raw).image.size == 120


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("content: &a [*a]\n", "refers to itself"),
        ("style: &a [x, *a]\n", "refers to itself"),
        ("[" * 3000 + "]" * 3000 + "\n", "nests too deeply"),
        ("loss:\n  style_weight: .inf\n", "loss.style_weight: Input should be a finite number"),
        ("optim:\n  lr: .nan\n", "optim.lr"),
        ('"bad\\nkey": 1\n', "'bad\\nkey': unknown key"),
    ],
    ids=["self-alias", "nested-self-alias", "deep-nesting", "inf-weight", "nan-lr", "newline-key"],
)
def test_hostile_yaml_gets_one_line_config_errors(tmp_path, text, fragment):
    f = tmp_path / "hostile.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _one_line_config_error_or_valid(load) -> None:
    try:
        load()
    except ConfigError as err:
        assert "\n" not in str(err)


TOP = st.sampled_from(["content", "style", "init", "output", "seed", "image", "loss", "optim", "trainer", "features", "bogus"])
NAMES = st.sampled_from(["size", "fit", "style_weight", "style_layers", "content_layers", "lr", "name", "precision",
                         "devices", "max_steps", "weights", "pooling", "x"])
WORDS = st.sampled_from(["1", "-3", "0.5", "1e400", ".inf", ".nan", "null", "true", "relu4_2", "x.jpg", "''",
                         "16-mixed", "lbfgs", "!!binary aGk=", "2001-01-01"])
FLOW = st.recursive(
    st.one_of(st.just("@"), WORDS),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(NAMES, inner), max_size=3).map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    ),
    max_leaves=10,
)


@st.composite
def documents(draw) -> str:
    """Well-formed YAML over the schema's names; one value may carry an anchor, and each ``@`` becomes an
    alias to it when it comes after the anchor (inside the anchored value, a self-reference) or null before."""
    entries = draw(st.lists(st.tuples(TOP, FLOW), max_size=4))
    anchor = draw(st.integers(0, len(entries)))  # len(entries): no anchor
    lines = []
    for index, (key, value) in enumerate(entries):
        if index == anchor:
            value = "&a " + value
        lines.append(f"{key}: {value.replace('@', '*a' if index >= anchor else 'null')}\n")
    return "".join(lines)


JUNK = st.lists(st.sampled_from(list("ab_01.-+ \n\t:,[]{}&*!|>'\"#%@`?~") + ["image", "size", "&a", "*a"]), max_size=60).map("".join)
"""YAML-ish character soup: every kind of syntax error."""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(documents(), JUNK))
def test_random_yaml_text_gives_a_config_or_a_config_error(tmp_path, text):
    f = tmp_path / "fuzz.yaml"
    f.write_text(text, encoding="utf-8")
    _one_line_config_error_or_valid(lambda: load_config(f))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_config_file_give_a_config_error(tmp_path, data):
    f = tmp_path / "fuzz.yaml"
    f.write_bytes(data)
    _one_line_config_error_or_valid(lambda: load_config(f))


KEYS = st.sampled_from(["image", "size", "fit", "loss", "style_weight", "style_layers", "optim", "name", "lr",
                        "trainer", "devices", "precision", "content", "style", "init", "features", "weights", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=8))
TREES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(KEYS, TREES, max_size=5), overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_mappings_and_overrides_give_a_config_or_a_config_error(raw, overrides):
    _one_line_config_error_or_valid(lambda: build_config(apply_overrides(dict(raw), overrides)))


def test_artistic_keys_work_with_set():
    cfg = load_config(
        None,
        ["style=[a.jpg, b.jpg]", "style_blend=[0.7, 0.3]", "image.style_scale=[1, 0.5]", "color=luminance",
         "scales=[128, 256]", "scale_steps=[50, 20]", "optim.name=adam", "optim.average=0.95"],
    )
    assert cfg.style_blend == [0.7, 0.3] and cfg.style_scales() == [1.0, 0.5] and cfg.color == "luminance"
    assert cfg.stages() == [(128, 50), (256, 20)] and cfg.optim.average == 0.95


def test_scales_set_the_output_size_and_default_to_max_steps_each():
    cfg = load_config(None, ["scales=[128, 256]", "trainer.max_steps=40"])
    assert cfg.image.size == 256 and cfg.stages() == [(128, 40), (256, 40)]
    assert load_config(None, ["trainer.max_steps=40"]).stages() == [(512, 40)]


def test_mask_paths_in_a_file_are_relative_to_it(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("style: [a.jpg, b.jpg]\nstyle_masks: [left.png, null]\n")
    assert load_config(f).style_masks == [str(tmp_path / "left.png"), None]


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("image:\n  size: 64\nloss:\n  style_weight: 3\nimage:\n  size: 128\n")
    with pytest.raises(ConfigError, match=r"at line 5, column 1: key 'image' is given twice; keep one"):
        load_config(path)


def test_a_set_value_meant_as_yaml_but_broken_is_refused_not_taken_as_text():
    with pytest.raises(ConfigError, match=r"--set 'style=\[': the value is not valid YAML .*close its brackets"):
        load_config(None, ["style=["])
    assert load_config(None, ["output=runs/a:b"]).output.endswith("runs/a:b")  # plain text stays text
def test_scales_give_the_size_without_changing_the_image_section_they_were_given():
    from nst_lightning.config import ImageConfig, RunConfig

    image = ImageConfig(fit="height")
    config = RunConfig(scales=[64, 128], image=image)
    assert config.image.size == 128 and config.image.fit == "height"
    assert image.size == ImageConfig().size and "size" not in image.model_fields_set
