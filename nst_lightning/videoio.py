"""Clips in and out: decode a video file (PyAV) or read a folder, glob or list of frames; encode an mp4.

Every way a clip can be unusable (corrupt, no frames, a variable frame rate, mixed frame sizes, frames too
large) is refused with a one-line ``VideoError`` before any frame is stylised. Frames are kept at the output
size as 8-bit tensors, so a long clip costs a quarter of the memory float frames would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import replace_atomically
from .errors import DependencyError, ResourceError, VideoError
from .flow import VIDEO_EXTRA
from .images import Loading, load_image, read_image, read_size, resize_rgb, target_shape
from .pairs import image_files, is_video_file

log = logging.getLogger(__name__)

MAX_FRAME_PIXELS = 7680 * 4320
"""Largest source frame accepted: 8K UHD (33 megapixels)."""
MAX_CLIP_BYTES = 8 * 1024**3
"""Most memory the clip's frames may take at the output size (8-bit RGB)."""
DEFAULT_FPS = Fraction(24)
"""Frame rate of a clip given as image files when ``video.fps`` is not set."""
FPS_TOLERANCE = 0.02
"""Largest relative spread of frame durations still counted as a constant frame rate."""


@dataclass(frozen=True)
class Clip:
    """The frames of a clip at the output size (``(1, 3, H, W)`` uint8 each), its rate and where it came from."""

    frames: list[torch.Tensor]
    fps: Fraction
    source: str
    has_audio: bool = False

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, index: int) -> torch.Tensor:
        """Frame ``index`` (0-based) as a ``(1, 3, H, W)`` float image in ``[0, 1]``."""
        return self.frames[index].float() / 255.0

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of every frame."""
        return tuple(self.frames[0].shape[-2:])


def _av() -> Any:
    """PyAV, or a one-line error naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise DependencyError(f"reading and writing video needs PyAV (av), which is not installed; {VIDEO_EXTRA}") from None
    return av


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()


def _check_memory(count: int, shape: tuple[int, int], source: str) -> None:
    need = count * 3 * shape[0] * shape[1]
    if need > MAX_CLIP_BYTES:
        raise ResourceError(
            f"clip {source} has {count} frames of {shape[1]}x{shape[0]} px, {need / 1024**3:.1f} GiB held in memory "
            f"(limit {MAX_CLIP_BYTES / 1024**3:.0f} GiB); set video.every_nth_frame or a smaller image.size, or cut the clip"
        )


def _check_frame_size(height: int, width: int, where: str) -> None:
    if height * width > MAX_FRAME_PIXELS:
        raise VideoError(
            f"{where} is {width}x{height} px, larger than 8K ({MAX_FRAME_PIXELS / 1e6:.0f} megapixels); "
            "downscale the clip first (e.g. ffmpeg -i IN -vf scale=1920:-2 OUT)"
        )


def _rate(fps: float | None, default: Fraction) -> Fraction:
    return default if fps is None else Fraction(fps).limit_denominator(1001 * 1000)


def read_clip(
    entries: Sequence[str],
    size: int,
    fit: str = "long",
    every_nth: int = 1,
    fps: float | None = None,
    loading: Loading = Loading(),
) -> Clip:
    """The clip ``entries`` name: one video file, or image files (a folder, a glob or a list, in name order).

    Frames are scaled so the side ``fit`` names is ``size``, as ``loading`` resamples and rounds; ``every_nth`` keeps frames 1, 1+n, ...; the clip's
    rate is ``fps`` if given, else the video's own (24 for image files), divided by ``every_nth``.
    """
    videos = [e for e in entries if is_video_file(e)]
    if videos and len(entries) > 1:
        raise VideoError(
            f"content names {len(entries)} entries including the video {videos[0]}; a clip is one video file or "
            "frames (a folder, glob or list); for several clips, list the videos or give their folder without video.enabled"
        )
    if videos:
        return _read_video(Path(videos[0]).expanduser(), size, fit, every_nth, fps, loading)
    return _read_frames(entries, size, fit, every_nth, fps, loading)


def _read_frames(entries: Sequence[str], size: int, fit: str, every_nth: int, fps: float | None, loading: Loading) -> Clip:
    files = [f for entry in entries for f in image_files(entry, "frame")][::every_nth]
    first = read_size(files[0])
    _check_frame_size(*first, f"frame {files[0]}")
    for path in files[1:]:
        if read_size(path) != first:
            height, width = read_size(path)
            raise VideoError(
                f"frame {path} is {width}x{height} px but {files[0]} is {first[1]}x{first[0]}; "
                "all frames of a clip must have one size"
            )
    shape = target_shape(*first, size, fit, loading.rounding)
    _check_memory(len(files), shape, str(entries[0]))
    frames = [_as_uint8(load_image(path, size, fit, loading)) for path in files]
    return Clip(frames, _rate(fps, DEFAULT_FPS) / every_nth, str(entries[0]))


