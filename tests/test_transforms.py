"""Image decoding and the CLIP eval/train transforms (tf ops) against PIL and their contracts."""

import io

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from clipjax.data import image as image_lib  # noqa: E402
from clipjax.data import transforms as T  # noqa: E402

MEAN = np.float32(image_lib.CLIP_MEAN)
STD = np.float32(image_lib.CLIP_STD)


def smooth_image(rng, height, width):
    """A photo-like image: blurred random blocks plus pixel noise, uint8 [H, W, 3]."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    noisy = image.astype(np.int32) + rng.integers(-20, 21, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(pil_image, fmt):
    buffer = io.BytesIO()
    pil_image.save(buffer, format=fmt)
    return buffer.getvalue()


def to_levels(normalised):
    """Back from CLIP-normalised values to 0..255 pixel levels."""
    return (normalised * STD + MEAN) * 255.0


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P"])
def test_decode_png_modes_match_pil_convert_rgb(mode):
    rng = np.random.default_rng(0)
    pil = Image.fromarray(smooth_image(rng, 37, 52)).convert(mode)
    decoded = T.decode_image(tf.constant(encode(pil, "PNG")))
    assert decoded.dtype == tf.uint8 and decoded.shape.as_list() == [37, 52, 3]
    np.testing.assert_array_equal(decoded.numpy(), np.asarray(pil.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_jpeg_matches_pil_exactly(mode):
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(smooth_image(rng, 40, 30)).convert(mode), "JPEG")
    decoded = T.decode_image(tf.constant(data))
    assert decoded.shape.as_list() == [40, 30, 3] and decoded.dtype == tf.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decoded.numpy(), reference)


def test_decode_in_tf_data_mixed_formats():
    rng = np.random.default_rng(6)
    pils = [Image.fromarray(smooth_image(rng, 20, 24)).convert(m) for m in ("RGB", "L", "RGBA")]
    data = [encode(pils[0], "JPEG"), encode(pils[1], "PNG"), encode(pils[2], "GIF")]
    ds = tf.data.Dataset.from_tensor_slices(data).map(T.decode_image)
    assert ds.element_spec.shape.as_list() == [None, None, 3]
    for got, raw in zip(ds.as_numpy_iterator(), data):
        np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def test_decode_corrupt_bytes_raise():
    with pytest.raises(tf.errors.InvalidArgumentError):
        T.decode_image(tf.constant(b"\xff\xd8 definitely not a jpeg"))


@pytest.mark.parametrize("shape", [(90, 120), (150, 101), (64, 64), (65, 64), (33, 40), (41, 300)])
def test_eval_transform_matches_pil_reference(shape):
    """Tolerance: PIL resamples with 22-bit fixed-point weights and rounds halves up; we use float
    weights, so a value within ~1e-3 of a .5 boundary may land one level (rarely two, when
    upsampling) away. Anything systematic (kernel, crop offset, pass order) breaks both bounds."""
    rng = np.random.default_rng(sum(shape))
    for image in (smooth_image(rng, *shape), rng.integers(0, 256, (*shape, 3)).astype(np.uint8)):
        ours = T.eval_transform(tf.constant(image), 64)
        assert ours.dtype == tf.float32 and ours.shape.as_list() == [64, 64, 3]
        reference = image_lib.preprocess(Image.fromarray(image), 64)
        assert reference.dtype == np.float32 and reference.shape == (64, 64, 3)
        diff = np.abs(to_levels(ours.numpy()) - to_levels(reference))
        assert diff.max() <= 2.01
        assert (diff > 0.5).mean() < 0.01


def test_center_crop_offsets_and_normalisation():
    """No resize needed (short side == size): the crop is exact, offsets round halves to even."""
    height, width, size = 8, 13, 8  # (13 - 8) / 2 = 2.5 -> 2 (round half to even, as torchvision)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width)[None, :] * 10
    image[..., 1] = np.arange(height)[:, None] * 20
    image[..., 2] = 200
    for out in (
        T.eval_transform(image, size).numpy(),
        image_lib.preprocess(Image.fromarray(image), size),
    ):
        expected = (image[:, 2:10].astype(np.float32) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(out, expected, atol=1e-5)
    tall = np.transpose(image, (1, 0, 2)).copy()
    np.testing.assert_allclose(
        T.eval_transform(tall, size).numpy(),
        np.transpose(T.eval_transform(image, size).numpy(), (1, 0, 2)),
        atol=1e-6,
    )


def test_eval_transform_in_tf_data_with_unknown_shapes():
    rng = np.random.default_rng(2)
    encoded = [
        encode(Image.fromarray(smooth_image(rng, h, w)), "PNG") for h, w in [(40, 50), (70, 33)]
    ]
    ds = tf.data.Dataset.from_tensor_slices(encoded)
    ds = ds.map(lambda b: T.eval_transform(T.decode_image(b), 32)).batch(2)
    assert ds.element_spec.shape.as_list() == [None, 32, 32, 3]
    batch = next(iter(ds)).numpy()
    for got, data in zip(batch, encoded):
        expected = image_lib.preprocess(Image.open(io.BytesIO(data)), 32)
        assert np.abs(to_levels(got) - to_levels(expected)).max() <= 2.01


def test_train_transform_deterministic_in_seed_and_varies_across_seeds():
    rng = np.random.default_rng(3)
    image = tf.constant(smooth_image(rng, 80, 120))
    seed = tf.constant([7, 11], tf.int32)
    first = T.train_transform(image, 48, seed, crop_scale=(0.3, 1.0))
    again = T.train_transform(image, 48, seed, crop_scale=(0.3, 1.0))
    assert first.dtype == tf.float32 and first.shape.as_list() == [48, 48, 3]
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    others = [
        T.train_transform(image, 48, tf.constant([7, s]), crop_scale=(0.3, 1.0)).numpy()
        for s in range(12, 17)
    ]
    assert all(not np.allclose(o, first.numpy()) for o in others)
    levels = to_levels(first.numpy())
    assert levels.min() >= -1e-3 and levels.max() <= 255.0 + 1e-3

    # Inside tf.data with per-element stateless seeds: the same on every pass.
    ds = (
        tf.data.Dataset.from_tensors(image)
        .repeat(4)
        .enumerate()
        .map(lambda i, x: T.train_transform(x, 16, tf.stack([tf.cast(i, tf.int32), 0])))
    )
    assert ds.element_spec.shape.as_list() == [16, 16, 3]
    np.testing.assert_array_equal(
        np.stack(list(ds.as_numpy_iterator())), np.stack(list(ds.as_numpy_iterator()))
    )


def test_crop_box_respects_scale_and_ratio():
    shape = tf.constant([90, 160, 3])
    for s in range(40):
        begin, size = T.random_resized_crop_box(
            shape, tf.constant([s, 3]), crop_scale=(0.5, 0.8), ratio=(0.75, 1.33)
        )
        (top, left, _), (h, w, c) = begin.numpy(), size.numpy()
        assert c == -1 and 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        whole = (h, w) == (90, 160)  # the fallback after 10 failed tries
        assert whole or (0.5 - 0.02 <= h * w / (90 * 160) <= 0.8 + 0.02)
        assert whole or 0.75 - 0.05 <= w / h <= 1.33 + 0.05


def antialiased_reference(image, size, seed, scale):
    """Random resized crop by an antialiased bicubic resize of the whole window (the costly
    textbook transform `train_transform` approximates)."""
    begin, crop_size = T.random_resized_crop_box(tf.shape(image), seed, scale)
    window = tf.slice(image, begin, crop_size)
    return T.normalize(
        tf.clip_by_value(
            tf.image.resize(window, [size, size], method="bicubic", antialias=True), 0.0, 255.0
        )
    )


def test_train_transform_is_area_shrink_then_bicubic_of_its_crop_box():
    rng = np.random.default_rng(4)
    image = tf.constant(smooth_image(rng, 50, 70))
    seed = tf.constant([1, 2])
    begin, size = T.random_resized_crop_box(tf.shape(image), seed, (0.5, 0.9))
    crop = tf.cast(tf.slice(image, begin, size), tf.float32)
    k = max(1, int(min(size[0], size[1])) // 12)
    assert k > 1  # the shrink path
    shrunk = crop[: size[0] // k * k, : size[1] // k * k].numpy()
    shrunk = shrunk.reshape(shrunk.shape[0] // k, k, shrunk.shape[1] // k, k, 3).mean(axis=(1, 3))
    expected = tf.clip_by_value(tf.image.resize(shrunk, [12, 12], "bicubic"), 0, 255)
    got = T.train_transform(image, 12, seed, crop_scale=(0.5, 0.9))
    np.testing.assert_allclose(to_levels(got.numpy()), expected.numpy(), atol=1e-3)


def test_full_crop_is_block_mean():
    image = smooth_image(np.random.default_rng(5), 60, 60)
    got = T.train_transform(
        tf.constant(image), 30, tf.constant([0, 0]), crop_scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    expected = image.astype(np.float32).reshape(30, 2, 30, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(to_levels(got.numpy()), expected, atol=1e-3)


def _smooth_jpeg(h, w, seed) -> bytes:
    low = np.random.default_rng(seed).uniform(0, 255, (3, 4, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(low).resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(20, 18), (70, 90)])  # crop < 2x output, and >= 2x (shrink)
def test_train_transform_close_to_antialiased_resize(shape):
    for i in range(3):
        image = T.decode_image(tf.constant(_smooth_jpeg(*shape, seed=i)))
        seed = tf.constant([i, 11], tf.int32)
        ours = T.train_transform(image, 16, seed, crop_scale=(0.5, 1.0)).numpy()
        np.testing.assert_array_equal(ours, T.train_transform(image, 16, seed, (0.5, 1.0)).numpy())
        ref = antialiased_reference(image, 16, seed, (0.5, 1.0)).numpy()
        assert ours.shape == ref.shape == (16, 16, 3) and ours.std() > 0.1
        # The shrink path drops the < k trailing rows/columns of the window (a slightly smaller
        # crop): against an antialiased resize of that same window the pixels agree within
        # ~1 grey level, and against the full window within ~7.
        begin, size = T.random_resized_crop_box(tf.shape(image), seed, (0.5, 1.0))
        k = max(1, int(min(size[0], size[1])) // 16)
        window = tf.slice(image, begin, size)[: size[0] // k * k, : size[1] // k * k]
        same_window = T.normalize(
            tf.clip_by_value(
                tf.image.resize(window, [16, 16], method="bicubic", antialias=True), 0.0, 255.0
            )
        ).numpy()
        assert np.abs(ours - same_window).mean() < 0.015, np.abs(ours - same_window).mean()
        assert np.abs(ours - ref).mean() < 0.1, np.abs(ours - ref).mean()
    other = T.train_transform(image, 16, tf.constant([99, 11], tf.int32), crop_scale=(0.5, 1.0))
    assert not np.array_equal(other.numpy(), ours)


def test_area_shrink_and_fused_normalisation():
    x = np.random.default_rng(0).uniform(0, 255, (7, 9, 3)).astype(np.float32)
    want = x[:6, :9].reshape(2, 3, 3, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(T.area_shrink(tf.constant(x), 3).numpy(), want, rtol=1e-6)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, format="PNG")
    image = T.decode_image(tf.constant(buf.getvalue()))
    out = T.train_transform(image, 8, tf.constant([1, 2], tf.int32)).numpy()
    expect = (np.float32([200, 100, 50]) / 255 - MEAN) / STD
    np.testing.assert_allclose(out, np.broadcast_to(expect, out.shape), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="uint8 image"):
        T.eval_transform(tf.zeros([8, 8, 3], tf.float32), 4)
    with pytest.raises(ValueError, match="uint8 image"):
        T.train_transform(tf.zeros([8, 8], tf.uint8), 4, tf.constant([0, 0]))
    with pytest.raises(ValueError, match="size must be a positive int"):
        T.eval_transform(tf.zeros([8, 8, 3], tf.uint8), 0)
    with pytest.raises(ValueError, match="seed must be"):
        T.train_transform(tf.zeros([8, 8, 3], tf.uint8), 4, tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match="scale"):
        T.train_transform(
            tf.zeros([8, 8, 3], tf.uint8), 4, tf.constant([0, 0]), crop_scale=(0.9, 0.5)
        )
    with pytest.raises(TypeError, match="PIL"):
        image_lib.preprocess(np.zeros((8, 8, 3), np.uint8), 4)


# -- decode_train_transform: decoding only the crop (and at DCT scale) ----------------------------


def _photo_jpeg(height, width, seed, mode="RGB", **save):
    """A smooth photo-like JPEG (a blurred colour field) in `mode`."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (5, 6, 3)).astype(np.uint8)
    pil = Image.fromarray(low).resize((width, height), Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _full_decode(data, size, seed, crop_scale=(0.9, 1.0)):
    return T.train_transform(T.decode_image(tf.constant(data)), size, seed, crop_scale)


@pytest.mark.parametrize(
    "mode,save", [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})]
)
def test_jpeg_crop_decode_equals_full_decode_below_twice_the_output(mode, save):
    """A crop short side < 2 x size (no DCT scaling): exactly the full decode's pixels."""
    data = _photo_jpeg(61, 83, seed=3, mode=mode, **save)
    for i in range(4):
        seed = tf.constant([i, 7], tf.int32)
        got = T.decode_train_transform(tf.constant(data), 40, seed, crop_scale=(0.5, 1.0))
        assert got.shape.as_list() == [40, 40, 3] and got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy(), _full_decode(data, 40, seed, (0.5, 1.0)))


