"""Parsing and filtering serialized records, and tokenizing their captions (train and eval).

Records are parsed with defaults, so one missing a feature is filtered out (and counted by the
pipelines), not an error. A record's captions (every value of its caption fields, see `schema`)
are parsed as a list; `txt` holds the first until `pick_caption` chooses one.
"""

from __future__ import annotations

from clipjax.data import schema
from clipjax.data.shards import ShardInfo


def parse_record(serialized, info: ShardInfo):
    """Parse with defaults so a record missing a feature is filtered out, not an error."""
    import tensorflow as tf

    spec = {
        schema.IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
        schema.KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    for field in info.caption_fields:
        spec[field] = tf.io.VarLenFeature(tf.string)
    if info.has_label:
        spec[schema.LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    if info.has_tokens:
        spec[schema.TOKENS] = tf.io.VarLenFeature(tf.int64)
    ex = tf.io.parse_single_example(serialized, spec)
    if info.has_tokens:
        ex[schema.TOKENS] = tf.sparse.to_dense(ex[schema.TOKENS])
    texts = [ex.pop(field).values for field in info.caption_fields]
    ex[schema.CAPTIONS] = tf.concat(texts, 0)
    ex[schema.CAPTION_FIELD] = tf.concat([tf.fill(tf.shape(t), i) for i, t in enumerate(texts)], 0)
    ex[schema.TEXT] = tf.concat([ex[schema.CAPTIONS], [""]], 0)[0]  # the first caption, or ""
    return ex


def parse_caption_ratio(spec: str) -> dict[str, float] | None:
    """'txt=0.7,txt_synthetic=0.3' -> {field: weight} (None for ''); ValueError naming the
    problem otherwise (a field not `txt`/`txt_<name>`, a weight not a positive number)."""
    if not spec or not spec.strip():
        return None
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not schema.is_caption_field(name) or not weight > 0 or weight == float("inf"):
            raise ValueError(
                f"caption ratio {spec!r}: bad entry {part.strip()!r}; expected comma-separated "
                "FIELD=WEIGHT with FIELD 'txt' or 'txt_<name>' and WEIGHT a positive number"
            )
        if name in out:
            raise ValueError(f"caption ratio {spec!r}: field {name!r} given twice")
        out[name] = weight
    return out


def caption_weights(info: ShardInfo, ratio: dict[str, float] | None) -> list[float] | None:
    """Per caption field weights for `pick_caption` from {field: weight} (None: every caption
    of a record equally likely). Fields the ratio leaves out are never picked."""
    if not ratio:
        return None
    unknown = sorted(set(ratio) - set(info.caption_fields))
    if unknown:
        raise ValueError(
            f"caption ratio names {unknown}, which the shards' first records lack; their "
            f"caption fields are {list(info.caption_fields)}"
        )
    return [float(ratio.get(field, 0.0)) for field in info.caption_fields]


def pick_caption(ex: dict, seed, field_weights: list[float] | None = None) -> dict:
    """Put one of the record's captions under `txt`, drawn with the stateless `seed` ([2] ints):
    uniformly, or a field by `field_weights` (renormalised over the fields the record has), then
    a caption of that field uniformly. "" (an unusable record) if no caption can be drawn."""
    import tensorflow as tf

    captions, field = ex[schema.CAPTIONS], ex[schema.CAPTION_FIELD]
    n = tf.size(captions)
    if field_weights is None:
        w = tf.ones([n], tf.float32)
    else:
        fw = tf.constant(field_weights, tf.float32)
        per_field = tf.math.bincount(
            field, minlength=len(field_weights), maxlength=len(field_weights), dtype=tf.float32
        )
        w = tf.gather(fw, field) / tf.maximum(tf.gather(per_field, field), 1.0)
    total = tf.reduce_sum(w)
    u = tf.random.stateless_uniform([], seed=seed) * total
    idx = tf.minimum(tf.searchsorted(tf.cumsum(w), [u], side="right")[0], n - 1)
    idx = tf.where(total > 0, idx, n)  # n: the "" appended below
    return ex | {schema.TEXT: tf.gather(tf.concat([captions, [""]], 0), idx)}


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
