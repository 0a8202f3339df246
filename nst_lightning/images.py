"""Image files in and out: load any common format as an RGB float tensor, resize, save atomically.

Tensors are ``(1, 3, H, W)`` float32 RGB in ``[0, 1]``; preprocessing for the network lives in features.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .atomic import replace_atomically
from .errors import ImageError

MAX_PIXELS = 178_956_970
"""Largest source image accepted (Pillow's own decompression-bomb limit): about 179 megapixels."""

SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


def _open(path: Path, decode: bool = True) -> Image.Image:
    """Open ``path`` with one-line errors for every way a file can fail; ``decode=False`` reads the header only."""
    if not path.exists():
        raise ImageError(f"image {path} does not exist; check the path")
    if path.is_dir():
        raise ImageError(f"image path {path} is a directory; give an image file")
    if not path.is_file():
        raise ImageError(f"image path {path} is not a regular file (a FIFO, socket or device?); give an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image {path} is an empty file; give a real image")
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd metadata; real problems raise below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if decode:
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image {path} has more than {MAX_PIXELS / 1e6:.0f} megapixels (or claims to); downscale it before use"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{path} is not an image Pillow can read (unknown format, or an unsupported pixel format such as "
            "32-bit float RGB); give or convert to a JPEG, PNG, WebP, TIFF or BMP"
        ) from None
    except PermissionError:
        raise ImageError(f"cannot read image {path}: permission denied; fix its permissions") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path} is truncated or corrupt ({err}); re-export or replace the file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    return img


def read_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The ``(H, W)`` that ``read_image`` will return (EXIF rotation applied), from the header only.

    Lets a run check sizes and memory before decoding anything; refuses the files ``read_image`` refuses
    up to the pixel data (missing, not an image, over the pixel limit).
    """
    p = Path(path)
    with _open(p, decode=False) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # as in read_image: a malformed EXIF block is ignored
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def frame_count(path: str | os.PathLike[str]) -> int:
    """How many frames (pages) an image file holds: more than one for an animated GIF, WebP or APNG or a TIFF stack."""
    with _open(Path(path), decode=False) as img:
        return getattr(img, "n_frames", 1)


def _to_float_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """Any Pillow mode to an ``H x W x 3`` float32 array in ``[0, 1]``, alpha composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        return np.repeat(np.clip(arr / top, 0.0, 1.0)[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA")
    elif mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    if img.mode != "RGB":
        raise ImageError(f"image {path} has unsupported mode {mode!r}; convert it to RGB (e.g. save as PNG)")
    return np.asarray(img, dtype=np.float32) / 255.0


RESAMPLE = ("bicubic", "nearest", "bilinear", "lanczos", "pil_bicubic")
"""Resampling filters: ``bicubic`` is antialiased bicubic on float pixels (the default); the others are
Pillow's filters applied as the seeds' loaders do (8-bit sources resized in 8 bits)."""

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "pil_bicubic": Image.Resampling.BICUBIC,
}
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True)
class Loading:
    """How images are brought to a run's size, beyond the size itself; the seed systems differ here.

    ``resample``: one of ``RESAMPLE``. ``rounding``: ``round`` or ``floor`` (the Keras notebook's
    ``int(width * rows / height)``) for the side ``size`` does not set. ``style_fit``: ``keep_aspect``
    (long side at ``style_scale`` times the output's) or ``stretch`` (to the content's shape, as the
    Keras notebook and the PyTorch tutorial load the style).
    """

    resample: str = "bicubic"
    rounding: str = "round"
    style_fit: str = "keep_aspect"


def _decode(path: Path) -> tuple[Image.Image, str]:
    """The decoded, EXIF-rotated Pillow image of ``path`` and its original mode."""
    img = _open(path)
    mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not make the pixels unusable
        pass
    if min(img.size) < 2:
        raise ImageError(f"image {path} is only {img.size[0]}x{img.size[1]} pixels; give a larger image")
    return img, mode


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0).contiguous()


def check_image_tensor(name: str, image: object, batch: bool = False) -> torch.Tensor:
    """``image`` as a ``(1, 3, H, W)`` RGB float tensor in ``[0, 1]`` (``(3, H, W)`` gains its batch dimension;
    with ``batch``, ``(B, 3, H, W)`` is kept); anything else is a ValueError naming ``name`` and the rule broken.

    Checked at the door because a wrong tensor otherwise fails steps later under another name (NaN blamed on
    ``optim.lr``) or not at all (0..255 or uint8 values give losses a thousand times off, silently).
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a (1, 3, H, W) tensor or an image file path, got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3 or (image.shape[0] != 1 and not batch):
        shape = "(B, 3, H, W)" if batch else "(1, 3, H, W) or (3, H, W)"
        raise ValueError(f"{name} must be an RGB image tensor {shape}, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {image.dtype}; divide 8-bit values by 255")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} holds NaN or infinite values; give an image with finite values in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        hint = "; divide 0..255 values by 255" if high > 1.0 else ""
        raise ValueError(f"{name} values must lie in [0, 1], got {low:g}..{high:g}{hint}")
    return image


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read ``path`` at full size as a ``(1, 3, H, W)`` RGB tensor in ``[0, 1]``, EXIF rotation applied."""
    p = Path(path)
    img, _ = _decode(p)
    return _as_tensor(_to_float_rgb(img, p))


