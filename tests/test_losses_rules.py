"""False-negative rules of the softmax loss: an explicit float64 oracle, the reference and the
all-gather implementation (value and gradient, 1 and 8 devices, with and without the queue), and
the batch homogeneity metrics on constructed batches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clipjax.losses import (
    PairInfo,
    PairRules,
    batch_homogeneity,
    infonce_gathered,
    infonce_reference,
    queue_init,
    queue_push,
)
from clipjax.losses.pairs import caption_groups, equal_pair_share

B, D, K = 16, 8, 24
LOG_SCALE = jnp.float32(np.log(10.0))


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def setup(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    img = unit(jax.random.normal(ks[0], (B, D)))
    txt = unit(img + jax.random.normal(ks[1], (B, D)))
    labels = jax.random.randint(ks[2], (B,), 0, 3)  # many pairs share a label
    # EMA embeddings close to the current ones (as momentum encoders are).
    pairs = PairInfo(
        group=labels[:, None].astype(jnp.int32),
        ema_image=unit(img + 0.3 * jax.random.normal(ks[3], (B, D))),
        ema_text=unit(txt + 0.3 * jax.random.normal(ks[4], (B, D))),
    )
    q_img = unit(jax.random.normal(ks[5], (K, D)))
    q_txt = unit(q_img + jax.random.normal(ks[0], (K, D)))
    q_group = jax.random.randint(ks[1], (K - 4, 1), 0, 3)
    queue = queue_push(queue_init(K, D, group_width=1), q_img[: K - 4], q_txt[: K - 4], q_group)
    return img, txt, pairs, queue


def oracle(img, txt, s, rules, pairs, queue):
    """Row by row in float64: kept = positives + negatives, loss = LSE(kept) - mean(positive)."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    g = np.asarray(pairs.group)
    e_img, e_txt = np.asarray(pairs.ema_image, np.float64), np.asarray(pairs.ema_text, np.float64)
    total = 0.0
    for anchors, cands, e, q_emb in (
        (img, txt, e_txt, queue and queue.text),
        (txt, img, e_img, queue and queue.image),
    ):
        for i in range(B):
            logits, pos = [], []
            for j in range(B):
                is_pos = i == j or (rules.group_positives and g[i, 0] == g[j, 0])
                is_neg = (
                    not is_pos
                    and rules.batch_negatives
                    and (
                        rules.duplicate_threshold is None
                        or e[i] @ e[j] <= rules.duplicate_threshold
                    )
                )
                if is_pos or is_neg:
                    # Queue-only (MoCo): the candidates are the momentum encoders' embeddings.
                    key = cands[j] if rules.batch_negatives else e[j]
                    logits.append(s * anchors[i] @ key)
                    pos.append(is_pos)
            if queue is not None:
                qg, qe = np.asarray(queue.group), np.asarray(q_emb, np.float64)
                for k in range(int(queue.count)):
                    if rules.group_positives and qg[k, 0] == g[i, 0]:
                        continue
                    if (
                        rules.duplicate_threshold is not None
                        and e[i] @ qe[k] > rules.duplicate_threshold
                    ):
                        continue
                    logits.append(s * anchors[i] @ qe[k])
                    pos.append(False)
            logits, pos = np.array(logits), np.array(pos)
            m = logits.max()
            total += m + np.log(np.exp(logits - m).sum()) - logits[pos].mean()
    return total / (2 * B)


RULES = [
    PairRules(group_positives=gp, duplicate_threshold=t, batch_negatives=bn)
    for gp, t, bn in itertools.product((False, True), (None, 0.5), (True, False))
]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("rules", RULES, ids=str)
@pytest.mark.parametrize("with_queue", [False, True])
def test_reference_equals_oracle(rules, with_queue):
    img, txt, pairs, queue = setup()
    if not with_queue and not rules.batch_negatives:
        pytest.skip("no negatives at all")
    q = queue if with_queue else None
    loss, _ = infonce_reference(img, txt, LOG_SCALE, queue=q, rules=rules, pairs=pairs)
    np.testing.assert_allclose(loss, oracle(img, txt, 10.0, rules, pairs, q), rtol=1e-5)


def test_rules_change_the_loss():
    """Each rule leaves out or adds pairs on this data (the thresholds and groups bite)."""
    img, txt, pairs, queue = setup()
    plain, _ = infonce_reference(img, txt, LOG_SCALE, queue=queue)
    values = {
        float(infonce_reference(img, txt, LOG_SCALE, queue=queue, rules=r, pairs=pairs)[0])
        for r in RULES
    }
    assert len(values) == len(RULES) and float(plain) in values


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]).reshape(n), ("b",))


