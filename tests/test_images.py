"""Image loading: every common mode becomes RGB in [0, 1], EXIF is respected, bad files fail clearly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nst_lightning import images
from nst_lightning.errors import ImageError
from nst_lightning.images import load_image, read_image, read_size, save_image, target_shape


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


def _png(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG file written by hand, so headers can claim anything (sizes, 16-bit colour)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("channels", "colour_type"), [(3, 2), (4, 6)], ids=["rgb16", "rgba16"])
def test_sixteen_bit_colour_pngs_load(tmp_path, channels, colour_type):
    pixels = np.full((4, 6, channels), 40000, ">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    path = tmp_path / "c16.png"
    path.write_bytes(_png(6, 4, 16, colour_type, rows))
    t = read_image(path)
    expected = 40000 / 65535 if channels == 3 else 1 - (40000 / 65535) * (1 - 40000 / 65535)  # alpha over white
    assert t.shape == (1, 3, 4, 6) and t.mean().item() == pytest.approx(expected, abs=2 / 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "pt.png"
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255])
    img.paste(1, (0, 4, 8, 8))
    img.save(path, transparency=0)
    t = read_image(path)
    assert torch.allclose(t[0, :, 0, 0], torch.ones(3)) and torch.allclose(t[0, :, 7, 0], torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("side", [20_000, 15_000], ids=["over-twice-the-limit", "just-over-the-limit"])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, 8, 0, b"\x00" * 64))  # a few bytes claiming hundreds of megapixels
    assert path.stat().st_size < 200
    for reader in (read_image, read_size):
        with pytest.raises(ImageError, match="more than 179 megapixels"):
            reader(path)


def test_the_pixel_limit_applies_to_real_images(tmp_path, rgb, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 500)
    with pytest.raises(ImageError, match="megapixels .*; downscale it before use"):
        read_image(rgb)


def test_a_float_rgb_tiff_is_named_as_unsupported(tmp_path):
    # TIFF header, one IFD: 2x2, 3 samples of 32-bit IEEE float (SampleFormat 3), RGB, uncompressed
    w = h = 2
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, 122), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 134), (277, 3, 1, 3), (279, 4, 1, w * h * 12), (339, 3, 3, 128)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, count, value in entries
    ) + b"\x00\x00\x00\x00"
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3)
    path = tmp_path / "hdr.tif"
    path.write_bytes(data + np.ones((h, w, 3), "<f4").tobytes())
    with pytest.raises(ImageError, match="unsupported pixel format such as 32-bit float RGB"):
        read_image(path)


def test_read_size_matches_the_decoded_image_including_exif_rotation(tmp_path, rgb):
    rotated = tmp_path / "rot.jpg"
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(rotated, exif=exif)
    for path in (rgb, rotated):
        assert read_size(path) == tuple(read_image(path).shape[-2:])


def _sample_files() -> dict[str, bytes]:
    pixels = _gradient(12, 10).astype(np.uint8)
    out = {}
    for fmt, mode in [("PNG", "RGB"), ("PNG", "P"), ("PNG", "LA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "CMYK"), ("WEBP", "RGB"), ("PNG", "I;16")]:
        img = Image.fromarray(pixels)
        img = img.convert("L").convert(mode) if mode == "I;16" else img.convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[f"{fmt}-{mode}"] = buf.getvalue()
    return out


SAMPLES = _sample_files()


def _assert_loads_or_refuses(path) -> None:
    try:
        t = read_image(path)
    except ImageError as err:
        assert "\n" not in str(err)
        return
    assert t.dim() == 4 and t.shape[:2] == (1, 3) and min(t.shape[-2:]) >= 2
    assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_image_errors(tmp_path, data):
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    _assert_loads_or_refuses(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_damaged_real_images_load_or_fail_cleanly(tmp_path, kind, edits, cut):
    data = bytearray(SAMPLES[kind])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data) + 1]
    path = tmp_path / "damaged.img"
    path.write_bytes(bytes(data))
    _assert_loads_or_refuses(path)


def test_pillow_filters_resize_8_bit_sources_as_pillow_does(tmp_path):
    from PIL import Image

    from nst_lightning.images import Loading, load_image

    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(path)
    for name, filt in [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR), ("lanczos", Image.LANCZOS)]:
        ours = load_image(path, 25, "height", Loading(resample=name, rounding="floor"))
        theirs = np.asarray(Image.open(path).resize((int(70 * 25 / 40), 25), filt), dtype=np.float32) / 255.0
        assert ours.shape == (1, 3, 25, 43)
        assert torch.equal(ours[0].permute(1, 2, 0), torch.from_numpy(theirs))


def test_short_side_fit_and_truncation_follow_torchvision_resize():
    from nst_lightning.images import target_shape

    assert target_shape(517, 775, 400, "short", "floor") == (400, 599)  # int(400 * 775 / 517) = 599
    assert target_shape(517, 775, 400, "short", "round") == (400, 600)


@pytest.mark.parametrize("fit", ["long", "short", "height", "width"])
@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_the_fitted_side_is_exactly_the_size_and_only_the_other_side_is_rounded(fit, rounding):
    # sides from 20 to 400 px against sizes from 16 to 96: floating-point scales such as
    # 1331 * (400 / 1331) = 399.99999999999994 must not cost the fitted side a pixel
    for height in range(20, 401, 3):
        width = 217
        for size in range(16, 97):
            fits_height = {"long": height >= width, "short": height <= width, "height": True, "width": False}[fit]
            fitted, other = (height, width) if fits_height else (width, height)
            shape = target_shape(height, width, size, fit, rounding)
            got_fitted, got_other = shape if fits_height else shape[::-1]
            assert got_fitted == size, (height, width, size)
            if rounding == "floor":
                assert got_other == max(1, other * size // fitted)
            else:
                assert abs(got_other - other * size / fitted) <= 0.5
    assert target_shape(1331, 1054, 400, "height", "floor") == (400, 316)


def test_stretched_style_takes_the_content_shape(tmp_path):
    from PIL import Image

    from nst_lightning.images import Loading, load_style

    path = tmp_path / "style.png"
    Image.new("RGB", (90, 30), (10, 200, 30)).save(path)
    assert load_style(path, (40, 50), 1.0, Loading(style_fit="stretch")).shape == (1, 3, 40, 50)
    assert load_style(path, (40, 50), 1.0, Loading()).shape == (1, 3, 17, 50)
