"""The training loop: resume, step, log, checkpoint, evaluate, stop on preemption or divergence.

`train(config, workdir)` is what `python -m clipjax.train` runs. Restarting it with the same
workdir resumes from the newest complete checkpoint: state, RNG and the data position are
restored, so the continued run computes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections

from clipjax.files import write_text
from clipjax.parallel.mesh import make_mesh
from clipjax.train import config as config_lib
from clipjax.train.builder import Trainer, build_trainer
from clipjax.train.checkpoint import FAULT_ENV, Checkpointer
from clipjax.train.metrics import MetricWriter, Progress, progress_log
from clipjax.train.state import TrainState

log = logging.getLogger(__name__)

# The eval hooks' batches hold these (besides strings); the train step takes image and text only.
_STEP_KEYS = ("image", "text")


class TrainingDiverged(RuntimeError):
    """Raised after `max_nonfinite` non-finite steps in a row; the message says what is intact."""


@dataclasses.dataclass
class TrainResult:
    step: int
    status: str  # 'completed' | 'preempted'
    last_checkpoint: int | None
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]


# ---------------------------------------------------------------------------------------------
# Workdir files
# ---------------------------------------------------------------------------------------------

def write_run_files(config: ml_collections.ConfigDict, trainer: Trainer, workdir: str) -> None:
    """config.json (the resolved train config) and model_config.json (the CLIPConfig, in the
    format of a model directory's config.json) in the workdir; process 0 only."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    from clipjax.export.modeldir import config_to_json

    write_text(os.path.join(workdir, "model_config.json"), config_to_json(trainer.model_config))


def prepare_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Generate the demo dataset when `data.demo_dir` is set, and point the globs at it."""
    if not config.data.demo_dir:
        return config
    from clipjax.data.demo import DEMO_CLASSNAMES, DEMO_TEMPLATES, make_demo_dataset

    ds = make_demo_dataset(config.data.demo_dir, n_train=config.data.demo_n_train,
                           n_test=config.data.demo_n_test)
    config = ml_collections.ConfigDict(config.to_dict())  # a copy we may edit
    config.data.train = ds.train
    config.data.demo_dir = ""
    if config.eval.zeroshot.classnames in ("", "demo"):
        config.eval.zeroshot.classnames = ",".join(DEMO_CLASSNAMES)
    if config.eval.zeroshot.templates in ("", "demo"):
        config.eval.zeroshot.templates = "|".join(DEMO_TEMPLATES)
    if config.eval.zeroshot.shards == "demo":
        config.eval.zeroshot.shards = ds.test
    if config.eval.retrieval.shards == "demo":
        config.eval.retrieval.shards = ds.test
    return config


# ---------------------------------------------------------------------------------------------
# Evaluation hooks and export
# ---------------------------------------------------------------------------------------------

def _names(spec: str, sep: str) -> list[str]:
    """Class names / templates from a comma- (templates: '|'-) separated list, else a file/asset."""
    if sep in spec or (sep == "," and " " in spec and not os.path.exists(spec)):
        return [s.strip() for s in spec.split(sep) if s.strip()]
    from clipjax.evaluate import classnames as cn

    return cn.load_classnames(spec) if sep == "," else cn.load_templates(spec)


def run_evals(trainer: Trainer, params: Any) -> dict[str, float]:
    """Zero-shot accuracy and retrieval recall on the configured held-out shards."""
    from clipjax.data.eval_pipeline import EvalPipeline

    cfg, mcfg, out = trainer.config.eval, trainer.model_config, {}

    def pipeline(shards: str) -> EvalPipeline:
        return EvalPipeline(shards, global_batch=cfg.batch_size, image_size=mcfg.image_size,
                            context_length=mcfg.context_length)

    if cfg.zeroshot.shards:
        from clipjax.evaluate.zeroshot import zeroshot_accuracy

        templates = _names(cfg.zeroshot.templates or "openai_imagenet_templates.txt", "|")
        res = zeroshot_accuracy(trainer.model, params, pipeline(cfg.zeroshot.shards),
                                _names(cfg.zeroshot.classnames, ","), templates,
                                mesh=trainer.mesh)
        out.update({f"zeroshot/{k}": v for k, v in res.items()})
    if cfg.retrieval.shards:
        from clipjax.evaluate.retrieval import retrieval_recall

        res = retrieval_recall(trainer.model, params, pipeline(cfg.retrieval.shards),
                               mesh=trainer.mesh)
        out.update({f"retrieval/{k}": v for k, v in res.items()})
    return out


def fetch_params(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-host sharded) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def export_model(trainer: Trainer, state: TrainState, out_dir: str, fmt: str) -> None:
    from clipjax.export.modeldir import save_model_dir

    params = fetch_params(state.params)
    if "model_state" in state.loss_state:
        params = {"params": params, **fetch_params(state.loss_state["model_state"])}
    if jax.process_index() == 0:
        save_model_dir(out_dir, trainer.model_config, params, fmt=fmt)
        log.info("exported the model to %s", out_dir)


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

class PreemptionWatch:
    """SIGTERM -> save and stop. Several processes agree on the step via JAX's preemption
    sync point (the multi-controller runtime propagates the notice); one process uses a flag."""

    def __init__(self):
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self._flag = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not running
                return False
        return self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _abstract(shardings: TrainState, like: Any) -> TrainState:
    return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shardings, like)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Train (or resume) `config` in `workdir`; see the module docstring."""
    # Everything but the files first, so a bad value fails before the demo data is generated.
    config_lib.validate(config, jax.device_count(), jax.process_count(), check_files=False)
    config = prepare_data(config)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = make_mesh(dict(config.mesh))
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
             jax.process_count())
    trainer = build_trainer(config, mesh)
    if log.isEnabledFor(logging.DEBUG):
        from clipjax.parallel.rules import describe

        like = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
        log.debug("param layout:\n%s", "\n".join(
            describe(trainer.state_shardings.params, like.params)))
    write_run_files(config, trainer, workdir)

    from clipjax.data.train_pipeline import TrainPipeline, gather_state
    from clipjax.parallel.placement import prefetch_to_device

    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                        config.checkpoint.async_save)
    latest = ckpt.latest_step()
    data_state = None
    if latest is None:
        state = trainer.init_state()
        log.info("starting from scratch in %s", workdir)
    else:
        like = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
        state, meta = ckpt.restore(latest, _abstract(trainer.state_shardings, like))
        data_state = meta.get("data")
        log.info("resumed from the checkpoint of step %d in %s", latest, workdir)
    step = int(jax.device_get(state.step))
    total = int(config.num_steps)

    mcfg = trainer.model_config
    pipeline = TrainPipeline(config.data.train, global_batch=config.batch_size,
                             image_size=mcfg.image_size, context_length=mcfg.context_length,
                             seed=config.seed, shuffle_buffer=config.data.shuffle_buffer,
                             crop_scale=tuple(config.data.augment_scale), state=data_state)
    writer = MetricWriter(workdir, tensorboard=config.tensorboard)
    progress = Progress(total, config.batch_size, start_step=step)
    watch = PreemptionWatch()
    status, last_metrics, eval_metrics = "completed", {}, {}
    pending: dict[str, jax.Array] | None = None  # metrics of the previous step (one-step lag)
    batches = prefetch_to_device(
        (({k: b[k] for k in _STEP_KEYS}, s) for b, s in pipeline), mesh) if step < total else iter(())
    try:
        for batch, host_data_state in progress.timed(batches):
            state, metrics = trainer.train_step(state, batch)
            step += 1
            if pending is not None:
                _check_divergence(pending, step - 1, config.max_nonfinite, ckpt)
            pending = metrics
            if os.environ.get(FAULT_ENV) == f"sigterm_at:{step}":  # preemption test hook
                os.kill(os.getpid(), signal.SIGTERM)
            preempted = watch.reached(step)
            if step % config.log_every == 0 or step == total or preempted:
                _check_divergence(metrics, step, config.max_nonfinite, ckpt)
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last_metrics.update(progress.rates(step))
                writer.write(step, last_metrics)
                if jax.process_index() == 0:
                    progress_log.info(progress.line(step, last_metrics))
            if ckpt.should_save(step, total) or preempted:
                meta = {"step": step, "data": gather_state(host_data_state)}
                ckpt.save(step, state, meta)
            if preempted:
                status = "preempted"
                log.warning("stopped at step %d after a preemption notice; checkpoint saved", step)
                break
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total:
                eval_metrics = run_evals(trainer, state.params)
                writer.write(step, eval_metrics)
            if step >= total:
                break
    finally:
        ckpt.wait()
        watch.close()
    if pending is not None:
        _check_divergence(pending, step, config.max_nonfinite, ckpt)
    if status == "completed" and config.eval.at_end:
        eval_metrics = run_evals(trainer, state.params)
        if eval_metrics:
            writer.write(step, eval_metrics)
    if status == "completed" and config.export.dir:
        export_model(trainer, state, config.export.dir, config.export.format)
    writer.close()
    ckpt.close()
    return TrainResult(step=step, status=status, last_checkpoint=ckpt.latest_step(),
                       final_metrics=last_metrics, eval_metrics=eval_metrics)


def _check_divergence(metrics: dict[str, jax.Array], step: int, limit: int,
                      ckpt: Checkpointer) -> None:
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= limit:
        ckpt.wait()
        good = ckpt.latest_step()
        raise TrainingDiverged(
            f"stopping at step {step}: {streak} non-finite losses/gradients in a row "
            f"(max_nonfinite={limit}); those updates were skipped, so the params are those of "
            f"step {step - streak}. The last checkpoint is "
            f"{'step ' + str(good) if good is not None else 'none'} in {ckpt.directory}; lower "
            "optimizer.lr or check the data before resuming")