def _pil_resize(arr: np.ndarray, shape: tuple[int, int], resample: str, wide: bool) -> np.ndarray:
    """Resize an ``H x W x 3`` float array with a Pillow filter: in 8 bits unless the source was wider."""
    size = (shape[1], shape[0])
    filt = _PIL_FILTERS[resample]
    if not wide:
        rgb = Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), mode="RGB")
        return np.asarray(rgb.resize(size, filt), dtype=np.float32) / 255.0
    channels = [np.asarray(Image.fromarray(arr[..., c], mode="F").resize(size, filt)) for c in range(3)]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0).astype(np.float32)


def read_resized(path: str | os.PathLike[str], shape: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """Read ``path`` resized to exactly ``shape`` = ``(H, W)`` with the ``resample`` filter."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; use one of {', '.join(RESAMPLE)}")
    p = Path(path)
    img, mode = _decode(p)
    arr = _to_float_rgb(img, p)
    if resample == "bicubic" or arr.shape[:2] == tuple(shape):
        return resize(_as_tensor(arr), shape)
    return _as_tensor(_pil_resize(arr, shape, resample, mode in _WIDE_MODES))


def target_shape(height: int, width: int, size: int, fit: str = "long", rounding: str = "round") -> tuple[int, int]:
    """The ``(H, W)`` that scales ``height x width`` so the side named by ``fit`` equals ``size``.

    The fitted side is exactly ``size``; the other side is rounded (``round``) or truncated (``floor``, as
    ``int()`` in the Keras notebook and torchvision's ``Resize``), computed exactly: in floating point
    ``1331 * (400 / 1331)`` is 399.99999999999994, which truncation made 399.
    """
    fits_height = {"long": height >= width, "short": height <= width, "height": True, "width": False}[fit]
    snap = round if rounding == "round" else math.floor
    if fits_height:
        return size, max(1, int(snap(Fraction(width * size, height))))
    return max(1, int(snap(Fraction(height * size, width)))), size


def style_side(content_shape: tuple[int, int], scale: float) -> int:
    """Long side of a style image at ``scale`` times the content's long side (at least 8 px)."""
    return max(8, round(max(content_shape) * scale))


def style_shape(
    style_hw: tuple[int, int], content_shape: tuple[int, int], scale: float, loading: Loading = Loading()
) -> tuple[int, int]:
    """The ``(H, W)`` a ``style_hw`` style image is loaded at beside a ``content_shape`` output."""
    if loading.style_fit == "stretch":
        return max(8, round(content_shape[0] * scale)), max(8, round(content_shape[1] * scale))
    return target_shape(style_hw[0], style_hw[1], style_side(content_shape, scale), "long", loading.rounding)


def resize(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resize a ``(1, 3, H, W)`` image to ``shape`` with antialiased bicubic, clamped to ``[0, 1]``."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    out = F.interpolate(image, size=shape, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def load_image(
    path: str | os.PathLike[str], size: int | None = None, fit: str = "long", loading: Loading = Loading()
) -> torch.Tensor:
    """Read an image and scale it so its ``fit`` side is ``size`` pixels (full size when ``size`` is None)."""
    if size is None:
        return read_image(path)
    height, width = read_size(path)
    return read_resized(path, target_shape(height, width, size, fit, loading.rounding), loading.resample)


def load_style(
    path: str | os.PathLike[str], content_shape: tuple[int, int], scale: float = 1.0, loading: Loading = Loading()
) -> torch.Tensor:
    """Read a style image at the size ``style_shape`` gives beside a ``content_shape`` output."""
    return read_resized(path, style_shape(read_size(path), content_shape, scale, loading), loading.resample)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(1, 3, H, W)`` or ``(3, H, W)`` tensor in ``[0, 1]`` as an 8-bit RGB Pillow image."""
    t = image.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    arr = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def save_pil(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save a Pillow image atomically (temporary file, then rename); the format follows the suffix."""
    p = Path(path)
    fmt = SAVE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ImageError(f"cannot save {p}: unknown image suffix; use one of {', '.join(SAVE_FORMATS)}")
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    return replace_atomically(p, lambda tmp: img.save(tmp, format=fmt, **options))


def save_image(image: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save a ``[0, 1]`` RGB tensor as an 8-bit image file, atomically."""
    return save_pil(to_pil(image), path)
