r"""Pixel cleanliness of the default output: colour speckle and strips along the borders, with judged quality.

For each bundled pair, runs the default losses (``configs/example.yaml``) at ``--size`` for ``--steps``
L-BFGS steps, once per setting given with ``--setting NAME:key=value,key=value`` (``default`` = as shipped),
and prints a Markdown table:

- speckle: mean |CbCr - its 3x3 median| over the saved 8-bit image (0..255 units; lower is cleaner);
- border: the worst side's line-to-line jaggedness of the outer 4 pixel lines over the interior's (1 or less: as
  a photograph's edges; strips score several times more); both from ``nst_lightning.judge``;
- style / content: ``nst_lightning.judge.Judge`` distances (lower is better).

    python benchmarks/pixels.py --setting before:loss.chroma_weight=0,loss.border_weight=0 --setting after: \
        --pictures docs/pixels

``--pictures`` writes one sheet per pair (each setting's result, its bottom-right corner and its centre 4x).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from nst_lightning import fit, load_config
from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, EXAMPLE_STYLE_2
from nst_lightning.images import load_image, read_image
from nst_lightning.judge import Judge, border, speckle

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"
PAIRS = [(EXAMPLE_CONTENT, EXAMPLE_STYLE), (EXAMPLE_CONTENT, EXAMPLE_STYLE_2)]


def picture(results: list[tuple[str, Image.Image]], path: Path, crop: int = 64, zoom: int = 4) -> None:
    """One JPEG: a column per setting with the whole result, its bottom-right corner and its centre at ``zoom``x."""
    w, h = results[0][1].size
    boxes = [(w - crop, h - crop, w, h), ((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)]
    col = max(w, crop * zoom)
    label = 14
    sheet = Image.new("RGB", (col * len(results), label + h + 2 * crop * zoom), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, img) in enumerate(results):
        draw.text((i * col + 4, 1), name, fill="black")
        sheet.paste(img, (i * col, label))
        for j, box in enumerate(boxes):
            sheet.paste(img.crop(box).resize((crop * zoom,) * 2, Image.NEAREST), (i * col, label + h + j * crop * zoom))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--setting", action="append", default=[], help="NAME:key=value,key=value")
    parser.add_argument("--save", type=Path, default=None, help="keep each result as SAVE/<setting>_<style>.png")
    parser.add_argument("--pictures", type=Path, default=None,
                        help="write PICTURES/<style>.jpg: the settings side by side, with a corner and the centre zoomed")
    parser.add_argument("--style", action="append", default=None, help="only the pairs with this style (file stem)")
    args = parser.parse_args()
    settings = [(s.partition(":")[0], [o for o in s.partition(":")[2].split(",") if o]) for s in args.setting or ["default:"]]
    judge = Judge()
    print(f"{args.size} px, {args.steps} L-BFGS steps, configs/example.yaml losses")
    print("| pair | setting | speckle | border | style | style (sw) | content |")
    print("|---|---|---|---|---|---|---|")
    for content, style in [p for p in PAIRS if args.style is None or p[1].stem in args.style]:
        label = f"{content.stem} x {style.stem}"
        source = load_image(content, args.size)
        print(f"| {label} | content image itself | {speckle(source):.2f} | {border(source):.2f} | | |")
        results = []
        for name, overrides in settings:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(CONFIG, [f"content={content}", f"style={style}", f"output={tmp}/run",
                                           f"image.size={args.size}", f"trainer.max_steps={args.steps}",
                                           "snapshot.every_n_steps=0", *overrides])
                out = fit(cfg, progress=False)
                img = Image.open(out.final).convert("RGB")
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    img.save(args.save / f"{name}_{style.stem}.png")
                result = read_image(out.final)
                q = judge(result, read_image(content), load_image(style, max(img.size)))
                results.append((name, img))
            print(f"| {label} | {name} | {speckle(result):.2f} | {border(result):.2f} | {q.style:.4f} | {q.style_sw:.4f} | {q.content:.4f} |", flush=True)
        if args.pictures:
            picture(results, args.pictures / f"{style.stem}.jpg")


if __name__ == "__main__":
    main()
