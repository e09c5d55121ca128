"""Image decoding and CLIP's image transforms as TensorFlow ops for tf.data.

`eval_transform` reproduces OpenAI's eval preprocessing (bicubic resize of the short side, center
crop, CLIP mean/std); `train_transform` is the training pipeline's stateless random resized crop,
deterministic given its seed. The same eval transform on one PIL image, without TensorFlow, is
`clipjax.data.image.preprocess`.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from clipjax.data.image import BACKGROUND, CLIP_MEAN, CLIP_STD, WINDOW_ABOVE, check_size

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_needs_rule(encoded: tf.Tensor) -> tf.Tensor:
    """Whether PNG bytes carry 16-bit samples, an alpha channel or a tRNS transparency chunk
    (IHDR: bit depth at byte 24, colour type at 25; 4 = grey + alpha, 6 = RGBA)."""
    header = tf.strings.join([tf.strings.substr(encoded, 0, 26), "\0" * 26])
    depth = tf.strings.substr(header, 24, 1)
    color = tf.strings.substr(header, 25, 1)
    special = (depth == b"\x10") | (color == b"\x04") | (color == b"\x06")
    return special | (tf.size(tf.strings.split(encoded, "tRNS", maxsplit=1)) > 1)


def _decode_png_by_rule(encoded: tf.Tensor) -> tf.Tensor:
    """PNG -> uint8 RGB by `clipjax.data.image.to_rgb`'s rule: 16-bit scaled (level / 257),
    transparency composited on BACKGROUND with the same float32 arithmetic as `composite`."""
    pixels = tf.cast(tf.io.decode_png(encoded, channels=4, dtype=tf.uint16), tf.float32)
    levels = tf.round(pixels / 257.0)
    rgb, alpha = levels[..., :3], levels[..., 3:]
    background = tf.constant(BACKGROUND, tf.float32)
    out = tf.round((rgb * alpha + background * (255.0 - alpha)) / 255.0)
    return tf.cast(out, tf.uint8)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 RGB [H, W, 3], by `clipjax.data.image.to_rgb`'s rule where
    TensorFlow can follow it: grayscale replicated, PNG transparency (alpha or tRNS) composited on
    the same white, 16-bit PNG scaled by bit depth.

    Not followed here: JPEG EXIF orientation and GIF transparency. Shards from clipjax's writer
    never carry either (it re-encodes such images by the rule), and class folders and tfds sets
    are read with PIL; bytes from elsewhere with those traits should go through the writer.
    JPEGs use libjpeg's accurate integer IDCT, which gives PIL's pixels exactly (the fast default
    is off by up to 4 levels). Corrupt bytes raise tf.errors.InvalidArgumentError when run;
    pipelines skip and count those.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    is_png = tf.strings.substr(encoded, 0, 8) == _PNG_SIGNATURE
    by_rule = tf.cond(is_png, lambda: _png_needs_rule(encoded), lambda: tf.constant(False))
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.cond(
            by_rule,
            lambda: _decode_png_by_rule(encoded),
            lambda: tf.io.decode_image(
                encoded, channels=3, dtype=tf.uint8, expand_animations=False
            ),
        ),
    )
    image.set_shape([None, None, 3])
    return image


def normalize(image: tf.Tensor) -> tf.Tensor:
    """float pixel values in [0, 255] -> CLIP-normalised float32 ((x / 255 - mean) / std)."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(CLIP_MEAN, tf.float32)) / tf.constant(CLIP_STD, tf.float32)


def _check_image(image) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8 or image.shape.rank != 3:
        raise ValueError(
            f"expected a uint8 image [H, W, C], got {image.dtype.name} with shape "
            f"{image.shape}; decode it with decode_image first"
        )
    return image


def short_side_resize_shape(height: tf.Tensor, width: tf.Tensor, size: int) -> tuple:
    """(new_h, new_w) with the short side = size and the long side = floor(size * long / short),
    the rule of torchvision's Resize(int) used by OpenAI's preprocessing (float64, like Python)."""
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.floor(size * long / short), tf.int32)
    size_t = tf.constant(size, tf.int32)
    new_h = tf.where(width <= height, new_long, size_t)
    new_w = tf.where(width <= height, size_t, new_long)
    return new_h, new_w


def _to_levels(image: tf.Tensor) -> tf.Tensor:
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def _bicubic(image: tf.Tensor, out_hw) -> tf.Tensor:
    """Antialiased bicubic resize of a whole float image to `out_hw` (Keys a=-0.5, as PIL)."""
    return tf.image.resize(image, tf.stack(out_hw), method="bicubic", antialias=True)


def _bicubic_window(image: tf.Tensor, out_hw, scale_hw, offset_hw) -> tf.Tensor:
    """Output pixels [offset, offset + out) of an antialiased bicubic resize by `scale_hw`
    (tf.image.resize's kernel, computed only there: bounded memory for any aspect ratio)."""
    return tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=tf.stack(out_hw),
        scale=tf.stack(scale_hw),
        translation=-tf.cast(tf.stack(offset_hw), tf.float32),
        kernel_type="keyscubic",
        antialias=True,
    )[0]


def resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, C] -> float32 levels [size, size, C]: short side to `size`, center crop, as
    `clipjax.data.image.resize_center_crop` (the same passes, order, windows and rounding)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    new_h, new_w = short_side_resize_shape(height, width, size)
    # torchvision: int(round((new - size) / 2)); tf.round also rounds halves to even.
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    window = WINDOW_ABOVE * size
    tall = new_h > window
    # Far taller than wide: keep only the rows the height pass reads (window_rows).
    scale_y = tf.cast(height, tf.float64) / tf.cast(new_h, tf.float64)
    reach = 2.0 * tf.maximum(scale_y, 1.0) + 1.0
    top64 = tf.cast(top, tf.float64)
    r0 = tf.maximum(0, tf.cast(tf.floor(top64 * scale_y - reach), tf.int32))
    r1 = tf.minimum(height, tf.cast(tf.math.ceil((top64 + size) * scale_y + reach), tf.int32))
    r0, r1 = tf.where(tall, r0, 0), tf.where(tall, r1, height)
    image = tf.cast(image[r0:r1], tf.float32)
    rows = r1 - r0
    # Two separable passes, width then height, each rounded and clipped to uint8 levels: this is
    # how PIL resamples 8-bit images, and it matters where bicubic overshoots (sharp edges).
    # A pass up to `window` long is done whole then cropped (exactly the full resize's pixels).
    scale_w = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
    image = tf.cond(
        new_w > window,
        lambda: _bicubic_window(image, [rows, size], [1.0, scale_w], [0, left]),
        lambda: _bicubic(image, [rows, new_w])[:, left : left + size],
    )
    image = _to_levels(image)
    scale_h = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
    # The windowed pass on rows [r0, r1): output row y samples full-image row (y + top + .5) / s.
    shift = tf.cast(top, tf.float32) - tf.cast(r0, tf.float32) * scale_h
    image = tf.cond(
        tall,
        lambda: _bicubic_window(image, [size, size], [scale_h, 1.0], [shift, 0.0]),
        lambda: _bicubic(image, [new_h, size])[top : top + size],
    )
    return _to_levels(image)


def eval_transform(image: tf.Tensor, size: int) -> tf.Tensor:
    """OpenAI's eval transform: uint8 [H, W, 3] -> float32 [size, size, 3], CLIP-normalised.

    Bicubic (Keys a=-0.5, antialiased when shrinking, as PIL) resize of the short side to `size`,
    then a center crop with torchvision's offsets (`resize_center_crop`).
    """
    image = _check_image(image)
    size = check_size(size)
    crop = resize_center_crop(image, size)
    crop.set_shape([size, size, image.shape[-1]])
    return normalize(crop)


def _check_crop_args(seed, crop_scale, ratio) -> tf.Tensor:
    """The seed as a tensor, after checking it and the crop ranges (ValueError naming them)."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64) or seed.shape.as_list() != [2]:
        raise ValueError(
            f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} {seed.shape}"
        )
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0 or not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(
            f"need 0 < crop_scale[0] <= crop_scale[1] <= 1 and 0 < ratio[0] <= "
            f"ratio[1], got "
            f"crop_scale={crop_scale}, ratio={ratio}"
        )
    return seed


def random_resized_crop_box(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple:
    """A crop window (begin [3], size [3] for tf.slice) covering `crop_scale` of the image area with
    width/height in `ratio`; up to 10 tries, else the whole image. Deterministic given `seed`."""
    seed = _check_crop_args(seed, crop_scale, ratio)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=crop_scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_size


def train_transform(
    image: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Random resized crop: uint8 [H, W, 3] -> float32 [size, size, 3], CLIP-normalised.

    The window comes from `random_resized_crop_box(seed)`. A window more than twice the output is
    first shrunk by the integer factor k = floor(short side / size) with a k x k mean filter (the
    < k trailing rows/columns that do not fill a block are dropped: a marginally smaller crop),
    then resized with plain bicubic, whose scale is then in (0.5, 1] or an upscale, where aliasing
    is negligible. This is within ~1 grey level of an antialiased bicubic resize of the window at
    a fraction of its cost (see benchmarks/RESULTS.md, "Input pipeline").
    """
    image = _check_image(image)
    size = check_size(size)
    begin, crop_size = random_resized_crop_box(tf.shape(image), seed, crop_scale, ratio)
    return _shrink_resize_normalize(tf.slice(image, begin, crop_size), size)