@pytest.mark.parametrize("shape,size", [((150, 200), 32), ((300, 260), 32), ((200, 250), 90)])
def test_jpeg_dct_scaled_decode_is_the_block_mean_of_its_window(shape, size):
    """A crop >= 2r x the output decodes at 1/r scale (r = 2, 4, 8): the box's edges rounded to
    whole r-pixel blocks, libjpeg's scaled IDCT in place of the r x r mean of the full decode
    (within about a grey level), the rest as `train_transform`."""
    for i in range(3):
        data = _photo_jpeg(*shape, seed=i)
        image = T.decode_image(tf.constant(data))
        seed = tf.constant([i, 5], tf.int32)
        got = T.decode_train_transform(tf.constant(data), size, seed).numpy()
        begin, box = T.random_resized_crop_box(tf.shape(image), seed)
        begin, box = begin.numpy()[:2], box.numpy()[:2]
        r = max(x for x in (1, 2, 4, 8) if x <= min(box) // size)
        assert r > 1
        first, last = (2 * begin + r) // (2 * r), (2 * (begin + box) + r) // (2 * r)
        last = np.minimum(last, np.array(shape) // r)  # whole blocks only
        window = tf.cast(image[first[0] * r : last[0] * r, first[1] * r : last[1] * r], tf.float32)
        block_mean = tf.cast(tf.round(T.area_shrink(window, r)), tf.uint8)
        expected = T._shrink_resize_normalize(block_mean, size).numpy()
        levels = np.abs(to_levels(got) - to_levels(expected))
        assert levels.mean() < 1.0 and levels.max() < 8.0, (levels.mean(), levels.max())
        # Against the full decode's transform: the moved edges (<= r / 2 pixels, up to half an
        # output pixel at these tiny sizes) dominate; at 224 from photos it is ~0.5 levels.
        full = _full_decode(data, size, seed).numpy()
        assert not np.array_equal(got, full)
        assert np.abs(to_levels(got) - to_levels(full)).mean() < 8.0


def test_non_jpeg_and_unfinished_jpeg_bytes_take_the_full_decode():
    """PNG (by the decode_image rule, alpha composited) and a JPEG with bytes after its end
    marker give exactly the full decode's transform, also where a JPEG would be DCT-scaled."""
    rgba = np.dstack([smooth_image(np.random.default_rng(8), 120, 140), np.full((120, 140), 90)])
    png = encode(Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG")
    trailing = _photo_jpeg(150, 200, seed=1) + b"trailing bytes"
    for data in (png, trailing):
        seed = tf.constant([3, 4], tf.int32)
        got = T.decode_train_transform(tf.constant(data), 32, seed)
        np.testing.assert_array_equal(got.numpy(), _full_decode(data, 32, seed).numpy())


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_or_corrupt_jpeg_raises_even_if_the_crop_is_whole(cut):
    """A JPEG cut short raises (pipelines skip and count it) though the part the crop needs may
    be intact: a partial decode cannot tell, so such bytes take the full decode."""
    data = _photo_jpeg(300, 400, seed=2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        T.decode_train_transform(tf.constant(data[: int(len(data) * cut)]), 32, tf.constant([0, 1]))
    for bad in (b"\xff\xd8\xff not a jpeg \xff\xd9", b"", b"\xff"):
        with pytest.raises(tf.errors.InvalidArgumentError):
            T.decode_train_transform(tf.constant(bad), 32, tf.constant([0, 1]))


def test_decode_train_transform_in_tf_data_and_bad_arguments():
    data = [_photo_jpeg(150, 200, seed=0), _photo_jpeg(40, 50, seed=1, mode="L")]
    ds = tf.data.Dataset.from_tensor_slices(data).map(
        lambda d: T.decode_train_transform(d, 24, tf.constant([1, 2], tf.int32))
    )
    assert ds.element_spec.shape.as_list() == [24, 24, 3]
    assert all(np.isfinite(x).all() and x.std() > 0.01 for x in ds.as_numpy_iterator())
    with pytest.raises(ValueError, match="seed must be"):
        T.decode_train_transform(tf.constant(data[0]), 24, tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match="size must be a positive int"):
        T.decode_train_transform(tf.constant(data[0]), 0, tf.constant([1, 2]))
    with pytest.raises(ValueError, match="scale"):
        T.decode_train_transform(tf.constant(data[0]), 8, tf.constant([1, 2]), crop_scale=(2, 3))
