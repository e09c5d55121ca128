"""The TFRecord schema of paired image-text shards (compatible with img2dataset's output).

Each record is a `tf.train.Example` with
  jpg    bytes   encoded image (JPEG or PNG)              required
  txt    bytes   UTF-8 caption(s)                         required: one, or a list (COCO's five)
  txt_*  bytes   named extra captions (e.g. txt_synthetic) optional: one or a list each
  key    bytes   sample id (images sharing a key are the same image, e.g. several captions)
  label  int64   class index                              optional (classification sets)
  tokens int64[] pre-tokenized CLIP ids (SOT ... EOT)     optional
Other features (img2dataset writes url, width, height, ...) are ignored.

A record's captions are all values of `txt` and of its `txt_*` fields (the *caption fields*).
Training picks one per record per epoch (`records.pick_caption`); evaluation uses them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

IMAGE = "jpg"
TEXT = "txt"
TEXT_PREFIX = "txt_"  # named caption fields: txt_synthetic, txt_original, ...
CAPTIONS = "captions"  # parsed: every caption of a record, field by field
CAPTION_FIELD = "caption_field"  # parsed: the caption field index of each of `captions`
KEY = "key"
LABEL = "label"
TOKENS = "tokens"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tfrecord"


Captions = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def is_caption_field(name: str) -> bool:
    """`txt` or a named caption field `txt_<name>`."""
    return name == TEXT or (name.startswith(TEXT_PREFIX) and len(name) > len(TEXT_PREFIX))


def caption_fields(caption: Captions) -> dict[str, list[str]]:
    """Captions as {field: [texts]}: a string or list is the `txt` field; a mapping names its
    fields (each `txt` or `txt_<name>`)."""
    if isinstance(caption, str):
        return {TEXT: [caption]}
    if isinstance(caption, Mapping):
        bad = [k for k in caption if not is_caption_field(k)]
        if bad:
            raise ValueError(f"caption fields {bad}: expected 'txt' or 'txt_<name>'")
        return {k: [v] if isinstance(v, str) else list(v) for k, v in caption.items()}
    return {TEXT: list(caption)}


def make_example(
    image: bytes,
    caption: Captions,
    key: str,
    label: int | None = None,
    tokens: Sequence[int] | None = None,
) -> bytes:
    """One serialized `tf.train.Example` in this schema; `caption` is one text, a list of them
    (all under `txt`) or {field: text or list} for named caption fields."""
    import tensorflow as tf

    def _bytes(*v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(v)))

    feature = {IMAGE: _bytes(image), KEY: _bytes(key.encode("utf-8"))}
    for field, texts in caption_fields(caption).items():
        feature[field] = _bytes(*(t.encode("utf-8") for t in texts))
    if label is not None:
        feature[LABEL] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    if tokens is not None:
        feature[TOKENS] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(tokens)))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def example_features(serialized: bytes) -> dict[str, str]:
    """Feature name -> kind ('bytes' | 'int64' | 'float') of one serialized Example."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    return {
        name: f.WhichOneof("kind").replace("_list", "")
        for name, f in example.features.feature.items()
    }