def decode_train_transform(
    encoded: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """`train_transform(decode_image(encoded), ...)`, decoding only what the crop needs.

    A whole JPEG (one ending in its end-of-image marker) is not decoded in full: its size is read
    from the header, the crop box drawn as for the decoded image (the same box), and only that
    window decoded, at 1/r scale in the DCT domain for the largest r in (2, 4, 8) with
    r <= k = floor(short side / size), i.e. in place of all or part of the k x k mean filter. At
    r = 1 the pixels are those of `train_transform(decode_image(encoded))`. At r > 1 the box's
    edges move to the nearest multiple of r (at most r / 2 pixels) and libjpeg's scaled IDCT
    stands in for the r x r mean (within about a grey level on average). Other bytes (PNG, GIF,
    BMP, and a JPEG cut short or carrying bytes after its end marker, which a partial decode could
    not tell from a whole one) go through `decode_image` and `train_transform`. Corrupt bytes
    raise tf.errors.InvalidArgumentError when run, as `decode_image`.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    size = check_size(size)
    _check_crop_args(seed, crop_scale, ratio)  # before tracing either branch
    tail = tf.strings.substr(tf.strings.join(["\0\0", encoded]), -2, 2)
    whole_jpeg = tf.io.is_jpeg(encoded) & tf.equal(tail, _JPEG_END)
    out = tf.cond(
        whole_jpeg,
        lambda: _jpeg_crop_transform(encoded, size, seed, crop_scale, ratio),
        lambda: train_transform(decode_image(encoded), size, seed, crop_scale, ratio),
    )
    out.set_shape([size, size, 3])
    return out


_JPEG_END = b"\xff\xd9"
_DCT_SCALES = (1, 2, 4, 8)  # the scale denominators tf.io.decode_jpeg offers
_EDGE_CONTEXT = 32  # pixels: the widest MCU (4x chroma subsampling)


def _jpeg_crop_transform(encoded, size, seed, crop_scale, ratio) -> tf.Tensor:
    """The crop box of a JPEG's header shape, decoded alone at the largest DCT scale 1/r <= 1/k."""
    height_width = tf.io.extract_jpeg_shape(encoded)[:2]
    shape = tf.concat([height_width, [3]], 0)
    begin, crop_size = random_resized_crop_box(shape, seed, crop_scale, ratio)
    k = tf.minimum(crop_size[0], crop_size[1]) // size
    index = tf.reduce_sum(tf.cast(k >= tf.constant(_DCT_SCALES[1:]), tf.int32))

    def decode_at(r: int):
        def fn():
            # The box's edges rounded to the nearest r-pixel block (the scaled image's pixels),
            # whole blocks only (a last partial one is libjpeg's edge padding).
            first = (2 * begin[:2] + r) // (2 * r)
            last = (2 * (begin[:2] + crop_size[:2]) + r) // (2 * r)
            last = tf.maximum(tf.minimum(last, height_width // r), first + 1)
            # libjpeg upsamples chroma at a cropped decode's right edge as at an image edge:
            # decoding up to _EDGE_CONTEXT more rows and columns, then dropping them, keeps
            # exactly the full decode's pixels.
            end = tf.minimum(last + _EDGE_CONTEXT, (height_width + r - 1) // r)
            window = tf.concat([first, end - first], 0)
            crop = tf.io.decode_and_crop_jpeg(
                encoded, window, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"
            )
            crop = crop[: last[0] - first[0], : last[1] - first[1]]
            crop.set_shape([None, None, 3])
            return crop

        return fn

    crop = tf.switch_case(index, [decode_at(r) for r in _DCT_SCALES])
    return _shrink_resize_normalize(crop, size)


def _shrink_resize_normalize(crop: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 window -> float32 [size, size, 3]: k x k mean filter while the window is at least
    twice the output, plain bicubic to `size`, clip, CLIP normalisation."""
    crop = tf.cast(crop, tf.float32)
    crop_size = tf.shape(crop)
    k = tf.maximum(tf.minimum(crop_size[0], crop_size[1]) // size, 1)
    crop = tf.cond(k > 1, lambda: area_shrink(crop, k), lambda: crop)
    resized = tf.image.resize(crop, [size, size], method="bicubic", antialias=False)
    # One multiply-add over full-shape constants: TF's CPU kernels broadcast a trailing 3 slowly.
    mul, add = _normalize_constants(size)
    out = tf.clip_by_value(resized, 0.0, 255.0) * mul + add
    out.set_shape([size, size, 3])
    return out


def area_shrink(image: tf.Tensor, k) -> tf.Tensor:
    """Mean over k x k blocks (trailing rows/columns that do not fill a block are dropped)."""
    h, w = tf.shape(image)[0] // k, tf.shape(image)[1] // k
    # Area resampling by a whole factor is exactly the block mean, and far faster on CPU than a
    # reduction over the blocks' axes.
    return tf.image.resize(image[: h * k, : w * k], tf.stack([h, w]), method="area")


@functools.lru_cache(maxsize=8)
def _normalize_constants(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(1 / (255 std), -mean / std) broadcast to [size, size, 3] float32."""
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    shape = (size, size, 3)
    return (
        np.broadcast_to(1.0 / (255.0 * std), shape).copy(),
        np.broadcast_to(-mean / std, shape).copy(),
    )
