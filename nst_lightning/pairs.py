"""The content x style pairs of a batch run: expand folders, globs and lists, name each output, skip finished ones.

A batch of images writes ``OUTPUT/<content>__<style>.png`` per pair; a batch of clips (a folder, glob or list
of video files) writes each clip's outputs in ``OUTPUT/<clip>__<style>/``.

Imports no torch, so the CLI can tell a batch run from a single run (and report bad inputs) at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from .config import RunConfig
from .errors import ConfigError
from .kinds import IMAGE_SUFFIXES, PAIR_SEPARATOR, VIDEO_SUFFIXES, found, is_glob, is_video_file, matches, names_many

OUTPUT_SUFFIX = ".png"


class Pair(NamedTuple):
    """One output image: a content file, the style file(s) blended for it, and the file it is written to."""

    content: str
    styles: tuple[str, ...]
    output: str

    @property
    def name(self) -> str:
        """The output's file name, ``<content-stem>__<style-stem>.png``: it says which pair it is."""
        return Path(self.output).name


def is_clip(config: RunConfig) -> bool:
    """A clip run stylises frames in order: ``video.enabled``, or one content entry that is a video file."""
    return config.kind == "clip"


def is_clip_batch(config: RunConfig) -> bool:
    """A batch of clips: without ``video.enabled``, a list of video files or a folder or glob matching videos."""
    return config.kind == "clips"


def is_batch(config: RunConfig) -> bool:
    """A batch run writes one file per pair: content is a list, or content or style is a folder or glob.

    The form of the input decides, not the number of matches, so a folder of one image still writes
    ``OUTPUT/<content>__<style>.png`` and reruns keep finding it. Clips are not batches.
    """
    return config.kind == "folder"


def expand_pairs(config: RunConfig, clips: bool = False) -> list[Pair]:
    """Every content x style pair the config names, in a stable order, each with its output path.

    With ``clips`` the contents are video files and each output is a directory ``OUTPUT/<clip>__<style>``.
    """
    out_dir = Path(config.output)
    role, suffixes, suffix = ("clip", VIDEO_SUFFIXES, "") if clips else ("content", IMAGE_SUFFIXES, OUTPUT_SUFFIX)
    contents = _unique(p for entry in config.contents for p in _expand(entry, role, suffixes))
    mixed = [e for e in config.contents if clips and names_many(e) and matches(e, IMAGE_SUFFIXES)]
    if mixed:
        raise ConfigError(
            f"content {mixed[0]} holds both video files and images; put a clip's frames in a folder of their own "
            "(with video.enabled=true) and the videos in another"
        )
    for path in contents:
        inside = path.resolve().parents if clips else [path.parent.resolve()]  # a clip's outputs are folders
        if out_dir.resolve() in inside:
            raise ConfigError(
                f"{role} {path} is inside the output folder {out_dir}; results would become inputs on the "
                "next run, so choose another output= directory"
            )
    pairs = [
        Pair(str(c), styles, str(out_dir / f"{c.stem}{PAIR_SEPARATOR}{_styles_stem(styles)}{suffix}"))
        for c in contents
        for styles in _style_sets(config.styles)
    ]
    seen: dict[str, Pair] = {}
    for pair in pairs:
        other = seen.setdefault(pair.output, pair)
        if other is not pair:
            raise ConfigError(
                f"{other.content} x {' + '.join(other.styles)} and {pair.content} x {' + '.join(pair.styles)} would "
                f"both write {pair.output}; rename one of the images (outputs are named <content>__<style>.png)"
            )
    return pairs


def pending(pairs: list[Pair], overwrite: bool = False) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (to do, already complete). Outputs are written atomically, so existing means complete."""
    if overwrite:
        return list(pairs), []
    done = [p for p in pairs if Path(p.output).is_file()]
    todo = [p for p in pairs if not Path(p.output).is_file()]
    return todo, done


def _expand(entry: str, role: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files an entry names: itself, a folder's files (not recursive) or a glob's matches with ``suffixes``."""
    path = Path(os.path.expanduser(entry))
    kind = "video files" if suffixes == VIDEO_SUFFIXES else "images"
    if not names_many(entry):
        if not path.exists():
            raise ConfigError(f"{role} {'' if role == 'clip' else 'image '}{path} does not exist; check the path")
        if role == "clip" and not is_video_file(entry):
            raise ConfigError(f"clip list entry {path} is not a video file ({', '.join(suffixes)}); list only videos")
        return [path]
    what = f"{role} glob {entry!r} matches" if is_glob(entry) else f"{role} folder {path} holds"
    files = sorted(p for p in found(entry) if p.suffix.lower() in suffixes)
    if not files:
        raise ConfigError(f"{what} no {kind} ({', '.join(suffixes)}); check the path or the pattern")
    return files


def image_files(entry: str, role: str = "content") -> list[Path]:
    """The image files an entry names, sorted: itself, a folder's images or a glob's matches."""
    return _expand(entry, role)


def _style_sets(entries: list[str]) -> list[tuple[str, ...]]:
    """One style per image of a folder or glob; a list of files stays one blended style (as in single runs)."""
    if len(entries) == 1 and names_many(entries[0]):
        return [(str(p),) for p in _expand(entries[0], "style")]
    many = [e for e in entries if names_many(e)]
    if many:
        raise ConfigError(
            f"style list entry {many[0]!r} is a folder or glob, but a style list is blended into one style; "
            "give the folder or glob alone for one output per style, or list image files to blend"
        )
    for entry in entries:
        _expand(entry, "style")  # a missing style file fails every pair: say so once, before any work
    return [tuple(entries)]


def _styles_stem(styles: tuple[str, ...]) -> str:
    return "+".join(Path(s).stem for s in styles)


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[Path] = set()
    out = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
