"""What the training loop does between steps, as hooks: divergence checks, preemption, metric
logging, checkpointing and evaluation. Callers (and tests) add their own through
`train(config, workdir, hooks=[...])`.

After every step the loop calls `after_step(run)` on each hook in order; a hook that saves a
checkpoint calls `after_save(run)` on every hook once the (possibly async) save has started. A
hook stops the run by setting `run.stop`; `end(run)` runs after the last step of a run that did
not raise, `close()` always.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from clipjax.train.builder import Trainer
from clipjax.train.checkpoint import Checkpointer, model_meta
from clipjax.train.homogeneity import MIN_BATCHES, CaptionOverlap, overlap_excess
from clipjax.train.metrics import MetricWriter, Progress, progress_log

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `max_nonfinite` non-finite steps in a row; the message says what is intact."""


@dataclasses.dataclass
class RunContext:
    """The run as hooks see it: position, latest state and metrics, and what hooks decided."""

    trainer: Trainer
    checkpointer: Checkpointer
    writer: MetricWriter
    progress: Progress
    step: int
    total: int
    hooks: list[Hook] = dataclasses.field(default_factory=list)
    state: Any = None  # the TrainState after `step`
    metrics: dict[str, jax.Array] | None = None  # this step's (device) metrics
    data_state: dict | None = None  # this host's input position after `step`
    preempted: bool = False
    stop: bool = False
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def config(self):
        return self.trainer.config


class Hook:
    """Base class of the loop's hooks; every method is optional."""

    def after_step(self, run: RunContext) -> None:
        """After the train step of `run.step` (on every process)."""

    def after_save(self, run: RunContext) -> None:
        """Right after the checkpoint of `run.step` started saving."""

    def end(self, run: RunContext) -> None:
        """After the last step, when the run ends without an error."""

    def close(self) -> None:
        """Always, when the run ends."""


def check_divergence(
    metrics: dict[str, jax.Array], step: int, limit: int, ckpt: Checkpointer
) -> None:
    """Raise TrainingDiverged when the metrics' non-finite streak reached `limit`."""
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= limit:
        ckpt.wait()
        good = ckpt.latest_step()
        raise TrainingDiverged(
            f"stopping at step {step}: {streak} non-finite losses/gradients in a row "
            f"(max_nonfinite={limit}); those updates were skipped, so the params are those of "
            f"step {step - streak}. The last checkpoint is "
            f"{'step ' + str(good) if good is not None else 'none'} in {ckpt.directory}; lower "
            "optimizer.lr or check the data before resuming"
        )


class DivergenceCheck(Hook):
    """Checks each step's non-finite streak one step late, so the check never waits on the
    device (logging steps check their own step at once)."""

    def __init__(self):
        self._pending: dict[str, jax.Array] | None = None

    def after_step(self, run: RunContext) -> None:
        if self._pending is not None:
            check_divergence(
                self._pending, run.step - 1, run.config.max_nonfinite, run.checkpointer
            )
        self._pending = run.metrics

    def end(self, run: RunContext) -> None:
        if self._pending is not None:
            check_divergence(self._pending, run.step, run.config.max_nonfinite, run.checkpointer)


