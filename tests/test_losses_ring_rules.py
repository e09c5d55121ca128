"""False-negative rules in the sharded InfoNCE: ring and gathered equal the reference (value,
gradients w.r.t. both embeddings and logit_scale, accuracies) for every combination of the
rules, with and without a partially filled queue, tiled or not, on every test mesh."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clipjax.losses import infonce_gathered, infonce_reference, infonce_ring, queue_init, queue_push
from clipjax.losses.pairs import PairInfo, PairRules, same_group

# (mesh shape, axis names, batch axes), as in test_losses.py: one device, a ring of 2, and a ring
# of 8 over two mesh axes (each mesh's matrix is one large compile; 4 and 8 on one axis added
# minutes to the suite and no case the others miss).
MESHES = {
    "1": ((1,), ("b",), ("b",)),
    "2": ((2,), ("b",), ("b",)),
    "2x4": ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
}
B, D, K, FILLED, N_GROUPS = 24, 16, 24, 13, 3
THRESHOLD = 0.3
LOG_SCALE = jnp.float32(np.log(10.0))
# group positives x duplicate threshold x in-batch negatives x queue: 16 combinations.
COMBOS = list(itertools.product((False, True), (None, THRESHOLD), (True, False), (False, True)))
TILES = (None, 2, 3)


def mesh_for(key):
    shape, names, axes = MESHES[key]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names), axes


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def clustered(key, n, centers):
    """n pairs whose embeddings cluster around their group's center (so groups and EMA
    near-duplicates overlap, as in a class-sorted batch), with EMA copies close to them."""
    k = jax.random.split(key, 5)
    label = jax.random.randint(k[0], (n,), 0, N_GROUPS)
    img = unit(centers[label] + jax.random.normal(k[1], (n, D)))
    txt = unit(img + 0.7 * jax.random.normal(k[2], (n, D)))
    ema_img = unit(img + 0.3 * jax.random.normal(k[3], (n, D)))
    ema_txt = unit(txt + 0.3 * jax.random.normal(k[4], (n, D)))
    return label[:, None].astype(jnp.int32), img, txt, ema_img, ema_txt


@functools.lru_cache(maxsize=None)
def data():
    k_c, k_b, k_q = jax.random.split(jax.random.PRNGKey(17), 3)
    centers = jax.random.normal(k_c, (N_GROUPS, D))
    group, img, txt, ema_img, ema_txt = clustered(k_b, B, centers)
    q_group, _, _, q_img, q_txt = clustered(k_q, FILLED, centers)  # the queue holds EMA rows
    queue = queue_push(queue_init(K, D, group_width=1), q_img, q_txt, q_group)
    return img, txt, PairInfo(group, ema_img, ema_txt), queue


def case(combo):
    group_pos, threshold, batch_neg, with_queue = combo
    img, txt, pairs, queue = data()
    return (
        img,
        txt,
        PairRules(group_pos, threshold, batch_neg),
        pairs,
        queue if with_queue else None,
    )


def all_value_and_grads(loss_for):
    """Value, aux and grads (img, txt, logit_scale) of `loss_for(i, combo)` for every combo, in
    one compiled program (one compile instead of 16 keeps the matrix affordable on CPU)."""
    img, txt = data()[:2]

    def run(x, y, s):
        out = []
        for i, combo in enumerate(COMBOS):
            fn = loss_for(i, combo)
            out.append(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(x, y, s))
        return out

    return jax.jit(run)(img, txt, LOG_SCALE)


@functools.lru_cache(maxsize=None)
def references():
    def loss_for(_, combo):
        _, _, rules, pairs, queue = case(combo)
        return lambda x, y, s: infonce_reference(x, y, s, queue, rules, pairs)

    return all_value_and_grads(loss_for)


def assert_matches(got, want, what):
    (val, aux), grads = got
    (ref, ref_aux), ref_g = want
    assert rel_err(val, ref) <= 1e-5, (what, float(val), float(ref))
    for name, g, w in zip(("d_img", "d_txt", "d_logit_scale"), grads, ref_g):
        assert rel_err(g, w) <= 1e-5, (what, name, rel_err(g, w))
    for name in ("i2t_acc", "t2i_acc"):
        assert float(aux[name]) == float(ref_aux[name]), (what, name, aux[name], ref_aux[name])


def test_data_exercise_the_rules():
    """The fixtures mask a real share of pairs, so agreement below is not vacuous."""
    img, txt, pairs, queue = data()
    off = ~np.eye(B, dtype=bool)
    same = np.asarray(same_group(pairs.group, pairs.group))[off]
    assert 0.2 < same.mean() < 0.6
    for ema in (pairs.ema_image, pairs.ema_text):
        dup = np.asarray(ema @ ema.T > THRESHOLD)[off]
        assert 0.1 < dup.mean() < 0.6
        assert 0.1 < dup[~same].mean()  # the threshold also removes other-group negatives
    q_same = np.asarray(same_group(pairs.group, queue.group[:FILLED]))
    assert 0.2 < q_same.mean() < 0.6
    assert int(queue.count) == FILLED < K
    losses = {combo: float(ref[0][0]) for combo, ref in zip(COMBOS, references())}
    # Each rule changes the loss (all-off rows differ from the plain loss in one switch).
    plain = losses[(False, None, True, False)]
    for changed in (
        (True, None, True, False),
        (False, THRESHOLD, True, False),
        (False, None, False, True),
        (False, None, True, True),
    ):
        assert abs(losses[changed] - plain) > 1e-3, changed


@pytest.mark.parametrize("mesh_key", list(MESHES))
def test_ring_and_gathered_rules_match_reference(mesh_key):
    mesh, axes = mesh_for(mesh_key)
    offset = list(MESHES).index(mesh_key)
    tiles = [TILES[(i + offset) % len(TILES)] for i in range(len(COMBOS))]  # all on each mesh

    def ring_for(i, combo):
        _, _, rules, pairs, queue = case(combo)
        return lambda x, y, s: infonce_ring(x, y, s, mesh, axes, queue, tiles[i], rules, pairs)

    def gathered_for(_, combo):
        _, _, rules, pairs, queue = case(combo)
        return lambda x, y, s: infonce_gathered(x, y, s, mesh, axes, queue, rules, pairs)

    ring, gathered = all_value_and_grads(ring_for), all_value_and_grads(gathered_for)
    for combo, tile, want, got_r, got_g in zip(COMBOS, tiles, references(), ring, gathered):
        assert_matches(got_r, want, (mesh_key, "ring", tile, combo))
        assert_matches(got_g, want, (mesh_key, "gathered", combo))


def test_ring_plain_rules_compile_to_the_plain_ring():
    """PairRules() ignores any pair info: the program is the one without rules (no extra work)."""
    mesh, axes = mesh_for("2")
    img, txt, pairs, queue = data()

    def hlo(**kw):
        fn = lambda x, y, s: infonce_ring(x, y, s, mesh, axes, queue=queue, tile=2, **kw)[0]
        return jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(img, txt, LOG_SCALE).as_text()

    assert hlo(rules=PairRules(), pairs=pairs) == hlo()


def test_ring_rules_need_their_pair_info():
    mesh, axes = mesh_for("2")
    img, txt, pairs, _ = data()
    with pytest.raises(ValueError, match="PairInfo.group"):
        infonce_ring(img, txt, LOG_SCALE, mesh, axes, rules=PairRules(group_positives=True))
    with pytest.raises(ValueError, match="PairInfo.ema_image"):
        infonce_ring(
            img,
            txt,
            LOG_SCALE,
            mesh,
            axes,
            rules=PairRules(duplicate_threshold=0.5),
            pairs=PairInfo(group=pairs.group),
        )


def test_ring_rules_never_hold_a_b_by_B_block():
    """With every rule and a queue, compiled temp memory stays far below b x B logits."""
    mesh, axes = mesh_for("2x4")
    b_global, k = 2048, 512
    key = jax.random.split(jax.random.PRNGKey(3), 4)
    img = unit(jax.random.normal(key[0], (b_global, 8)))
    txt = unit(jax.random.normal(key[1], (b_global, 8)))
    group = jax.random.randint(key[2], (b_global, 1), 0, 3)
    pairs = PairInfo(group, img, txt)
    queue = queue_push(queue_init(k, 8, group_width=1), img[:k], txt[:k], group[:k])
    rules = PairRules(True, 0.9, True)
    fn = lambda x, y, s: infonce_ring(x, y, s, mesh, axes, queue, 64, rules, pairs)[0]
    mem = (
        jax.jit(jax.grad(fn, argnums=(0, 1, 2)))
        .lower(img, txt, LOG_SCALE)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    assert mem < (b_global // 8) * b_global * 4 / 4
