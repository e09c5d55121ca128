"""CLIP's eval transform on one PIL image, in numpy: no TensorFlow, so `clipjax.load`, search and
embedding images given as arrays work where TensorFlow is not installed.

`preprocess` matches `clipjax.data.transforms.eval_transform` (the tf.data path) and OpenAI's own
preprocessing: bicubic resize of the short side, center crop, CLIP mean/std.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_size(size) -> int:
    """`size` as an int, or a ValueError naming it."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int (output height = width), got {size!r}")
    return int(size)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The eval transform on one PIL image, as OpenAI's: -> np.float32 [size, size, 3] (HWC)."""
    size = check_size(size)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).astype(np.float32)