class PreemptionWatch(Hook):
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

    def after_step(self, run: RunContext) -> None:
        run.preempted = run.preempted or self.reached(run.step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def is_log_step(run: RunContext) -> bool:
    """Metrics are logged every `log_every` steps, at the last step and at a preempted step."""
    return run.step % run.config.log_every == 0 or run.step == run.total or run.preempted


class LogMetrics(Hook):
    """Metrics to the writer and the progress line every `log_every` steps, the last step and a
    preempted step."""

    def after_step(self, run: RunContext) -> None:
        cfg, step = run.config, run.step
        if not is_log_step(run):
            return
        check_divergence(run.metrics, step, cfg.max_nonfinite, run.checkpointer)
        run.last_metrics = {k: float(v) for k, v in jax.device_get(run.metrics).items()}
        run.last_metrics.update(run.progress.rates(step))
        if run.data_state is not None and "sources" in run.data_state:  # a mixture
            from clipjax.data.mixture import mixture_metrics
            from clipjax.data.train_pipeline import gather_state

            run.last_metrics.update(mixture_metrics(gather_state(run.data_state)))
        run.writer.write(step, run.last_metrics)
        if jax.process_index() == 0:
            progress_log.info(run.progress.line(step, run.last_metrics))


class SaveCheckpoints(Hook):
    """A checkpoint (state + data position) when due and on preemption; then stop if preempted."""

    def after_step(self, run: RunContext) -> None:
        if run.checkpointer.should_save(run.step, run.total) or run.preempted:
            from clipjax.data.train_pipeline import gather_state

            meta = {
                "step": run.step,
                "data": gather_state(run.data_state),
                **model_meta(run.trainer.model_config),
            }
            run.checkpointer.save(run.step, run.state, meta)
            for hook in run.hooks:
                hook.after_save(run)
        if run.preempted:
            run.stop = True
            log.warning("stopped at step %d after a preemption notice; checkpoint saved", run.step)


class Evaluate(Hook):
    """Zero-shot / retrieval evaluation every `eval.every_steps` steps (not on the last step,
    which the end of training evaluates)."""

    def after_step(self, run: RunContext) -> None:
        every = run.config.eval.every_steps
        if run.stop or not every or run.step % every or run.step >= run.total:
            return
        run.eval_metrics = run_evals(run.trainer, run.state.params)
        run.writer.write(run.step, run.eval_metrics)


def _templates(spec: str) -> list[str]:
    """Prompt templates from a '|'-separated list, else a packaged set or file."""
    if "|" in spec:
        return [s.strip() for s in spec.split("|") if s.strip()]
    from clipjax.evaluate.classnames import load_templates

    return load_templates(spec)


def run_evals(trainer: Trainer, params: Any) -> dict[str, float]:
    """Zero-shot accuracy and retrieval recall on the configured held-out shards, and the
    figures of `eval.suite` (as suite/<task>/<metric>)."""
    from clipjax.data.eval_pipeline import EvalPipeline

    cfg, mcfg, out = trainer.config.eval, trainer.model_config, {}

    def pipeline(shards: str) -> EvalPipeline:
        return EvalPipeline(
            shards,
            global_batch=cfg.batch_size,
            image_size=mcfg.image_size,
            context_length=mcfg.context_length,
        )

    if cfg.zeroshot.shards:
        from clipjax.evaluate.zeroshot import zeroshot_accuracy

        templates = _templates(cfg.zeroshot.templates or "openai_imagenet_templates.txt")
        from clipjax.evaluate.classnames import classnames_for_shards

        classnames, _ = classnames_for_shards(  # its notes were logged by the config's validate
            cfg.zeroshot.classnames, cfg.zeroshot.shards, "eval.zeroshot.classnames"
        )
        res = zeroshot_accuracy(
            trainer.model,
            params,
            pipeline(cfg.zeroshot.shards),
            classnames,
            templates,
            mesh=trainer.mesh,
        )
        out.update({f"zeroshot/{k}": v for k, v in res.items()})
    if cfg.retrieval.shards:
        from clipjax.evaluate.retrieval import retrieval_recall

        res = retrieval_recall(
            trainer.model, params, pipeline(cfg.retrieval.shards), mesh=trainer.mesh
        )
        out.update({f"retrieval/{k}": v for k, v in res.items()})
    if cfg.suite:
        from clipjax.evaluate.suite import load_suite, run_suite, suite_metrics

        results = run_suite(
            load_suite(cfg.suite),
            trainer.model,
            params,
            mesh=trainer.mesh,
            batch_size=cfg.batch_size,
        )
        out.update(suite_metrics(results))
    return out


_CLUSTER_ADVICE = (
    "Plain InfoNCE then treats true matches as negatives. Re-write the shards with "
    "make_shards (it shuffles by default), or read them with data.read_windows=16 and "
    "train with loss.positives=auto (README: 'Batches of one category')"
)
OVERLAP_EXCESS = 0.08  # clipjax.train.homogeneity.overlap_excess above which batches are sorted


class ClusterWatch(Hook):
    """Warns when training batches hold one category ("a batch all about cats").

    Observes each host batch's labels (when the shards carry them) or caption token rows, keeps
    their frequencies (at most `max_keys` distinct ones), and compares the trainer's in-batch
    shares of pairs with one label / one caption (`batch/same_label`, `batch/same_caption`) with
    the share random batches would have, sum(p_k^2). Clustered: over twice that and 10 points
    above it. Captions of one category in varied wordings have few identical pairs, so it also
    compares the word overlap of captions within a batch with that across recent batches
    (clipjax.train.homogeneity; logged as `batch/caption_overlap` and `..._across`): clustered
    when the excess is over OVERLAP_EXCESS. Runs before LogMetrics, which writes its figures.
    """

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._counts: dict[Any, int] = {}
        self._kind: str | None = None
        self.overlap = CaptionOverlap()
        self.warned = False

    def observe(self, batch: Mapping[str, np.ndarray]) -> None:
        kind = "label" if "label" in batch else "caption"
        self._kind = kind
        rows = batch["label"].tolist() if kind == "label" else [r.tobytes() for r in batch["text"]]
        for key in rows:
            if key in self._counts:
                self._counts[key] += 1
            elif len(self._counts) < self.max_keys:
                self._counts[key] = 1
        self.overlap.observe(batch["text"])

    def expected_share(self) -> float:
        """The share of pairs of one label/caption among random batches of what was seen."""
        counts = np.fromiter(self._counts.values(), np.float64)
        total = counts.sum()
        return float(np.sum((counts / total) ** 2)) if total else 0.0

    def overlap_metrics(self) -> dict[str, float]:
        """{'batch/caption_overlap', 'batch/caption_overlap_across'} once enough batches were
        seen, else {}."""
        sim = self.overlap.similarity() if self.overlap.batches >= MIN_BATCHES else None
        if sim is None:
            return {}
        return {"batch/caption_overlap": sim[0], "batch/caption_overlap_across": sim[1]}

    def after_step(self, run: RunContext) -> None:
        if not is_log_step(run):
            return
        figures = self.overlap_metrics()
        if figures:
            run.metrics = {**run.metrics, **figures}
        if jax.process_index() == 0 and not self.warned:
            shares = {
                k: float(jax.device_get(run.metrics[k]))
                for k in ("batch/same_label", "batch/same_caption")
                if k in run.metrics
            }
            warning = self.check({**shares, **figures})
            if warning:
                log.warning("step %d: %s", run.step, warning)

    def check(self, metrics: Mapping[str, float]) -> str | None:
        """A warning (once per run) when the batch in `metrics` is clustered, else None. Without
        overlap figures in `metrics`, they are computed from the observed batches."""
        if self.warned:
            return None
        key = f"batch/same_{self._kind}"
        if self._kind is not None and key in metrics:
            share, expected = float(metrics[key]), self.expected_share()
            if share > max(2 * expected, expected + 0.1):
                self.warned = True
                return (
                    f"training batches are clustered: {100 * share:.0f}% of in-batch pairs "
                    f"share a {self._kind}, random batches of this data would give "
                    f"{100 * expected:.0f}%. " + _CLUSTER_ADVICE
                )
        if "batch/caption_overlap" not in metrics:
            metrics = {**metrics, **self.overlap_metrics()}
        if "batch/caption_overlap" not in metrics:
            return None
        within, across = metrics["batch/caption_overlap"], metrics["batch/caption_overlap_across"]
        if overlap_excess(within, across) <= OVERLAP_EXCESS:
            return None
        self.warned = True
        return (
            f"training batches look like one category each: captions of one batch share more "
            f"words (mean bag-of-words cosine {within:.2f}) than captions of different recent "
            f"batches ({across:.2f}; random batches give about equal figures), though few are "
            f"identical. " + _CLUSTER_ADVICE
        )
