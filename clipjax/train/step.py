"""The sharded train step: forward both towers, contrastive loss, gradients, optax update.

`make_train_step` returns a pure `train_step(state, batch, hparams) -> (state, metrics)`;
`jit_train_step` compiles it with the state's shardings (params/optimizer state laid out by the
logical-axis rules, the batch split over ('data', 'fsdp')) and returns a `BoundStep`, called as
`step(state, batch)` with the optimizer's hyperparameters (learning-rate schedule, weight decay)
as the compiled program's third argument: runs that differ only in those share one executable.

Gradient accumulation (`microbatches > 1`) keeps the contrastive semantics exactly, by gradient
caching (as open_clip's accumulation): pass 1 runs the towers over every microbatch without
gradients and caches the outputs; the loss over the *whole* batch's cached outputs gives the loss
value and its gradient w.r.t. every embedding (and the temperature); pass 2 recomputes each
microbatch's forward with gradients and back-propagates that microbatch's slice of the cached
embedding gradient into the parameters, summing over microbatches. The result equals the
full-batch gradient (every microbatch still sees all B-1 negatives); peak activation memory is that
of one microbatch, at the cost of a second forward pass.

The loss owns its state (clipjax.losses.Loss): each step calls `loss.prepare` (EMA encoders, the
batch's pair info), the differentiated `loss.loss_fn`, then `loss.update_state` (queue push); the
step knows nothing of queues.

A non-finite loss or gradient norm skips the update (params, optimizer, model and loss state
unchanged), advances the step (the batch was consumed) and counts it in `nonfinite_streak` /
`nonfinite_total`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.losses import Loss
from clipjax.models.patch_dropout import PATCH_DROPOUT_RNG
from clipjax.models.sharding import model_mesh
from clipjax.parallel.mesh import BATCH_AXES, batch_axis_size
from clipjax.train.optimizer import Optimizer
from clipjax.train.state import TrainState

Batch = dict[str, jax.Array]

# Output keys of the CLIP model that are per-example (leading batch dim) vs. scalars.
_SCALAR_OUTPUTS = ("logit_scale", "logit_bias")


def _is_float(x: Any) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _apply(
    model: nn.Module, params: Any, model_state: dict, batch: Batch, rng: jax.Array | None = None
) -> tuple[dict[str, Any], dict]:
    """Model forward; returns (outputs, updated non-param collections).

    With `rng` (the step's key) the model runs in training mode with patch dropout drawn from it;
    without, patch dropout is off (the no-gradient forward of momentum encoders). BatchNorm
    (ResNet towers, non-empty `model_state`) is always in training mode here.
    """
    variables = {"params": params, **model_state}
    kwargs: dict[str, Any] = {"train": bool(model_state) or rng is not None}
    if rng is not None:
        kwargs["rngs"] = {PATCH_DROPOUT_RNG: rng}
    if model_state:  # e.g. BatchNorm statistics of a ResNet tower
        outputs, updates = model.apply(
            variables, batch["image"], batch["text"], mutable=list(model_state), **kwargs
        )
        return outputs, dict(updates)
    return model.apply(variables, batch["image"], batch["text"], **kwargs), {}


def _batch_constraint(x: jax.Array, mesh: Mesh, leading: int = 0) -> jax.Array:
    spec = P(*([None] * leading), BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split_microbatches(x: jax.Array, n_shards: int, m: int, mesh: Mesh) -> jax.Array:
    """[B, ...] -> [m, B/m, ...]: microbatch j takes rows j of each shard's local block, so
    splitting and re-joining (`join_microbatches`) move no data between devices."""
    b = x.shape[0] // (n_shards * m)
    y = x.reshape((n_shards, m, b) + x.shape[1:]).swapaxes(0, 1)
    return _batch_constraint(y.reshape((m, n_shards * b) + x.shape[1:]), mesh, leading=1)


def join_microbatches(y: jax.Array, n_shards: int, mesh: Mesh) -> jax.Array:
    """Inverse of split_microbatches: [m, B/m, ...] -> [B, ...] in the original row order."""
    m, bm = y.shape[:2]
    b = bm // n_shards
    x = y.reshape((m, n_shards, b) + y.shape[2:]).swapaxes(0, 1)
    return _batch_constraint(x.reshape((m * bm,) + y.shape[2:]), mesh)


def used_outputs(
    loss_of: Callable, abstract_outputs: dict[str, Any], *abstract_args
) -> frozenset[str]:
    """Names of model outputs that `loss_of(outputs, *args)` actually reads (traced once,
    abstractly). Gradient caching then caches only those (e.g. token sequences only for a
    token-wise loss)."""
    keys = [k for k, v in abstract_outputs.items() if v is not None]

    def f(vals, args):
        outs = dict(abstract_outputs)
        outs.update(zip(keys, vals))
        return loss_of(outs, *args)

    jaxpr = jax.make_jaxpr(f)([abstract_outputs[k] for k in keys], abstract_args).jaxpr
    from jax.extend.core import Var

    read = set()
    for eqn in jaxpr.eqns:
        read.update(id(v) for v in eqn.invars if isinstance(v, Var))
    read.update(id(v) for v in jaxpr.outvars if isinstance(v, Var))
    return frozenset(k for k, var in zip(keys, jaxpr.invars) if id(var) in read)


def make_embed_fn(model: nn.Module, mesh: Mesh, microbatches: int) -> Callable:
    """embed(params, model_state, batch) -> (image_embeds, text_embeds) without gradients, one
    microbatch at a time under gradient accumulation (the momentum encoders' forward)."""
    n_shards, m = batch_axis_size(mesh), int(microbatches)

    def embed(params, model_state, batch):
        params = jax.lax.stop_gradient(params)
        if m == 1:
            out, _ = _apply(model, params, model_state, batch)
            return out["image_embeds"], out["text_embeds"]
        micro = jax.tree.map(lambda x: split_microbatches(x, n_shards, m, mesh), batch)

        def one(_, mb):
            out, _ = _apply(model, params, model_state, mb)
            return None, (out["image_embeds"], out["text_embeds"])

        _, (img, txt) = jax.lax.scan(one, None, micro)
        return join_microbatches(img, n_shards, mesh), join_microbatches(txt, n_shards, mesh)

    return embed


def make_grad_fn(
    model: nn.Module,
    optimizer: Optimizer,
    loss: Loss,
    mesh: Mesh,
    microbatches: int = 1,
    cached_keys: frozenset[str] | None = None,
) -> Callable:
    """fn(trainable, frozen, model_state, batch, loss_state, info, rng=None) -> (loss, metrics,
    log_scale, new_model_state, grads w.r.t. trainable): the whole batch at once, or gradient
    caching over `microbatches` (same value and gradient; see the module docstring).

    `info`: the batch's PairInfo from `loss.prepare`. `cached_keys`: model outputs kept for the
    loss under gradient accumulation (default: every float output); see `used_outputs`. `rng`:
    the step's key for patch dropout (None: none); under accumulation microbatch j uses
    fold_in(rng, j) in both passes, so the recomputed forward drops the same patches.
    """
    if int(microbatches) == 1:
        return functools.partial(_full_batch_grads, model, optimizer, loss)
    caching = _GradientCaching(model, optimizer, loss, mesh, int(microbatches), cached_keys)
    return caching.grads


def _full_batch_grads(
    model, optimizer, loss, trainable, frozen, model_state, batch, loss_state, info, rng=None
):
    """make_grad_fn's result without accumulation: one value_and_grad over the whole batch."""

    def loss_of(tr):
        outputs, new_ms = _apply(model, optimizer.merge(tr, frozen), model_state, batch, rng)
        value, metrics = loss.loss_fn(outputs, loss_state, info, batch)
        return value, (metrics, outputs, new_ms)

    (value, (metrics, outputs, new_ms)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        trainable
    )
    return value, metrics, outputs["logit_scale"], new_ms, grads


@dataclasses.dataclass(frozen=True, eq=False)
class _GradientCaching:
    """make_grad_fn's result under accumulation: the two passes of gradient caching."""

    model: nn.Module
    optimizer: Optimizer
    loss: Loss
    mesh: Mesh
    m: int
    cached_keys: frozenset[str] | None

    @property
    def n_shards(self) -> int:
        return batch_axis_size(self.mesh)

    def grads(self, trainable, frozen, model_state, batch, loss_state, info, rng=None):
        """Same contract as `_full_batch_grads`, one microbatch's activations at a time."""
        micro = jax.tree.map(
            lambda x: split_microbatches(x, self.n_shards, self.m, self.mesh), batch
        )
        # One key per microbatch (or none), scanned alongside it in both passes.
        keys = None
        if rng is not None:
            keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(self.m))
        params_sg = jax.lax.stop_gradient(self.optimizer.merge(trainable, frozen))
        new_ms, full, nondiff = self._forward_without_grads(params_sg, model_state, micro, keys)
        (value, metrics), cts = self._output_cotangents(full, nondiff, loss_state, info, batch)
        grads = self._pull_back(trainable, frozen, model_state, micro, cts, keys)
        return value, metrics, full["logit_scale"], new_ms, grads

    def _keep(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The float outputs the loss reads (the ones cached and differentiated)."""
        return {
            k: v
            for k, v in outputs.items()
            if _is_float(v) and (self.cached_keys is None or k in self.cached_keys)
        }

    def _forward_without_grads(self, params_sg, model_state, micro, keys):
        """Pass 1: every microbatch's outputs without gradients, joined back to the whole batch
        -> (new model state, cached float outputs, non-float outputs). BatchNorm statistics (if
        any) are threaded through the microbatches in order."""

        def fwd_nograd(ms, xs):
            mb, key = xs
            outputs, new_ms = _apply(self.model, params_sg, ms, mb, key)
            other = {k: v for k, v in outputs.items() if v is not None and not _is_float(v)}
            return (new_ms if model_state else ms), (self._keep(outputs), other)

        new_ms, (stacked, stacked_other) = jax.lax.scan(fwd_nograd, model_state, (micro, keys))
        full = {
            k: (v[0] if k in _SCALAR_OUTPUTS else join_microbatches(v, self.n_shards, self.mesh))
            for k, v in stacked.items()
        }
        nondiff = {
            k: join_microbatches(v, self.n_shards, self.mesh) for k, v in stacked_other.items()
        }
        return new_ms, full, nondiff

    def _output_cotangents(self, full, nondiff, loss_state, info, batch):
        """The loss over the whole batch's cached outputs -> ((value, metrics), its gradient
        w.r.t. each output, split back into microbatches)."""

        def loss_of_outputs(diff):
            outs = {"logit_bias": None, **nondiff, **diff}
            return self.loss.loss_fn(outs, loss_state, info, batch)

        (value, metrics), vjp = _vjp_with_aux(loss_of_outputs, full)
        ct_full = vjp(jnp.ones((), value.dtype))
        # Scalar outputs (temperature, bias) are shared by all microbatches: their cotangent is
        # applied once (microbatch 0), not m times.
        ct_stacked = {
            k: (
                jnp.zeros((self.m,) + v.shape, v.dtype).at[0].set(v)
                if k in _SCALAR_OUTPUTS
                else split_microbatches(v, self.n_shards, self.m, self.mesh)
            )
            for k, v in ct_full.items()
        }
        return (value, metrics), ct_stacked

    def _pull_back(self, trainable, frozen, model_state, micro, cts, keys):
        """Pass 2: recompute each microbatch with gradients and pull back its cotangent slice;
        the parameter gradients are summed over microbatches."""

        def bwd(acc, xs):
            mb, ct, key = xs

            def fwd(tr):
                outputs, _ = _apply(
                    self.model, self.optimizer.merge(tr, frozen), model_state, mb, key
                )
                return self._keep(outputs)

            _, pullback = jax.vjp(fwd, trainable)
            (g,) = pullback(ct)
            return jax.tree.map(jnp.add, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, _ = jax.lax.scan(bwd, zeros, (micro, cts, keys))
        return grads


def make_train_step(
    model: nn.Module, optimizer: Optimizer, loss: Loss, grad_fn: Callable, embed: Callable
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step for `model` under `optimizer` and `loss`; `grad_fn` from
    `make_grad_fn`, `embed` from `make_embed_fn` (used by losses with EMA encoders)."""

    def train_step(
        state: TrainState, batch: Batch, hparams: dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        trainable, frozen = optimizer.split(state.params)
        loss_state, info = loss.prepare(
            state.loss_state, state.params, batch, lambda p, b: embed(p, state.model_state, b)
        )
        value, metrics, log_scale, new_ms, grads = grad_fn(
            trainable, frozen, state.model_state, batch, loss_state, info, rng=step_rng
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        new_trainable, new_opt = _update_if_finite(
            optimizer, finite, grads, state.opt_state, trainable, hparams
        )
        new_loss_state = loss.update_state(loss_state, info)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=optimizer.merge(new_trainable, frozen),
            model_state=pick(new_ms, state.model_state),
            opt_state=new_opt,
            loss_state=pick(new_loss_state, state.loss_state),
            rng=rng,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32),
            nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)),
        )
        applied = state.step - state.nonfinite_total  # updates actually made = optax's count
        lr = optimizer.learning_rate(applied, hparams)
        out = _step_metrics(metrics, value, grad_norm, lr, log_scale)
        out.update(
            nonfinite_streak=new_state.nonfinite_streak,
            nonfinite_total=new_state.nonfinite_total,
        )
        return new_state, out

    return train_step


