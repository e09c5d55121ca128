"""A procedural captioned-shapes dataset: learnable in minutes on a CPU, with zero-shot classes.

Each image shows one shape (circle, square, triangle) in one of four colours, small or large, at a
random position on a noisy grey background, described by one of several sentence templates
("a small red circle in the top left.", "a square colored blue.", ...). The class is colour x shape
(12 classes, `DEMO_CLASSNAMES`); `DEMO_TEMPLATES` are prompts for zero-shot evaluation. Both
splits are written through the shard writer: `out_dir/train/*.tfrecord`, `out_dir/test/*.tfrecord`.

  python -m clipjax.data.demo --out DIR [--n-train 4000 --n-test 600 --image-size 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
from collections.abc import Iterator

import numpy as np

from clipjax.cli import add_verbose_flag, setup_logging
from clipjax.data import writer
from clipjax.data.writer import SourceItem

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
DEMO_CLASSNAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
DEMO_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.")
SIZES = ("small", "large")

_CAPTIONS = (
    "a {size} {color} {shape} {pos}.",
    "a photo of a {color} {shape}.",
    "a {color} {shape} {pos} on a gray background.",
    "there is a {size} {color} {shape} {pos}.",
    "an image showing a {color} {shape}.",
    "a {shape} colored {color}, {pos}.",
    "{size} {color} {shape}",
    "a picture of a {size} {color} {shape}.",
)
_SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    train: str  # glob of the train shards
    test: str  # glob of the held-out shards
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    n_train: int
    n_test: int


def _position_phrase(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


def sample_example(rng: np.random.Generator) -> dict:
    """Draw the content of one example: colour, shape, size, position (fractions), caption."""
    ci, si = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    color_name, shape = list(COLORS)[ci], SHAPES[si]
    size = SIZES[int(rng.integers(2))]
    radius = rng.uniform(0.13, 0.18) if size == "small" else rng.uniform(0.24, 0.32)
    cx, cy = rng.uniform(radius, 1 - radius, size=2)
    template = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    caption = template.format(
        size=size, color=color_name, shape=shape, pos=_position_phrase(cx, cy)
    )
    return {
        "color": color_name,
        "shape": shape,
        "radius": radius,
        "center": (cx, cy),
        "caption": caption,
        "label": ci * len(SHAPES) + si,
    }


def draw_example(example: dict, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Render `example` as uint8 [S, S, 3]: the shape (anti-aliased) on a noisy grey ground."""
    from PIL import Image, ImageDraw

    scale = 2  # the shape mask is drawn at 2x and downsampled for smooth edges
    s = image_size * scale
    r = example["radius"] * s
    cx, cy = (c * s for c in example["center"])
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    if example["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif example["shape"] == "square":
        r *= 0.9
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        angles = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3)
        draw.polygon([(cx + r * np.cos(a), cy - r * np.sin(a)) for a in angles], fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.BOX), np.float32)[..., None]
    grey = rng.integers(70, 150) + rng.integers(-15, 16, size=3)
    bg = grey + rng.normal(0, 12, size=(image_size, image_size, 1)).astype(np.float32)
    fill = np.asarray(COLORS[example["color"]]) + rng.integers(-25, 26, size=3)
    out = bg + (fill - bg) * (alpha / 255.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def render_example(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str, int]:
    """One (uint8 [S,S,3] image, caption, label) drawn with `rng`."""
    example = sample_example(rng)
    return draw_example(example, rng, image_size), example["caption"], example["label"]


def _items(split: str, n: int, image_size: int, seed: int) -> Iterator[SourceItem]:
    from PIL import Image

    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        example = sample_example(rng)

        def read(example=example, rng=rng) -> bytes:  # drawn only for shards not yet written
            buf = io.BytesIO()
            Image.fromarray(draw_example(example, rng, image_size)).save(
                buf, format="JPEG", quality=95
            )
            return buf.getvalue()

        yield SourceItem(
            key=f"{split}/{i:06d}",
            origin=f"demo {split}[{i}]",
            caption=example["caption"],
            read=read,
            label=example["label"],
        )


def make_demo_dataset(
    out_dir: str,
    n_train: int = 4000,
    n_test: int = 600,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = False,
) -> DemoDataset:
    """Generate (or find already generated) the demo shards under `out_dir`; seconds on a CPU."""
    if n_train < 1 or n_test < 1 or image_size < 8:
        raise ValueError(
            f"demo dataset: need n_train, n_test >= 1 and image_size >= 8, got "
            f"{n_train}, {n_test}, {image_size}"
        )
    for split, n in (("train", n_train), ("test", n_test)):
        description = {
            "kind": "demo",
            "split": split,
            "n": n,
            "image_size": image_size,
            "seed": seed,
        }
        # items are drawn independently, so already in random order: written in that order,
        # the shards stay byte-identical to those of before the writer shuffled by default
        writer.write_shards(
            _items(split, n, image_size, seed),
            os.path.join(out_dir, split),
            source=description,
            shard_size=shard_size,
            prefix=split,
            classnames=list(DEMO_CLASSNAMES),
            total=n,
            progress=progress,
            shuffle_seed=None,
        )
    return DemoDataset(
        train=os.path.join(out_dir, "train", "*.tfrecord"),
        test=os.path.join(out_dir, "test", "*.tfrecord"),
        classnames=DEMO_CLASSNAMES,
        templates=DEMO_TEMPLATES,
        n_train=n_train,
        n_test=n_test,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.data.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    add_verbose_flag(p)
    a = p.parse_args(argv)
    setup_logging(a.verbose, level=logging.WARNING)
    ds = make_demo_dataset(a.out, a.n_train, a.n_test, a.image_size, a.seed, progress=True)
    print(
        f"demo dataset: train {ds.train} ({ds.n_train}), test {ds.test} ({ds.n_test}), "
        f"{len(ds.classnames)} classes"
    )


if __name__ == "__main__":
    main()
