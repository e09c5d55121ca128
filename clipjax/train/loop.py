"""The training loop: restore or initialise, run steps with hooks, finish.

`train(config, workdir)` is what `python -m clipjax.train` runs. Restarting it with the same
workdir resumes from the newest complete checkpoint: state, RNG and the data position are
restored, so the continued run computes exactly what an uninterrupted one would have. A resume
whose config describes another model stops with a ConfigError before compiling; the workdir's
config.json / model_config.json are rewritten only once the state is restored (or initialised).
Between steps the hooks of clipjax.train.hooks check divergence, watch for preemption, log,
checkpoint and evaluate; callers may add their own.

Start-up: the phases up to the first step (the train step is compiled explicitly once the first
batch is there, to time it) and those of the end are printed as one line each and written to
metrics.jsonl (`startup/*`, `end/*`, clipjax.train.timeline).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections

from clipjax.files import read_text_if_exists, write_text
from clipjax.parallel.mesh import make_mesh
from clipjax.train import compile_cache
from clipjax.train import config as config_lib
from clipjax.train.builder import Trainer, build_trainer
from clipjax.train.checkpoint import Checkpointer, array_layout, layout_changes, model_changes
from clipjax.train.hooks import (
    ClusterWatch,
    DivergenceCheck,
    Evaluate,
    Hook,
    LogMetrics,
    PreemptionWatch,
    RunContext,
    SaveCheckpoints,
    TrainingDiverged,
    run_evals,
)
from clipjax.train.init_from import fresh_state
from clipjax.train.metrics import MetricWriter, Progress, progress_log
from clipjax.train.state import TrainState
from clipjax.train.timeline import Timeline, end_line, startup_line

__all__ = ["Hook", "TrainResult", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int
    status: str  # 'completed' | 'preempted'
    last_checkpoint: int | None
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    hooks: Sequence[Hook] = (),
    timeline: Timeline | None = None,
) -> TrainResult:
    """Train (or resume) `config` in `workdir`; `hooks` run after each step, before the
    built-in ones (see clipjax.train.hooks). `timeline`: the start-up so far (the CLI's, from
    process start); by default the start-up is timed from this call."""
    timeline = timeline or Timeline()
    compile_cache.enable(config.compile_cache_dir)
    startup = Startup(timeline)  # from here, compilation cache hits count
    config_lib.validate(config, jax.device_count(), jax.process_count())
    timeline.mark("mesh")  # the backends start on first use
    pipeline = train_pipeline(config)  # lists and checks the shards, before any compiling
    timeline.mark("data")
    ckpt = Checkpointer(
        workdir, config.checkpoint.every_steps, config.checkpoint.keep, config.checkpoint.async_save
    )
    try:
        check_same_model(config, ckpt)  # before compiling, and before the run files change
        trainer = setup(config, has_labels=pipeline.info.has_label)
        run, clusters = start_run(config, workdir, trainer, ckpt, pipeline, hooks)
    except BaseException:
        ckpt.close_unused()
        raise
    timeline.mark("init")
    end = None
    try:
        if run.step < run.total:
            batches = train_batches(trainer, pipeline, observe=clusters.observe)
            try:
                run_steps(run, batches, startup)
            finally:  # stop the input pipeline's threads now, not at interpreter exit
                batches.close()
        end = Timeline()
    finally:
        ckpt.wait()
        for hook in run.hooks:
            hook.close()
    end.mark("final save")
    for hook in run.hooks:
        hook.end(run)
    return finish(run, end)


def start_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    trainer: Trainer,
    ckpt: Checkpointer,
    pipeline,
    hooks: Sequence[Hook],
) -> tuple[RunContext, ClusterWatch]:
    """The restored or initialised state, the run files and the hooks (and of those the
    ClusterWatch, which observes the batches), with the pipeline at the data position."""
    state, data_state = restore_or_init(trainer, ckpt, workdir)
    write_run_files(config, trainer, workdir)
    if data_state is not None:
        pipeline.restore(data_state)
    step = int(jax.device_get(state.step))
    run = RunContext(
        trainer=trainer,
        checkpointer=ckpt,
        state=state,
        step=step,
        total=int(config.num_steps),
        writer=MetricWriter(workdir, tensorboard=config.tensorboard),
        progress=Progress(int(config.num_steps), config.batch_size, start_step=step),
    )
    clusters = ClusterWatch()
    run.hooks = [
        DivergenceCheck(),
        *hooks,
        PreemptionWatch(),
        clusters,  # before LogMetrics: it adds the caption-overlap figures to the step's metrics
        LogMetrics(),
        SaveCheckpoints(),
        Evaluate(),
    ]
    return run, clusters


def setup(config: ml_collections.ConfigDict, has_labels: bool = False) -> Trainer:
    """The mesh and the compiled trainer (`has_labels`: the shards carry labels)."""
    mesh = make_mesh(dict(config.mesh))
    log.info(
        "mesh %s over %d devices (%d processes)",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
    )
    try:
        trainer = build_trainer(config, mesh, has_labels=has_labels)
    except ValueError as e:  # e.g. loss.positives='label' on shards without labels
        raise config_lib.ConfigError(f"config.loss: {e}") from None
    if log.isEnabledFor(logging.DEBUG):
        from clipjax.parallel.rules import describe

        log.debug(
            "param layout:\n%s",
            "\n".join(describe(trainer.state_shardings.params, trainer.abstract_state.params)),
        )
    return trainer


def check_same_model(config: ml_collections.ConfigDict, ckpt: Checkpointer) -> None:
    """ConfigError listing the changed fields if the newest checkpoint holds another model than
    `config` describes (compute-only fields, like the rest of the train config, may change)."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    meta = ckpt.read_meta(latest)
    if "model_fingerprint" not in meta:
        log.warning(
            "the checkpoint of step %d records no model config (an older clipjax wrote it); "
            "resuming without checking that config.model is unchanged",
            latest,
        )
        return
    changes = model_changes(meta, config_lib.model_config(config))
    if changes:
        listed = "; ".join(f"{k}: {old!r} (checkpoint) -> {new!r} (now)" for k, old, new in changes)
        raise config_lib.ConfigError(
            f"config.model describes another model than the checkpoint of step {latest} in "
            f"{ckpt.directory}: {listed}. Resume with the checkpoint's model (its config is in "
            "the workdir's model_config.json) or train in a new workdir"
        )