def _update_if_finite(optimizer: Optimizer, finite, grads, opt_state, trainable, hparams):
    """(new trainable params, new optimizer state): the optax update when `finite`, else both
    unchanged. A conditional, not a select of new vs old: the update runs in place on the
    donated buffers instead of keeping copies of the old params and moments alive."""

    def apply_update(operands):
        grads, opt_state, trainable = operands
        updates, new_opt = optimizer.tx.update(grads, opt_state, trainable, hparams=hparams)
        return optax.apply_updates(trainable, updates), new_opt

    def keep(operands):
        _, opt_state, trainable = operands
        return trainable, opt_state

    return jax.lax.cond(finite, apply_update, keep, (grads, opt_state, trainable))


def _step_metrics(metrics, value, grad_norm, lr, log_scale) -> dict[str, jax.Array]:
    """The step's logged metrics: the loss's own (its value under `loss`), the gradient norm,
    learning rate and temperature."""
    out = {k: v for k, v in metrics.items() if k != "loss"}
    out.update(
        loss=value,
        grad_norm=grad_norm,
        lr=lr,
        temperature=jnp.exp(-log_scale),
        logit_scale=jnp.exp(log_scale),
    )
    return out


def _vjp_with_aux(f, primal):
    """(f's (loss, aux), pullback of the loss) for f returning (scalar, aux)."""
    loss, pullback, aux = jax.vjp(f, primal, has_aux=True)

    def vjp(ct):
        return pullback(ct)[0]

    return (loss, aux), vjp


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """The jitted `train_step(state, batch, hparams)` with this run's hparams (host scalars,
    replicated on the mesh) bound: `step(state, batch)`, `step.lower(state, batch)`. Lowering
    needs no device, so a step for an abstract TPU topology compiles on a CPU host."""

    jitted: Any
    hparams: dict[str, Any]
    sharding: NamedSharding

    @functools.cached_property
    def placed_hparams(self) -> dict[str, jax.Array]:
        """The hparams on the mesh: the third argument of a compiled `lower(...).compile()`."""
        return jax.device_put(self.hparams, self.sharding)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        return self.jitted(state, batch, self.placed_hparams)

    def lower(self, state: TrainState, batch: Batch) -> Any:
        abstract = {
            k: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v), sharding=self.sharding)
            for k, v in self.hparams.items()
        }
        return self.jitted.lower(state, batch, abstract)


def jit_train_step(
    train_step: Callable,
    mesh: Mesh,
    state_shardings: Any,
    batch_shardings: Any,
    rules: Any,
    hparams: dict[str, Any],
    compiler_options: dict | None = None,
) -> BoundStep:
    """jit with explicit in/out shardings on `mesh`; the donated state is updated in place;
    `hparams` (the optimizer's) are an argument, replicated on the mesh."""

    @functools.wraps(train_step)
    def traced(state, batch, hparams):
        with nn.logical_axis_rules(rules), model_mesh(mesh):
            return train_step(state, batch, hparams)

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        traced,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
    return BoundStep(jitted, hparams, replicated)