def frame_size(entries: Sequence[str]) -> tuple[int, int]:
    """The ``(H, W)`` of the clip's frames as ``read_clip`` finds them, from the video's header or the first frame's
    (nothing decoded), so a clip's memory can be estimated before it is read."""
    videos = [e for e in entries if is_video_file(e)]
    if not videos:
        first = image_files(entries[0], "frame")[0]
        height, width = read_size(first)
        _check_frame_size(height, width, f"frame {first}")
        return height, width
    path = Path(videos[0]).expanduser()
    with _open_video(path) as container:
        return _stated_size(container, path)


def _open_video(path: Path) -> Any:
    """The open container of a video file, or a VideoError naming what is wrong with it."""
    av = _av()
    if not path.is_file():
        raise VideoError(f"video {path} does not exist; check the path")
    try:
        return av.open(str(path))
    except av.FFmpegError as err:
        raise VideoError(f"cannot read video {path} ({_reason(err)}); it is corrupt or not a video, re-export it") from None


def _stated_size(container: Any, path: Path) -> tuple[int, int]:
    """The ``(H, W)`` a video's picture stream states, checked as a frame size."""
    if not container.streams.video:
        raise VideoError(f"video {path} has no frames (no picture stream); give a clip with at least one picture")
    context = container.streams.video[0].codec_context
    if not (context.width and context.height):
        raise VideoError(f"video {path} states no frame size; it is corrupt, re-export it")
    _check_frame_size(context.height, context.width, f"video {path}")
    return context.height, context.width


def _read_video(path: Path, size: int, fit: str, every_nth: int, fps: float | None, loading: Loading) -> Clip:
    av = _av()
    with _open_video(path) as container:
        height, width = _stated_size(container, path)
        stream = container.streams.video[0]
        shape = target_shape(height, width, size, fit, loading.rounding)
        times: list[float] = []
        frames: list[torch.Tensor] = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                if (frame.height, frame.width) != (height, width):
                    raise VideoError(
                        f"video {path} changes frame size at frame {index + 1} ({frame.width}x{frame.height} after "
                        f"{width}x{height}); re-encode it at one size"
                    )
                if frame.time is not None:
                    times.append(float(frame.time))
                if index % every_nth == 0:
                    _check_memory(max(len(frames) + 1, (stream.frames or 0) // every_nth), shape, str(path))
                    rgb = frame.to_ndarray(format="rgb24").astype(np.float32) / 255.0
                    frames.append(_as_uint8(resize_rgb(rgb, shape, loading.resample)))
        except av.FFmpegError as err:
            raise VideoError(
                f"video {path} is corrupt after {len(times)} frames ({_reason(err)}); re-export or cut the file"
            ) from None
        if not frames:
            raise VideoError(f"video {path} has no frames; give a clip with at least one picture")
        rate = _constant_rate(times, path) or stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        has_audio = bool(container.streams.audio)
        if has_audio:
            log.warning("note: the audio of %s is dropped; the stylised video has no sound", path)
        return Clip(frames, _rate(fps, Fraction(rate)) / every_nth, str(path), has_audio)


def _reason(err: Exception) -> str:
    return (getattr(err, "strerror", None) or str(err) or type(err).__name__).strip().splitlines()[0]


def _constant_rate(times: Sequence[float], path: Path) -> Fraction | None:
    """The rate the frame times keep, or VideoError when they keep none; None with fewer than two frames."""
    steps = np.diff(np.sort(np.asarray(times, dtype=np.float64)))
    if len(steps) == 0:
        return None
    median = float(np.median(steps))
    if median <= 0 or float(np.max(np.abs(steps - median))) > FPS_TOLERANCE * median + 1e-3:
        raise VideoError(
            f"video {path} has a variable frame rate (frames {steps.min() * 1000:.0f} to {steps.max() * 1000:.0f} ms "
            "apart); convert it to a constant rate first, e.g. ffmpeg -i IN -fps_mode cfr -r 24 OUT.mp4"
        )
    return Fraction(1 / median).limit_denominator(1001 * 1000)


def write_video(frames: Sequence[Path], path: Path, fps: Fraction) -> Path:
    """Encode the image files ``frames`` as an H.264 mp4 at ``fps``, atomically (a temporary file, then a rename).

    4:2:0 chroma where both sides are even (what every player takes), 4:4:4 otherwise, so the size stays exact.
    """
    av = _av()
    first = read_image(frames[0])
    height, width = first.shape[-2:]

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            for file in frames:
                rgb = _as_uint8(read_image(file))[0].permute(1, 2, 0).contiguous().numpy()
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    try:
        return replace_atomically(path, encode)
    except av.FFmpegError as err:
        raise VideoError(f"cannot encode {path} ({_reason(err)})") from None


def video_info(path: Path) -> tuple[int, Fraction, tuple[int, int]]:
    """Frame count, frame rate and ``(H, W)`` of a video file, by decoding it."""
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, Fraction(stream.average_rate), (stream.codec_context.height, stream.codec_context.width)