def check_same_state_layout(
    config: ml_collections.ConfigDict, ckpt: Checkpointer, step: int, state: Any, workdir: str
) -> None:
    """ConfigError naming the arrays (and the train config fields changed since config.json was
    written) when `config` builds a state of another layout than checkpoint `step` holds, e.g.
    another loss.queue_size, optimizer or lock: before anything is read or compiled."""
    changes = layout_changes(ckpt.state_layout(step), array_layout(state.to_dict()))
    if not changes:
        return
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    old_config = read_text_if_exists(os.path.join(workdir, "config.json"))
    fields = config_lib.changed_fields(old_config, config)
    changed = f" Changed since the run that wrote it: {'; '.join(fields)}." if fields else ""
    raise config_lib.ConfigError(
        f"the checkpoint of step {step} in {ckpt.directory} holds a training state of another "
        f"layout than this config builds.{changed} Arrays that differ ({len(changes)}): "
        f"{shown}. Resume with the workdir's config.json or train in a new workdir"
    )


def restore_or_init(
    trainer: Trainer, ckpt: Checkpointer, workdir: str
) -> tuple[TrainState, dict | None]:
    """The newest complete checkpoint's state and data position, or a fresh state."""
    latest = ckpt.latest_step()
    if latest is None:  # config.init applies to a fresh run only: a checkpoint wins
        log.info("starting from scratch in %s", workdir)
        return fresh_state(trainer, workdir), None
    check_same_state_layout(trainer.config, ckpt, latest, trainer.abstract_state, workdir)
    state, meta = ckpt.restore(latest, trainer.abstract_state)
    log.info("resumed from the checkpoint of step %d in %s", latest, workdir)
    return state, meta.get("data")


def train_pipeline(config: ml_collections.ConfigDict):
    """This host's TrainPipeline over `config.data.train` (a MixturePipeline for a mixture of
    sources), at the start of the data."""
    from clipjax.data.mixture import MixturePipeline, is_mixture
    from clipjax.data.records import parse_caption_ratio
    from clipjax.data.train_pipeline import TrainPipeline

    mcfg = config_lib.model_config(config)
    kwargs = dict(
        global_batch=config.batch_size,
        image_size=mcfg.image_size,
        context_length=mcfg.context_length,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        read_windows=config.data.read_windows,
        crop_scale=tuple(config.data.crop_scale),
        caption_ratio=parse_caption_ratio(config.data.caption_ratio),
    )
    if is_mixture(config.data.train):
        return MixturePipeline(
            config.data.train,
            resampled=config.data.resampled,
            epoch_samples=config.data.epoch_samples,
            **kwargs,
        )
    return TrainPipeline(config.data.train, **kwargs)


