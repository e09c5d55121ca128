"""One image-conversion rule, and CLIP's eval transform on one PIL image, in numpy.

`to_rgb` is the rule every path follows (the shard writer, `preprocess` for evaluation and search,
and `clipjax.data.transforms.decode_image` for the formats TensorFlow decodes): EXIF orientation
applied; alpha composited on `BACKGROUND` (white, what shards have always used); 16-bit and float
images scaled to 8 bits by their bit depth or range (see `scale_to_8bit`); palette, CMYK and the
other modes converted by PIL.

`preprocess` matches `clipjax.data.transforms.eval_transform` (the tf.data path) and OpenAI's own
preprocessing: bicubic resize of the short side, center crop, CLIP mean/std. Only the cropped
window is resampled, so an extreme aspect ratio costs no more memory than the output.

No TensorFlow here: `clipjax.load`, search and embedding images given as arrays work where
TensorFlow is not installed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255)  # transparent pixels become this colour, on every path

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = 65535.0 / 255.0  # 257: 16-bit level -> 8-bit level
# A resize pass longer than this many output sides resamples only the crop window.
WINDOW_ABOVE = 4


def check_size(size) -> int:
    """`size` as an int, or a ValueError naming it."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int (output height = width), got {size!r}")
    return int(size)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; 1 when absent or unreadable)."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: PIL raises many types; treat as upright
        return 1


def has_alpha(image: Image.Image) -> bool:
    """Whether `image` carries transparency (an alpha band or a transparent colour/index)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def scale_to_8bit(image: Image.Image) -> np.ndarray:
    """A one-band 16-bit ('I;16*'), 32-bit int ('I') or float ('F') image as uint8 [H, W] levels.

    'I;16*': by bit depth, level / 257 (0..65535 -> 0..255). 'I': values within 0..255 are kept,
    within 0..65535 scaled as 16-bit, anything else stretched from its min..max. 'F': values within
    0..1 times 255, within 0..255 kept, else stretched from min..max. NaN becomes 0. (PIL's own
    convert clips instead: a 0..65535 ramp becomes almost all white.)
    """
    pixels = np.asarray(image, dtype=np.float32)
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=np.inf, neginf=-np.inf)
    finite = pixels[np.isfinite(pixels)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode.startswith("I;16") and not image.mode.startswith("I;16S"):
        pixels = pixels / np.float32(_SIXTEEN_BIT)
    elif lo >= 0 and hi <= 255 and not (image.mode == "F" and hi <= 1):
        pass
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        pixels = pixels * np.float32(255)
    elif image.mode != "F" and lo >= 0 and hi <= 65535:
        pixels = pixels / np.float32(_SIXTEEN_BIT)
    elif hi > lo:
        pixels = (pixels - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.round(np.clip(pixels, 0, 255)).astype(np.uint8)


def composite(rgba: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3]: straight alpha over `background`, rounded to levels.

    float32 arithmetic, mirrored exactly by the tf.data decoder (x / 255 never lands on a half).
    """
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32)
    bg = np.asarray(background, np.float32)
    out = (rgb * alpha + bg * (np.float32(255) - alpha)) / np.float32(255)
    return np.round(out).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an upright 8-bit RGB PIL image, by the one rule every clipjax path follows.

    EXIF orientation applied; transparency composited on BACKGROUND; 16-bit/float by
    `scale_to_8bit`; everything else (palette, CMYK, L, 1, YCbCr, ...) by PIL's convert. An
    upright RGB image without transparency is returned as is (no copy).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(scale_to_8bit(image), "L").convert("RGB")
    if has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"))
        return Image.fromarray(composite(rgba), "RGB")
    return image.convert("RGB")


def resize_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_w, new_h): the short side = size, the long side = floor(size * long / short), the
    rule of torchvision's Resize(int) used by OpenAI's preprocessing."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def window_rows(top: int, size: int, height: int, new_h: int) -> tuple[int, int]:
    """Source rows [r0, r1) that resizing `height` rows to `new_h` reads for output rows
    [top, top + size): the window plus the bicubic kernel's reach (2 output pixels) and one row."""
    scale = height / new_h
    reach = 2.0 * max(scale, 1.0) + 1.0
    r0 = max(0, math.floor(top * scale - reach))
    r1 = min(height, math.ceil((top + size) * scale + reach))
    return r0, r1


def _bicubic(image: Image.Image, out: tuple[int, int], box: tuple) -> Image.Image:
    return image.resize(out, Image.Resampling.BICUBIC, box=box)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (bicubic, antialiased), then the center size x size crop.

    Two explicit passes, width then height, each rounded to 8 bits as PIL does (and as the
    tf.data `eval_transform`; PIL alone would pick the order by cost). A pass whose target is at
    most WINDOW_ABOVE x size long is done whole and cropped after (the exact pixels of a full
    resize); a longer one resamples only the crop window (PIL's source box; equal to the full
    resize up to rare one-level rounding), so memory stays bounded for any aspect ratio.
    """
    width, height = image.size
    new_w, new_h = resize_shape(width, height, size)
    left = int(round((new_w - size) / 2.0))  # torchvision's offsets
    top = int(round((new_h - size) / 2.0))
    rows = height
    if new_h > WINDOW_ABOVE * size:  # far taller than wide: only rows near the window matter
        r0, r1 = window_rows(top, size, height, new_h)
        image, rows = image.crop((0, r0, width, r1)), r1 - r0
        y0, y1 = top * height / new_h - r0, (top + size) * height / new_h - r0
    if new_w == width:
        image = image.crop((left, 0, left + size, rows))
    elif new_w > WINDOW_ABOVE * size:
        sx = width / new_w
        image = _bicubic(image, (size, rows), (left * sx, 0, (left + size) * sx, rows))
    else:
        image = _bicubic(image, (new_w, rows), (0, 0, width, rows))
        image = image.crop((left, 0, left + size, rows))
    if new_h == height:
        return image.crop((0, top, size, top + size))
    if new_h > WINDOW_ABOVE * size:
        return _bicubic(image, (size, size), (0, y0, size, y1))
    image = _bicubic(image, (size, new_h), (0, 0, size, rows))
    return image.crop((0, top, size, top + size))


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The eval transform on one PIL image, as OpenAI's: -> np.float32 [size, size, 3] (HWC).

    The image is first brought to RGB by `to_rgb`, then `resize_center_crop`: a 10000 x 1 image
    costs kilobytes, not the gigabytes of its 2240000 x 224 full resize.
    """
    size = check_size(size)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
    image = resize_center_crop(to_rgb(image), size)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).astype(np.float32)
