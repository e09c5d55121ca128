"""Parsing and filtering serialized records, and tokenizing their captions (train and eval).

Records are parsed with defaults, so one missing a feature is filtered out (and counted by the
pipelines), not an error.
"""

from __future__ import annotations

from clipjax.data import schema
from clipjax.data.shards import ShardInfo


def parse_record(serialized, info: ShardInfo):
    """Parse with defaults so a record missing a feature is filtered out, not an error."""
    import tensorflow as tf

    spec = {
        schema.IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
        schema.TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        schema.KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if info.has_label:
        spec[schema.LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    if info.has_tokens:
        spec[schema.TOKENS] = tf.io.VarLenFeature(tf.int64)
    ex = tf.io.parse_single_example(serialized, spec)
    if info.has_tokens:
        ex[schema.TOKENS] = tf.sparse.to_dense(ex[schema.TOKENS])
    return ex


def usable(ex, info: ShardInfo):
    """True for records with an image, a non-empty valid UTF-8 caption (and label/tokens)."""
    import tensorflow as tf

    txt = ex[schema.TEXT]
    # Transcoding replaces invalid bytes by U+FFFD, so it is the identity exactly on valid UTF-8.
    valid = tf.equal(
        tf.strings.unicode_transcode(
            txt, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        ),
        txt,
    )
    ok = (
        (tf.strings.length(ex[schema.IMAGE]) > 0)
        & valid
        & (tf.strings.length(tf.strings.strip(txt)) > 0)
    )
    if info.has_label:
        ok &= ex[schema.LABEL] >= 0
    if info.has_tokens:
        ok &= tf.size(ex[schema.TOKENS]) > 0
    return ok


def optional_fields(ex: dict, info, context_length: int) -> dict:
    """The label and pre-tokenized ids of a parsed record, where the shards have them."""
    import tensorflow as tf

    out = {}
    if info.has_label:
        out["label"] = tf.cast(ex[schema.LABEL], tf.int32)
    if info.has_tokens:
        out[schema.TOKENS] = fit_tokens(ex[schema.TOKENS], context_length)
    return out


def fit_tokens(ids, context_length: int):
    """Pre-tokenized ids -> int32 [L]: zero-padded, or truncated keeping the end token last."""
    import tensorflow as tf

    from clipjax.data.tokenizer import EOT_ID

    ids = tf.cast(ids, tf.int32)
    n = tf.size(ids)
    truncated = tf.concat([ids[: context_length - 1], [EOT_ID]], 0)
    padded = tf.pad(ids, [[0, tf.maximum(context_length - n, 0)]])
    out = tf.cond(n > context_length, lambda: truncated, lambda: padded[:context_length])
    return tf.ensure_shape(out, [context_length])


def tokenize_batch(batch, context_length: int, info: ShardInfo):
    """Put int32 ids [b, L] under 'text': the shards' own tokens, else the tokenized captions."""
    from clipjax.data.tokenizer import tokenize_tf

    if info.has_tokens:
        batch["text"] = batch.pop(schema.TOKENS)
    else:
        batch["text"] = tokenize_tf(batch[schema.TEXT], context_length)
    return batch


def dataset_options(threads: int | None):
    """Deterministic tf.data options; `threads` caps the private thread pool (None: TF's)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    if threads is not None:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options


def traced(fn):
    """`fn` for Dataset.map / filter / interleave, traced as written: these functions are plain
    TensorFlow ops, and AutoGraph's conversion of their source costs seconds at every pipeline's
    start (about half the time to a training run's first batch)."""
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)