def train_batches(
    trainer: Trainer, pipeline, observe: Callable[[dict], None] = lambda batch: None
) -> Iterator:
    """(global batch, host data state) pairs from `pipeline`'s position; `observe` sees each host
    batch (labels included) first. Close the generator when done: that stops the pipeline."""
    from clipjax.data.stream import closing_iter
    from clipjax.parallel.placement import prefetch_to_device

    def step_batches():
        with closing_iter(pipeline) as pairs:
            for batch, state in pairs:
                observe(batch)
                yield {k: batch[k] for k in trainer.batch_shardings}, state

    return prefetch_to_device(step_batches(), trainer.mesh)


class Startup:
    """Times the start-up phases that end at the first step and reports them once it ran:
    `first_batch(run, batch)` when the first batch is there (it compiles the train step, while
    the input pipeline's threads prepare the next batches), `first_step(run)` after it."""

    def __init__(self, timeline: Timeline):
        self.timeline = timeline
        self._hits = compile_cache.hits()

    def first_batch(self, run: RunContext, batch: Any) -> None:
        self.timeline.mark("first batch")
        run.trainer.train_step.lower(run.state, batch).compile()  # what the first call runs
        self.timeline.mark("compile")

    def first_step(self, run: RunContext) -> None:
        """Wait for the first step, then print and write the start-up."""
        jax.block_until_ready(run.metrics)
        self.timeline.mark("first step")
        run.progress.first_step_done(run.step, self.timeline.phases["first step"])
        total = self.timeline.elapsed()
        hits = compile_cache.hits() - self._hits
        scalars = self.timeline.metrics("startup") | {
            "startup/total_s": total,
            "startup/compile_cache_hits": hits,
        }
        run.writer.write(run.step, scalars)
        if jax.process_index() == 0:
            notes = {"compile": f"{hits} from the compilation cache"} if hits else {}
            progress_log.info(startup_line(self.timeline, total, notes))


def run_steps(run: RunContext, batches: Iterator, startup: Startup | None = None) -> None:
    """Train steps until `run.total` or a hook sets `run.stop`; `startup` reports the first."""
    for batch, data_state in run.progress.timed(batches):
        if startup is not None:
            startup.first_batch(run, batch)
        run.state, run.metrics = run.trainer.train_step(run.state, batch)
        run.step += 1
        if startup is not None:
            startup.first_step(run)
            startup = None
        run.data_state = data_state
        for hook in run.hooks:
            hook.after_step(run)
        if run.stop or run.step >= run.total:
            break


def finish(run: RunContext, end: Timeline | None = None) -> TrainResult:
    """End-of-training evaluation and export (unless preempted); the end's timing (`end`: its
    phases so far); close the writers."""
    config, end = run.config, end or Timeline()
    if not run.preempted and config.eval.at_end:
        run.eval_metrics = run_evals(run.trainer, run.state.params)
        if run.eval_metrics:
            run.writer.write(run.step, run.eval_metrics)
        end.mark("eval")
    if not run.preempted and config.export.dir:
        export_model(run.trainer, run.state, config.export.dir, config.export.format)
        end.mark("export")
    run.checkpointer.close()
    end.mark("close")
    run.writer.write(run.step, end.metrics("end"))
    if jax.process_index() == 0:
        progress_log.info(end_line(end))
    run.writer.close()
    return TrainResult(
        step=run.step,
        status="preempted" if run.preempted else "completed",
        last_checkpoint=run.checkpointer.latest_step(),
        final_metrics=run.last_metrics,
        eval_metrics=run.eval_metrics,
    )


def write_run_files(config: ml_collections.ConfigDict, trainer: Trainer, workdir: str) -> None:
    """config.json (the resolved train config) and model_config.json (the CLIPConfig, in the
    format of a model directory's config.json) in the workdir; process 0 only."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    from clipjax.export.modeldir import config_to_json

    write_text(os.path.join(workdir, "model_config.json"), config_to_json(trainer.model_config))


def fetch_params(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-host sharded) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def export_model(trainer: Trainer, state: TrainState, out_dir: str, fmt: str) -> None:
    from clipjax.export.modeldir import save_model_dir

    params = fetch_params(state.params)
    if state.model_state:
        params = {"params": params, **fetch_params(state.model_state)}
    if jax.process_index() == 0:
        save_model_dir(out_dir, trainer.model_config, params, fmt=fmt)
        log.info("exported the model to %s", out_dir)
