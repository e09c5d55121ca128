"""Probes on frozen image embeddings: a linear probe (logistic regression) and few-shot ridge.

Linear probe, as in the CLIP paper: L2-regularised multinomial logistic regression on the
L2-normalised embeddings of a train split, its strength chosen on a held-out part of train from
a grid, refit on all of train with that strength and scored on the test split. The objective is

    mean_i CE(x_i W + b, y_i) + l2 / 2 * |W|^2        (the bias is not regularised)

solved full-batch with L-BFGS (optax.lbfgs, one jitted while loop). It is scikit-learn's
LogisticRegression(C) with C = 1 / (l2 * n_train).

Few-shot, as big_vision's evaluator: k examples per class drawn per seed, features whitened with
their statistics, a large constant feature as an (almost unregularised) bias, and closed-form
ridge regression to {-1, +1} one-hot targets; accuracy averaged over seeds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # strongest first: ties pick it
DEFAULT_SHOTS = (1, 5, 10, 25)
FEWSHOT_L2 = 2.0**10  # big_vision's default ridge strength on whitened features
BIAS_FEATURE = 100.0


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; all-zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int32).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{what}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no examples")
    if y.min() < 0:
        raise ValueError(f"{what}: negative label {int(y.min())}")
    return x, y


def _num_classes(num_classes: int | None, *labels: np.ndarray) -> int:
    top = max(int(y.max()) for y in labels) + 1
    if num_classes is not None and top > num_classes:
        raise ValueError(f"label {top - 1} is outside the {num_classes} classes of the data set")
    return int(num_classes or top)


def _accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    hit = pred == y
    per_class = [hit[y == c].mean() for c in range(num_classes) if (y == c).any()]
    return {"top1": float(hit.mean()), "mean_per_class_top1": float(np.mean(per_class))}


# ------------------------------------------------------------------ logistic regression
@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_logistic(x, y, weight, l2, *, num_classes: int, max_iter: int, tol: float):
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    weight = weight / weight.sum()  # 0/1 row weights: a subset fits with the same shapes

    def objective(p):
        logits = x @ p["w"] + p["b"]
        ce = -jnp.sum(weight * jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
        return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    def cond(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad) >= tol))

    p0 = {
        "w": jnp.zeros((x.shape[1], num_classes), x.dtype),
        "b": jnp.zeros((num_classes,), x.dtype),
    }
    p, state = jax.lax.while_loop(cond, body, (p0, opt.init(p0)))
    return p["w"], p["b"], optax.tree_utils.tree_get(state, "count")


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    l2: float,
    *,
    rows: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights [D, C] and bias [C] minimising the module docstring's objective over `rows` of
    x (default all; features used as given, no scaling)."""
    x, y = _check(x, y, "logistic regression")
    weight = np.zeros(x.shape[0], np.float32)
    weight[slice(None) if rows is None else rows] = 1.0
    if not weight.any():
        raise ValueError("logistic regression: no rows to fit")
    if l2 <= 0:
        raise ValueError(f"logistic regression: l2 must be positive, got {l2}")
    if y.max() >= num_classes:
        raise ValueError(f"logistic regression: label {int(y.max())} >= {num_classes} classes")
    w, b, steps = _fit_logistic(
        jnp.asarray(x),
        jnp.asarray(y),
        jnp.asarray(weight),
        jnp.float32(l2),
        num_classes=num_classes,
        max_iter=max_iter,
        tol=tol,
    )
    log.debug("logistic regression l2=%g: %d L-BFGS steps", l2, int(steps))
    return np.asarray(w), np.asarray(b)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Test accuracy of a logistic regression on normalised features, its L2 strength chosen
    on a random `val_fraction` of train (a one-value grid skips the choice)."""
    train_x, train_y = _check(train_x, train_y, "linear probe train split")
    test_x, test_y = _check(test_x, test_y, "linear probe test split")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"linear probe: train/test dims differ ({train_x.shape[1]}, {test_x.shape[1]})"
        )
    if not l2_grid or min(l2_grid) <= 0:
        raise ValueError(f"linear probe: l2_grid must be positive values, got {list(l2_grid)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"linear probe: val_fraction must be in (0, 1), got {val_fraction}")
    c = _num_classes(num_classes, train_y, test_y)
    train_x, test_x = normalize(train_x), normalize(test_x)
    val_scores: dict[float, float] = {}
    if len(l2_grid) > 1:
        order = np.random.default_rng(seed).permutation(train_x.shape[0])
        n_val = max(1, int(round(val_fraction * len(order))))
        if n_val >= len(order):
            raise ValueError("linear probe: too few train examples to hold out a validation part")
        val, fit = order[:n_val], order[n_val:]
        for l2 in l2_grid:
            w, b = fit_logistic(train_x, train_y, c, l2, rows=fit, max_iter=max_iter)
            val_scores[float(l2)] = float(
                ((train_x[val] @ w + b).argmax(-1) == train_y[val]).mean()
            )
        best = max(val_scores, key=val_scores.get)  # first of the ties: the strongest
    else:
        best = float(l2_grid[0])
    w, b = fit_logistic(train_x, train_y, c, best, max_iter=max_iter)
    out = _accuracy((test_x @ w + b).argmax(-1), test_y, c)
    out["l2"] = best
    if val_scores:
        out["val_top1"] = val_scores[best]
    out["num_train"] = float(train_x.shape[0])
    out["num_test"] = float(test_x.shape[0])
    log.info("linear probe (l2=%g, val %s): %s", best, val_scores, out)
    return out


# ------------------------------------------------------------------ few-shot ridge
@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_predict(x, y, x_test, l2, *, num_classes: int):
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    bias = lambda a: jnp.pad(a, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)  # noqa: E731
    x, x_test = bias((x - mean) / std), bias((x_test - mean) / std)
    targets = 2.0 * jax.nn.one_hot(y, num_classes, dtype=x.dtype) - 1.0
    n, d = x.shape
    if n >= d:  # primal: (X^T X + l2 I)^-1 X^T Y
        w = jnp.linalg.solve(x.T @ x + l2 * jnp.eye(d, dtype=x.dtype), x.T @ targets)
    else:  # dual, cheaper with fewer examples than features: X^T (X X^T + l2 I)^-1 Y
        w = x.T @ jnp.linalg.solve(x @ x.T + l2 * jnp.eye(n, dtype=x.dtype), targets)
    return (x_test @ w).argmax(-1)


def ridge_predict(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, num_classes: int, l2: float = FEWSHOT_L2
) -> np.ndarray:
    """Test predictions of whitened ridge regression to {-1, +1} one-hot targets."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(
            _ridge_predict(
                jnp.asarray(x, jnp.float32),
                jnp.asarray(y, jnp.int32),
                jnp.asarray(x_test, jnp.float32),
                jnp.float32(l2),
                num_classes=num_classes,
            )
        )


def fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = 3,
    num_classes: int | None = None,
    l2: float = FEWSHOT_L2,
) -> dict[str, float]:
    """{'<k>shot/top1': mean test accuracy over `seeds` draws of k train examples per class}."""
    train_x, train_y = _check(train_x, train_y, "few-shot train split")
    test_x, test_y = _check(test_x, test_y, "few-shot test split")
    if not shots or min(shots) < 1:
        raise ValueError(f"few-shot: shots must be positive integers, got {list(shots)}")
    if seeds < 1:
        raise ValueError(f"few-shot: seeds must be >= 1, got {seeds}")
    c = _num_classes(num_classes, train_y, test_y)
    counts = np.bincount(train_y, minlength=c)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise ValueError("few-shot: the train split has fewer than two classes")
    train_x, test_x = normalize(train_x), normalize(test_x)
    out: dict[str, float] = {}
    for k in sorted(set(int(s) for s in shots)):
        if k > counts[present].min():
            log.warning(
                "few-shot: %d-shot needs %d examples of every class; a class has %d",
                k,
                k,
                int(counts[present].min()),
            )
            continue
        accs = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            idx = np.concatenate(
                [rng.permutation(np.flatnonzero(train_y == cls))[:k] for cls in present]
            )
            pred = ridge_predict(train_x[idx], train_y[idx], test_x, c, l2)
            accs.append(float((pred == test_y).mean()))
        out[f"{k}shot/top1"] = float(np.mean(accs))
        out[f"{k}shot/top1_std"] = float(np.std(accs))
    if not out:
        raise ValueError(
            f"few-shot: no shot count in {list(shots)} fits; the smallest class has "
            f"{int(counts[present].min())} train examples"
        )
    out["num_test"] = float(test_x.shape[0])
    return out
