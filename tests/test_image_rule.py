"""One image-conversion rule (clipjax.data.image.to_rgb) on every path: the shard writer (then
tf.data decode + eval transform), `preprocess` (eval on folders/tfds, search, clipjax.load) and
tf `decode_image` + `eval_transform` on the raw bytes; bounded memory for extreme aspect ratios."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipjax.data import image as image_lib

tf = pytest.importorskip("tensorflow")

from clipjax.data import transforms as T  # noqa: E402
from clipjax.data import writer  # noqa: E402
from clipjax.data.eval_pipeline import EvalPipeline  # noqa: E402

SIZE = 32
LEVEL = np.float32(image_lib.CLIP_STD) * 255.0  # one pixel level in normalised units, per channel
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth(h, w, seed=0, channels=3):
    """A smooth photo-like uint8 image [h, w, channels] (JPEG re-encoding barely changes it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "RGBA"
    return np.asarray(Image.fromarray(coarse, mode).resize((w, h), Image.Resampling.BILINEAR))


def encode(pil, fmt, **kw):
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba():
    pixels = smooth(48, 40, seed=1, channels=4).copy()
    pixels[..., 3] = np.linspace(0, 255, 40).astype(np.uint8)[None, :]  # clear .. opaque
    pixels[:10, :, 3] = 0  # a fully transparent band: white on every path
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def _la():
    grey = smooth(40, 44, seed=2)[..., 0]
    alpha = np.linspace(0, 255, 40).astype(np.uint8)[:, None].repeat(44, 1)
    return encode(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG")


def _palette_transparent():
    pal = Image.fromarray(smooth(40, 40, seed=3)).quantize(16)
    index = np.asarray(pal).copy()
    index[:, :12] = 0
    pal = Image.fromarray(index, "P")
    pal.putpalette(Image.fromarray(smooth(40, 40, seed=3)).quantize(16).getpalette())
    return encode(pal, "PNG", transparency=0)


def _ramp16():
    ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
    return encode(Image.fromarray(ramp), "PNG")  # mode I;16


def _float():
    ramp = np.linspace(0.0, 1.0, 40 * 36, dtype=np.float32).reshape(36, 40)
    return encode(Image.fromarray(ramp, "F"), "TIFF")


def _cmyk():
    return encode(Image.fromarray(smooth(40, 36, seed=4)).convert("CMYK"), "JPEG", quality=95)


def _exif_rotated():
    """A 60x40 (w x h) JPEG whose EXIF says 'rotate 90 CW': upright it is 40 wide, 60 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(smooth(40, 60, seed=5)), "JPEG", quality=95, exif=exif)


def _line(w, h):
    return encode(Image.fromarray(smooth(max(h, 8), max(w, 8), seed=6)[:h, :w]), "PNG")


KINDS = {
    "rgba": _rgba,
    "la": _la,
    "p_transparency": _palette_transparent,
    "i16_ramp": _ramp16,
    "float": _float,
    "cmyk": _cmyk,
    "exif_rotated": _exif_rotated,
    "wide_2000x1": lambda: _line(2000, 1),
    "tall_1x2000": lambda: _line(1, 2000),
}
TF_DECODES = {"rgba", "la", "p_transparency", "i16_ramp", "cmyk", "wide_2000x1", "tall_1x2000"}


def levels(normalised):
    return normalised * LEVEL + np.float32(image_lib.CLIP_MEAN) * 255.0


def via_preprocess(data):
    return image_lib.preprocess(Image.open(io.BytesIO(data)), SIZE)


def via_tf(data):
    return T.eval_transform(T.decode_image(tf.constant(data)), SIZE).numpy()


@pytest.fixture(scope="module")
def via_shards(tmp_path_factory):
    """Every kind written by the shard writer, read back by the tf.data eval pipeline."""
    out = str(tmp_path_factory.mktemp("shards"))
    items = [
        writer.SourceItem(key=name, origin=name, caption="x", read=make)
        for name, make in KINDS.items()
    ]
    manifest = writer.write_shards(
        items, out, source={"kind": "test"}, progress=False, shuffle_seed=None
    )
    assert manifest["num_examples"] == len(KINDS) and manifest["num_skipped"] == 0
    pipeline = EvalPipeline(
        os.path.join(out, "*.tfrecord"), global_batch=len(KINDS), image_size=SIZE
    )
    got = {}
    for batch in pipeline:
        for key, image, real in zip(batch["key"], batch["image"], batch["mask"]):
            if real:
                got[key] = image
    return got


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_path_agrees(kind, via_shards):
    data = KINDS[kind]()
    reference = levels(via_preprocess(data))
    # writer -> shard -> tf decode + eval transform: the stored pixels exactly as PIL reads them,
    shard = levels(via_shards[kind])
    stored = levels(via_preprocess(writer.encode_image(data)))
    assert np.abs(shard - stored).max() <= 2.01
    # and those, where the writer converted, are the rule's pixels up to JPEG (q95) error
    assert np.abs(shard - reference).mean() < 3.5, np.abs(shard - reference).mean()
    if kind in TF_DECODES:  # tf decode of the raw bytes: the same pixels up to resampling rounding
        direct = np.abs(levels(via_tf(data)) - reference)
        assert direct.max() <= 2.01 and (direct > 0.5).mean() < 0.02, direct.max()


def test_rule_values():
    """What the rule gives, not only that paths agree."""
    ramp = image_lib.to_rgb(Image.open(io.BytesIO(_ramp16())))
    assert ramp.mode == "RGB" and abs(np.asarray(ramp).mean() - 127.5) < 1.0  # today: ~254
    assert np.asarray(ramp)[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(ramp)[-1, -1].tolist() == [255, 255, 255]
    flt = np.asarray(image_lib.to_rgb(Image.open(io.BytesIO(_float()))))
    assert flt[0, 0, 0] == 0 and flt[-1, -1, 0] == 255 and abs(flt.mean() - 127.5) < 1.0
    for make in (_rgba, _la, _palette_transparent):
        im = Image.open(io.BytesIO(make()))
        out = np.asarray(image_lib.to_rgb(im))
        clear = np.asarray(im.convert("RGBA"))[..., 3] == 0
        assert clear.any() and (out[clear] == 255).all()  # transparent -> the white background
    rgba = np.asarray(Image.open(io.BytesIO(_rgba())).convert("RGBA"))
    out = np.asarray(image_lib.to_rgb(Image.fromarray(rgba, "RGBA"))).astype(np.float64)
    a = rgba[..., 3:] / 255.0
    np.testing.assert_allclose(out, rgba[..., :3] * a + 255 * (1 - a), atol=0.51)
    upright = image_lib.to_rgb(Image.open(io.BytesIO(_exif_rotated())))
    assert upright.size == (40, 60)
    cmyk = Image.open(io.BytesIO(_cmyk()))
    np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(cmyk)), cmyk.convert("RGB"))
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    assert image_lib.to_rgb(rgb) is rgb


@pytest.mark.parametrize(
    "values, mode, expect",
    [
        ([0, 100, 255], "I", [0, 100, 255]),  # 8-bit values in an int container: kept
        ([0, 32896, 65535], "I", [0, 128, 255]),  # 16-bit range: by bit depth
        ([-10, 0, 10], "I", [0, 128, 255]),  # anything else: min..max
        ([0.0, 0.5, 1.0], "F", [0, 128, 255]),
        ([0.0, 100.0, 255.0], "F", [0, 100, 255]),
        ([-1.0, 0.0, 3.0], "F", [0, 64, 255]),
    ],
)
def test_scale_to_8bit(values, mode, expect):
    dtype = np.int32 if mode == "I" else np.float32
    im = Image.fromarray(np.asarray([values], dtype), mode)
    assert image_lib.scale_to_8bit(im)[0].tolist() == expect


def test_exif_rotation_applied_by_writer_and_preprocess():
    data = _exif_rotated()
    stored_pixels = np.asarray(Image.open(io.BytesIO(data)))
    upright = Image.fromarray(np.rot90(stored_pixels, k=-1).copy())  # 90 degrees clockwise
    assert upright.size == (40, 60)
    expected = image_lib.preprocess(upright, SIZE)
    np.testing.assert_array_equal(via_preprocess(data), expected)
    stored = Image.open(io.BytesIO(writer.encode_image(data)))
    assert stored.size == (40, 60) and stored.getexif().get(0x0112, 1) == 1


def test_writer_keeps_plain_images_and_converts_transparent_ones():
    plain = encode(Image.fromarray(smooth(20, 30)), "PNG")
    assert writer.encode_image(plain) == plain
    trns = encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG", transparency=(10, 20, 30))
    out = Image.open(io.BytesIO(writer.encode_image(trns)))
    assert out.format == "JPEG" and np.asarray(out).min() > 250  # transparent colour -> white


def _old_preprocess(image, size):
    """Today's preprocess with its two resampling passes made explicit (width, then height)."""
    image = image.convert("RGB")
    width, height = image.size
    new_w, new_h = image_lib.resize_shape(width, height, size)
    if new_w != width:
        image = image.resize((new_w, height), Image.Resampling.BICUBIC)
    if new_h != height:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    return (pixels - np.float32(image_lib.CLIP_MEAN)) / np.float32(image_lib.CLIP_STD)


def test_windowed_resize_unchanged_for_normal_and_close_for_extreme_aspect():
    rng = np.random.default_rng(7)
    shapes = [(64, 48), (48, 64), (100, 30), (30, 100), (37, 37), (20, 300), (300, 20), (3, 500)]
    for h, w in shapes:
        pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours, old = image_lib.preprocess(pil, SIZE), _old_preprocess(pil, SIZE)
        if max(h, w) <= image_lib.WINDOW_ABOVE * min(h, w):
            np.testing.assert_array_equal(ours, old)
        else:  # the windowed pass: PIL's float source box can move a value across a .5
            diff = np.abs(levels(ours) - levels(old))
            assert diff.max() <= 2.01 and (diff > 0.5).mean() < 0.01


@pytest.mark.parametrize("shape", [(1, 10000), (10000, 1)])
def test_preprocess_memory_bounded(shape, monkeypatch):
    """No resampled intermediate larger than WINDOW_ABOVE output squares (today: a 2240000 x 224
    image, ~1.4 GiB, for 10000 x 1 at 224)."""
    sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(size[0] * size[1])
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    pil = Image.fromarray(np.full(shape + (3,), 90, np.uint8))
    out = image_lib.preprocess(pil, 224)
    assert out.shape == (224, 224, 3) and sizes
    assert max(sizes) <= image_lib.WINDOW_ABOVE * 224 * 224


TF_MEMORY = """
import resource, sys
import numpy as np, tensorflow as tf
from clipjax.data import transforms as T
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
T.eval_transform(tf.constant(np.zeros((300, 200, 3), np.uint8)), 224).numpy()
before = peak()
for shape in [(1, 10000, 3), (10000, 1, 3)]:
    out = T.eval_transform(tf.constant(np.full(shape, 90, np.uint8)), 224).numpy()
    assert out.shape == (224, 224, 3)
print(peak() - before)
"""


def test_tf_eval_transform_memory_bounded():
    """Peak RSS growth in a fresh process (the full resize would need ~6 GiB of float32)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", TF_MEMORY], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 256
