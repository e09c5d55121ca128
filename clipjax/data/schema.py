"""The TFRecord schema of paired image-text shards (compatible with img2dataset's output).

Each record is a `tf.train.Example` with
  jpg    bytes   encoded image (JPEG or PNG)              required
  txt    bytes   UTF-8 caption                            required
  key    bytes   sample id (images sharing a key are the same image, e.g. several captions)
  label  int64   class index                              optional (classification sets)
  tokens int64[] pre-tokenized CLIP ids (SOT ... EOT)     optional
Other features (img2dataset writes url, width, height, ...) are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE = "jpg"
TEXT = "txt"
KEY = "key"
LABEL = "label"
TOKENS = "tokens"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tfrecord"


def make_example(
    image: bytes,
    caption: str,
    key: str,
    label: int | None = None,
    tokens: Sequence[int] | None = None,
) -> bytes:
    """One serialized `tf.train.Example` in this schema."""
    import tensorflow as tf

    def _bytes(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        IMAGE: _bytes(image),
        TEXT: _bytes(caption.encode("utf-8")),
        KEY: _bytes(key.encode("utf-8")),
    }
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
