"""Token-wise (FILIP-style) similarity and its softmax InfoNCE: reference and gathered.

For an image i (patch tokens p_n) and a text t (real tokens w_l):
  i2t(i, t) = mean_n max_l <p_n, w_l>,   t2i(i, t) = mean_l max_n <p_n, w_l>  (padding masked).
mode 'filip': image->text logits use i2t, text->image logits use t2i (as in FILIP);
mode 'mean': both directions use (i2t + t2i) / 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax.losses.common import BATCH_AXES, as_axes, batch_axis_size, check_divisible

MODES = ("filip", "mean")


def token_similarity(
    img_tokens: jax.Array, txt_tokens: jax.Array, txt_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(i2t, t2i) similarities [Bi, Bt] of every image against every text."""
    tok = jnp.einsum("ind,tld->itnl", img_tokens, txt_tokens)  # [Bi, Bt, N, L]
    mask = txt_mask[None, :, None, :]
    best_word = jnp.where(mask, tok, -jnp.inf).max(-1)  # [Bi, Bt, N]
    # A text without real tokens scores 0 rather than -inf.
    i2t = jnp.where(txt_mask.any(-1)[None, :, None], best_word, 0.0).mean(-1)
    n_real = jnp.maximum(txt_mask.sum(-1), 1).astype(tok.dtype)  # [Bt]
    t2i = jnp.where(txt_mask[None], tok.max(-2), 0.0).sum(-1) / n_real[None]
    return i2t, t2i


def _pick(i2t: jax.Array, t2i: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """(similarity used for image->text, for text->image), both [Bi, Bt]."""
    if mode == "filip":
        return i2t, t2i
    mean = 0.5 * (i2t + t2i)
    return mean, mean


def _check(img_tokens, txt_tokens, txt_mask, mode):
    if mode not in MODES:
        raise ValueError(f"tokenwise mode {mode!r} is not supported; expected one of {MODES}")
    if (
        img_tokens.ndim != 3
        or txt_tokens.ndim != 3
        or img_tokens.shape[0] != txt_tokens.shape[0]
        or img_tokens.shape[2] != txt_tokens.shape[2]
        or txt_mask.shape != txt_tokens.shape[:2]
    ):
        raise ValueError(
            f"tokenwise: expected image_tokens [B, N, D], text_tokens [B, L, D], "
            f"text_mask [B, L]; got {img_tokens.shape}, {txt_tokens.shape}, "
            f"{txt_mask.shape}"
        )


def tokenwise_reference(
    img_tokens: jax.Array,
    txt_tokens: jax.Array,
    txt_mask: jax.Array,
    logit_scale: jax.Array,
    mode: str = "filip",
) -> tuple[jax.Array, dict]:
    """Oracle: all B x B token similarities at once (small B only)."""
    _check(img_tokens, txt_tokens, txt_mask, mode)
    b = img_tokens.shape[0]
    s = jnp.exp(logit_scale)
    sim_i2t, sim_t2i = _pick(
        *token_similarity(img_tokens.astype(jnp.float32), txt_tokens.astype(jnp.float32), txt_mask),
        mode,
    )
    i2t, t2i = s * sim_i2t, s * sim_t2i.T  # rows: images / texts
    loss = (
        jnp.sum(jax.nn.logsumexp(i2t, 1) - jnp.diagonal(i2t))
        + jnp.sum(jax.nn.logsumexp(t2i, 1) - jnp.diagonal(t2i))
    ) / (2 * b)
    target = jnp.arange(b)
    aux = {
        "i2t_acc": jnp.mean(jnp.argmax(i2t, 1) == target),
        "t2i_acc": jnp.mean(jnp.argmax(t2i, 1) == target),
    }
    return loss, aux


def _gathered_body(img_t, txt_t, mask, logit_scale, *, axes, n, mode):
    b = img_t.shape[0]
    s = jnp.exp(logit_scale)
    all_img = lax.all_gather(img_t, axes, tiled=True)  # [B, N, D]
    all_txt = lax.all_gather(txt_t, axes, tiled=True)  # [B, L, D]
    all_mask = lax.all_gather(mask, axes, tiled=True)

    # One shard-sized block of pairs at a time, recomputed in backward: [b, b, N, L] live at most.
    @jax.checkpoint
    def rows_vs_texts(blk):  # my images vs a block of texts -> image->text sims [b, b]
        t_tok, t_mask = blk
        return _pick(*token_similarity(img_t, t_tok, t_mask), mode)[0]

    @jax.checkpoint
    def images_vs_my_texts(i_tok):  # a block of images vs my texts -> text->image sims [b, b]
        return _pick(*token_similarity(i_tok, txt_t, mask), mode)[1]

    blocks = lambda a: a.reshape((n, b) + a.shape[1:])
    i2t = lax.map(rows_vs_texts, (blocks(all_txt), blocks(all_mask)))  # [n, b_img, b_txt]
    i2t = s * jnp.transpose(i2t, (1, 0, 2)).reshape(b, n * b)
    t2i = lax.map(images_vs_my_texts, blocks(all_img))  # [n, b_img, b_txt]
    t2i = s * jnp.transpose(t2i, (2, 0, 1)).reshape(b, n * b)
    target = lax.axis_index(axes) * b + jnp.arange(b)
    pos_i2t = jnp.take_along_axis(i2t, target[:, None], 1)[:, 0]
    pos_t2i = jnp.take_along_axis(t2i, target[:, None], 1)[:, 0]
    part = jnp.sum(jax.nn.logsumexp(i2t, 1) - pos_i2t) + jnp.sum(jax.nn.logsumexp(t2i, 1) - pos_t2i)
    return (
        part[None],
        jnp.sum(jnp.argmax(i2t, 1) == target)[None],
        jnp.sum(jnp.argmax(t2i, 1) == target)[None],
    )


def tokenwise_gathered(
    img_tokens: jax.Array,
    txt_tokens: jax.Array,
    txt_mask: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = BATCH_AXES,
    mode: str = "filip",
) -> tuple[jax.Array, dict]:
    """All-gather the token sequences; each shard computes its b x B rows in both directions,
    one b x b block of pairs at a time."""
    _check(img_tokens, txt_tokens, txt_mask, mode)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    b_global = img_tokens.shape[0]
    check_divisible(b_global, n, "global batch size")
    spec = P(axes)
    fn = jax.shard_map(
        partial(_gathered_body, axes=axes, n=n, mode=mode),
        mesh=mesh,
        in_specs=(spec, spec, spec, P()),
        out_specs=(spec, spec, spec),
    )
    part, c_i2t, c_t2i = fn(
        img_tokens.astype(jnp.float32),
        txt_tokens.astype(jnp.float32),
        txt_mask.astype(bool),
        jnp.asarray(logit_scale, jnp.float32),
    )
    return part.sum() / (2 * b_global), {
        "i2t_acc": c_i2t.sum() / b_global,
        "t2i_acc": c_t2i.sum() / b_global,
    }
