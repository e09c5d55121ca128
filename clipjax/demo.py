"""`python -m clipjax.demo` (behind `make demo`): build the 'tiny' CLIP, embed a few generated images
and captions, and print the image x text cosine-similarity matrix.

The model is freshly initialised (untrained), so the similarities are not meaningful yet; the demo
shows the whole path: tokenizer -> text tower, CLIP-normalised images -> image tower -> joint space.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def make_images(size: int) -> tuple[np.ndarray, list[str]]:
    """A colored square on a gray background per color: uint8 [N, size, size, 3] and captions."""
    images, captions = [], []
    lo, hi = size // 4, 3 * size // 4
    for name, rgb in COLORS.items():
        img = np.full((size, size, 3), 128, np.uint8)
        img[lo:hi, lo:hi] = rgb
        images.append(img)
        captions.append(f"a photo of a {name} square")
    return np.stack(images), captions


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """CLIP mean/std normalisation, float32 NHWC."""
    from clipjax.data.transforms import CLIP_MEAN, CLIP_STD

    return ((images_uint8.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32))
            / np.asarray(CLIP_STD, np.float32))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipjax.demo", description=__doc__)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from clipjax import tokenize
    from clipjax.models import create_model, num_params

    model = create_model(args.preset)
    cfg = model.config
    print(f"model: {args.preset} ({num_params(cfg):,} parameters), devices: {jax.devices()}")

    images_u8, captions = make_images(cfg.image_size)
    images = normalize(images_u8)
    text = tokenize(captions, context_length=cfg.context_length)
    print(f"images {images.shape} {images.dtype}, text {text.shape} {text.dtype}")

    start = time.perf_counter()
    variables = jax.jit(model.init)(jax.random.key(args.seed), images, text)
    out = jax.jit(model.apply)(variables, images, text)
    sim = np.asarray(out["image_embeds"] @ out["text_embeds"].T)  # [N_img, N_txt] cosine similarity
    print(f"init + forward: {time.perf_counter() - start:.1f}s "
          f"(image tokens {tuple(out['image_tokens'].shape)}, text tokens {tuple(out['text_tokens'].shape)})")

    print("\ncosine similarity (rows: images, columns: captions; untrained model)")
    for j, caption in enumerate(captions):
        print(f"  t{j}: {caption}")
    print(" " * 10 + "".join(f"{f't{j}':>8}" for j in range(len(captions))))
    for i, name in enumerate(COLORS):
        print(f"{name + ' sq':<10}" + "".join(f"{v:8.3f}" for v in sim[i]))
    print(f"\nlogit scale exp(s) = {float(np.exp(out['logit_scale'])):.2f}; "
          f"best caption per image: {[captions[k].split()[-2] for k in sim.argmax(1)]}")


if __name__ == "__main__":
    main()