# Each rule on, alone or combined (every combination against the oracle above).
SHARDED_RULES = [
    PairRules(group_positives=True),
    PairRules(duplicate_threshold=0.5),
    PairRules(group_positives=True, duplicate_threshold=0.5, batch_negatives=False),
]


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("rules", SHARDED_RULES, ids=str)
def test_gathered_equals_reference(n, rules):
    img, txt, pairs, queue = setup(seed=1)
    mesh = _mesh(n)
    queues = [queue] + ([None] if rules.batch_negatives else [])
    for q in queues:

        def ref(x, y, s):
            return infonce_reference(x, y, s, queue=q, rules=rules, pairs=pairs)

        def got(x, y, s):
            return infonce_gathered(x, y, s, mesh, ("b",), queue=q, rules=rules, pairs=pairs)

        grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa
        (want, want_aux), want_g = grad(ref)(img, txt, LOG_SCALE)
        (val, aux), g = grad(got)(img, txt, LOG_SCALE)
        assert rel_err(val, want) <= 1e-5
        for a, b in zip(g, want_g):
            assert rel_err(a, b) <= 1e-5
        for k in want_aux:
            np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-6)


def test_group_positive_accuracy_counts_any_positive():
    """Two identical pairs: top-1 on the other copy is right when groups are positives."""
    img = unit(jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]))
    pairs = PairInfo(group=jnp.array([[7], [7], [1], [2]], jnp.int32))
    _, plain = infonce_reference(img, img, LOG_SCALE)
    _, grouped = infonce_reference(
        img, img, LOG_SCALE, rules=PairRules(group_positives=True), pairs=pairs
    )
    assert float(grouped["i2t_acc"]) == 1.0 and float(plain["i2t_acc"]) < 1.0


def test_missing_pair_info_is_a_clear_error():
    img, txt, _, _ = setup()
    with pytest.raises(ValueError, match="PairInfo.group"):
        infonce_reference(img, txt, LOG_SCALE, rules=PairRules(group_positives=True))
    with pytest.raises(ValueError, match="PairInfo.ema_image"):
        infonce_reference(
            img,
            txt,
            LOG_SCALE,
            rules=PairRules(duplicate_threshold=0.9),
            pairs=PairInfo(group=jnp.zeros((B, 1), jnp.int32)),
        )
    _, _, _, queue = setup()
    with pytest.raises(ValueError, match="queue-only needs PairInfo.ema_image"):
        infonce_reference(
            img, txt, LOG_SCALE, queue=queue, rules=PairRules(batch_negatives=False), pairs=None
        )


# ------------------------------------------------------------------ homogeneity metrics


def test_caption_groups_match_identical_rows_only():
    text = jnp.array([[1, 5, 9, 0], [1, 5, 9, 0], [1, 9, 5, 0], [1, 5, 9, 2]], jnp.int32)
    g = np.asarray(caption_groups(text))
    assert (g[0] == g[1]).all()
    assert not (g[0] == g[2]).all() and not (g[0] == g[3]).all()


@pytest.mark.parametrize("keys", [[0, 0, 1, 2, 2, 2], [5] * 4, list(range(7)), [3, 1, 3, 1, 3]])
def test_equal_pair_share_counts_pairs(keys):
    k = np.array(keys)
    b = len(k)
    want = ((k[:, None] == k[None, :]).sum() - b) / (b * (b - 1))
    got = equal_pair_share(jnp.asarray(k, jnp.int32)[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_batch_homogeneity_on_constructed_batches():
    one_class = jnp.tile(jnp.array([[1, 4, 4, 2]], jnp.int32), (8, 1))
    labels = jnp.array([0, 0, 0, 0, 1, 1, 2, 3])
    emb = unit(jax.random.normal(jax.random.PRNGKey(0), (8, 4)))
    m = batch_homogeneity(one_class, emb, labels)
    np.testing.assert_allclose(m["batch/same_caption"], 1.0)
    np.testing.assert_allclose(m["batch/same_label"], (12 + 2) / 56)
    e = np.asarray(emb, np.float64)
    sims = e @ e.T
    np.testing.assert_allclose(m["batch/text_cos"], (sims.sum() - np.trace(sims)) / 56, rtol=1e-5)
    same = jnp.tile(emb[:1], (8, 1))
    np.testing.assert_allclose(batch_homogeneity(one_class, same)["batch/text_cos"], 1.0, rtol=1e-5)


def test_batch_shares_beyond_int32_pair_counts():
    """At a 64k batch the pair count b * (b - 1) passes int32: the shares still trace and are
    exact (all captions equal: every pair; one-hot embeddings: no cosine)."""
    from clipjax.losses.pairs import mean_offdiag_cosine

    b = 65536
    assert float(jax.jit(equal_pair_share)(jnp.zeros((b, 1), jnp.int32))) == 1.0
    emb = jnp.zeros((b, 4), jnp.float32).at[:, 0].set(1.0)
    assert float(jax.jit(mean_offdiag_cosine)(emb)) == 1.0
