"""Image loading: every common mode becomes RGB in [0, 1], EXIF is respected, bad files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nst_lightning.errors import ImageError
from nst_lightning.images import load_image, read_image, save_image, target_shape


def _gradient(w: int = 40, h: int = 24) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 64.0)], 2)


@pytest.fixture
def rgb(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(_gradient().astype(np.uint8)).save(path)
    return path


def test_rgb_png_loads_as_unit_range_nchw(rgb):
    t = read_image(rgb)
    assert t.shape == (1, 3, 24, 40) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    assert t[0, 0, 0, -1] == pytest.approx(1.0) and t[0, 2, 5, 5] == pytest.approx(64 / 255)


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tif"])
def test_other_formats_load_close_to_the_source(tmp_path, rgb, suffix):
    path = tmp_path / f"img{suffix}"
    Image.open(rgb).save(path, quality=95) if suffix in (".jpg", ".webp") else Image.open(rgb).save(path)
    assert (read_image(path) - read_image(rgb)).abs().mean() < 0.03


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 128, np.uint8), "L").save(path)
    t = read_image(path)
    assert t.shape == (1, 3, 20, 30) and torch.allclose(t, torch.full_like(t, 128 / 255))


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    path = tmp_path / "g16.png"
    arr = np.full((20, 30), 32768, np.uint16)
    Image.fromarray(arr).save(path)
    t = read_image(path)
    assert t.mean().item() == pytest.approx(32768 / 65535, abs=1e-4)


def test_palette_image_uses_its_colours(tmp_path, rgb):
    path = tmp_path / "p.png"
    Image.open(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    assert (read_image(path) - read_image(rgb)).abs().mean() < 0.03


def test_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "a.png"
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 0] = 255
    arr[:5, :, 3] = 255
    Image.fromarray(arr, "RGBA").save(path)
    t = read_image(path)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(t[0, :, 9, 0], torch.tensor([1.0, 1.0, 1.0]))


def test_cmyk_jpeg_converts_to_rgb(tmp_path, rgb):
    path = tmp_path / "c.jpg"
    Image.open(rgb).convert("CMYK").save(path, quality=95)
    t = read_image(path)
    assert t.shape == (1, 3, 24, 40) and (t - read_image(rgb)).abs().mean() < 0.06


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(path, exif=exif)
    assert read_image(path).shape[-2:] == (40, 20)


@pytest.mark.parametrize(
    ("h", "w", "size", "fit", "expected"),
    [
        (300, 600, 128, "long", (64, 128)),
        (600, 300, 128, "long", (128, 64)),
        (300, 600, 150, "height", (150, 300)),
        (300, 600, 150, "width", (75, 150)),
    ],
)
def test_target_shape_scales_the_named_side(h, w, size, fit, expected):
    assert target_shape(h, w, size, fit) == expected


def test_load_image_resizes_long_side(rgb):
    assert load_image(rgb, 20).shape[-2:] == (12, 20)


def test_save_then_load_round_trips_8bit(tmp_path, rgb):
    t = read_image(rgb)
    out = save_image(t, tmp_path / "sub" / "out.png")
    assert torch.allclose(read_image(out), t, atol=1 / 255 + 1e-6)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_unknown_suffix(tmp_path, rgb):
    with pytest.raises(ImageError, match="unknown image suffix"):
        save_image(read_image(rgb), tmp_path / "out.xyz")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "not an image"),
    ],
    ids=["missing", "directory", "empty", "text", "bad-png"],
)
def test_bad_files_raise_image_errors(tmp_path, make, fragment):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=fragment) as err:
        read_image(path)
    assert "\n" not in str(err.value)


def test_truncated_jpeg_is_reported(tmp_path, rgb):
    full = tmp_path / "full.jpg"
    Image.open(rgb).resize((400, 300)).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(cut)


def test_one_pixel_image_is_refused(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ImageError, match="1x1 pixels"):
        read_image(path)


def test_saved_files_get_ordinary_permissions(tmp_path, rgb):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    out = save_image(read_image(rgb), tmp_path / "perm.png")
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
