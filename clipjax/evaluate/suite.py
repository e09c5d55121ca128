"""Evaluation suites: many tasks over many data sets, one table and one JSON (as CLIP_benchmark).

A suite is JSON (or a Python config file defining `get_suite()` that returns the same dict):

  {"name": "mine", "data_dir": "~/tensorflow_datasets", "batch_size": 64,
   "tasks": [
     {"task": "zeroshot", "name": "cifar10/zeroshot", "data": "tfds:cifar10:test",
      "classnames": "cifar10.txt" | ["airplane", ...], "templates": "openai" | ["a {}.", ...]},
     {"task": "retrieval", "data": "captions/test/*.tfrecord"},
     {"task": "linear_probe", "train": "tfds:cifar10:train", "data": "tfds:cifar10:test"},
     {"task": "fewshot", "train": "tfds:cifar10:train", "data": "tfds:cifar10:test",
      "shots": [1, 5, 10, 25], "seeds": 3}]}

`data` / `train` are anything clipjax.evaluate.data opens (TFRecord shards, class folders,
tfds:NAME[:SPLIT] prepared under `data_dir`); relative paths are relative to the current
directory. A task whose data is missing is skipped with the reason; a task that fails on its
data is reported as failed; neither stops the others. Train and test embeddings are computed
once per data set and shared by the tasks of one run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import importlib_resources
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger(__name__)

KINDS = ("zeroshot", "retrieval", "linear_probe", "fewshot")
PROBES = ("linear_probe", "fewshot")
_COMMON = {"task", "name", "data", "limit", "image_field", "label_field", "text_field"}
_KEYS = {
    "zeroshot": _COMMON | {"classnames", "templates"},
    "retrieval": _COMMON,
    "linear_probe": _COMMON | {"train", "train_limit", "l2_grid", "val_fraction"},
    "fewshot": _COMMON | {"train", "train_limit", "shots", "seeds", "l2"},
}
_SUITE_KEYS = {"name", "data_dir", "batch_size", "tasks"}
_FIELDS = ("image_field", "label_field", "text_field")


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation: `kind` on test data `data` (probes: fit on `train`)."""

    name: str
    kind: str
    data: str
    train: str | None = None
    limit: int | None = None
    train_limit: int | None = None
    classnames: tuple[str, ...] | None = None  # zero-shot; None: the data set's own
    templates: tuple[str, ...] | None = None
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)  # tfds features
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # probe settings


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[Task, ...]
    data_dir: str | None = None
    batch_size: int | None = None
    source: str = ""


# ------------------------------------------------------------------ loading
def packaged_suites() -> list[str]:
    """Names of the suites shipped with clipjax (clipjax/evaluate/suites/NAME.json)."""
    root = importlib_resources.files("clipjax.evaluate") / "suites"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_suite(spec: str) -> Suite:
    """A packaged suite by name, a .json file, or a .py config file defining get_suite().

    A .py suite is executed like a training config: load only files you wrote or trust."""
    if spec in packaged_suites() and not os.path.exists(spec):
        text = importlib_resources.files("clipjax.evaluate") / "suites" / f"{spec}.json"
        return parse_suite(json.loads(text.read_text(encoding="utf-8")), f"packaged:{spec}")
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"--suite {spec}: no such file (expected a .json or .py suite file, or one of the "
            f"packaged suites {packaged_suites()})"
        )
    if spec.endswith(".json"):
        with open(spec, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--suite {spec}: not valid JSON: {e}") from None
    elif spec.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("_clipjax_suite", spec)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_suite", None)):
            raise ValueError(f"--suite {spec}: a .py suite must define get_suite() -> dict")
        raw = module.get_suite()
    else:
        raise ValueError(f"--suite {spec}: expected a .json or .py file")
    return parse_suite(raw, spec)


def parse_suite(raw: Any, source: str = "suite") -> Suite:
    """Check a suite dict (see the module docstring); errors name the task and the key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: a suite is a JSON object with a 'tasks' list")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {sorted(unknown)}; expected {sorted(_SUITE_KEYS)}"
        )
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{source}: 'tasks' must be a non-empty list")
    batch_size = raw.get("batch_size")
    if batch_size is not None:
        _positive_int(batch_size, f"{source}: batch_size")
    data_dir = raw.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f"{source}: data_dir must be a path string")
    parsed = [_parse_task(t, f"{source}: task {i}") for i, t in enumerate(tasks)]
    names = [t.name for t in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{source}: task names must be unique; repeated: {dup} (set 'name')")
    return Suite(
        name=str(raw.get("name") or os.path.splitext(os.path.basename(source))[0]),
        tasks=tuple(parsed),
        data_dir=os.path.expanduser(data_dir) if data_dir else None,
        batch_size=batch_size,
        source=source,
    )


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def _strings(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v):
        raise ValueError(f"{what} must be a non-empty list of strings or a name/file, got {v!r}")
    return tuple(v)


def _parse_task(raw: Any, where: str) -> Task:
    """One task of a suite file, checked; `where` names it in errors."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {raw!r}")
    kind = raw.get("task")
    if kind not in KINDS:
        raise ValueError(f"{where}: 'task' must be one of {list(KINDS)}, got {kind!r}")
    where = f"{where} ({raw.get('name') or kind})"
    unknown = set(raw) - _KEYS[kind]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for a {kind} task")
    for key in ("data",) + (("train",) if kind in PROBES else ()):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{where}: '{key}' (a data spec string) is required")
    limits = {
        k: _positive_int(raw[k], f"{where}: {k}") for k in ("limit", "train_limit") if k in raw
    }
    classnames, templates = _parse_prompts(raw, where)
    fields = {}
    for k in _FIELDS:
        if k in raw:
            if not isinstance(raw[k], str) or not raw[k]:
                raise ValueError(f"{where}: {k} must be a feature name")
            fields[k] = raw[k]
    return Task(
        name=str(raw.get("name") or f"{short_name(raw['data'])}/{kind}"),
        kind=kind,
        data=raw["data"],
        train=raw.get("train"),
        limit=limits.get("limit"),
        train_limit=limits.get("train_limit"),
        classnames=classnames,
        templates=templates,
        fields=fields,
        options=_parse_options(raw, where),
    )


def _parse_prompts(
    raw: Mapping, where: str
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """A task's (classnames, templates): lists, or names/files of lists; None when not given."""
    from clipjax.evaluate.classnames import load_classnames, load_templates

    classnames = templates = None
    if "classnames" in raw:
        v = raw["classnames"]
        classnames = (
            tuple(load_classnames(v)) if isinstance(v, str) else _strings(v, f"{where}: classnames")
        )
    if "templates" in raw:
        v = raw["templates"]
        templates = (
            tuple(load_templates(v)) if isinstance(v, str) else _strings(v, f"{where}: templates")
        )
        if any("{}" not in t for t in templates):
            raise ValueError(f"{where}: every template needs '{{}}' for the class name")
    return classnames, templates


def _parse_options(raw: Mapping, where: str) -> dict[str, Any]:
    """A task's probe options (l2_grid, val_fraction, shots, seeds, l2), checked."""
    options = {k: raw[k] for k in ("l2_grid", "val_fraction", "shots", "seeds", "l2") if k in raw}
    if "shots" in options:
        shots = options["shots"]
        if not isinstance(shots, list) or not shots:
            raise ValueError(f"{where}: shots must be a list of positive integers")
        for s in shots:
            _positive_int(s, f"{where}: each of shots")
    if "seeds" in options:
        _positive_int(options["seeds"], f"{where}: seeds")
    if "l2_grid" in options:
        grid = options["l2_grid"]
        if not isinstance(grid, list) or not grid or not all(_is_pos(g) for g in grid):
            raise ValueError(f"{where}: l2_grid must be a list of positive numbers")
    if "l2" in options and not _is_pos(options["l2"]):
        raise ValueError(f"{where}: l2 must be a positive number")
    if "val_fraction" in options and not (
        _is_pos(options["val_fraction"]) and options["val_fraction"] < 1
    ):
        raise ValueError(f"{where}: val_fraction must be in (0, 1)")
    return options


def _is_pos(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def short_name(spec: str) -> str:
    """A readable data set name: tfds:NAME[:SPLIT] -> NAME; a path -> its last plain folder."""
    if spec.startswith("tfds:"):
        return spec.split(":")[1]
    parts = [p for p in spec.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]
    return parts[-1] if parts else spec


# ------------------------------------------------------------------ running
def missing_data(spec: str, data_dir: str | None = None) -> str | None:
    """Why `spec` cannot be read (not there / not prepared), or None when it is there."""
    if spec.startswith("tfds:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            return None  # malformed: open_eval_data words the error
        name, split = parts[1], parts[2] if len(parts) == 3 else "test"
        import tensorflow_datasets as tfds

        where = data_dir or "the default tfds data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # unknown name, missing builder module, ...
            return f"tfds dataset {name!r} not found: {str(e).splitlines()[0]}"
        if not builder.is_prepared():
            return f"tfds dataset {name!r} is not prepared under {where} (`tfds build {name}`)"
        if split.split("[")[0] not in builder.info.splits:
            return f"tfds dataset {name!r} has no split {split!r} ({sorted(builder.info.splits)})"
        return None
    from clipjax.evaluate.data import shard_files

    if shard_files(spec) or os.path.isdir(spec):
        return None
    return f"{spec}: no such files or directory"


class _Runner:
    """Runs tasks of one model; caches image embeddings by data set (shared across tasks)."""

    def __init__(self, model, params, mesh, batch_size: int, data_dir: str | None):
        from clipjax.evaluate.embed import Encoder

        self.model, self.params, self.mesh = model, params, mesh
        self.batch_size, self.data_dir = batch_size, data_dir
        self.encoder = Encoder(model, params, mesh=mesh, batch_size=batch_size)
        self._embeddings: dict[tuple, tuple[np.ndarray, np.ndarray, list[str] | None]] = {}

    def open(self, spec: str, limit: int | None, fields: Mapping[str, str]):
        from clipjax.evaluate.data import open_eval_data

        cfg = self.model.config
        return open_eval_data(
            spec,
            image_size=cfg.image_size,
            context_length=cfg.context_length,
            batch_size=self.batch_size,
            limit=limit,
            tfds_fields=dict(fields),
            data_dir=self.data_dir,
        )

    def embeddings(self, spec: str, limit: int | None, fields: Mapping[str, str]):
        from clipjax.evaluate.embed import embed_labelled

        key = (spec, limit, tuple(sorted(fields.items())))
        if key not in self._embeddings:
            data = self.open(spec, limit, fields)
            emb, labels = embed_labelled(self.encoder, data)
            self._embeddings[key] = (emb, labels, data.classnames)
        return self._embeddings[key]

    def run(self, task: Task) -> dict[str, float]:
        if task.kind == "zeroshot":
            from clipjax.evaluate.zeroshot import zeroshot_accuracy

            data = self.open(task.data, task.limit, task.fields)
            classnames = task.classnames or [c.replace("_", " ") for c in data.classnames or []]
            if not classnames:
                raise ValueError(f"{task.data}: the data set names no classes; set 'classnames'")
            templates = task.templates or _default_templates(classnames)
            metrics = zeroshot_accuracy(
                self.model, self.params, data, classnames, templates, mesh=self.mesh
            )
        elif task.kind == "retrieval":
            from clipjax.evaluate.retrieval import retrieval_recall

            data = self.open(task.data, task.limit, task.fields)
            metrics = retrieval_recall(
                self.model, self.params, data, mesh=self.mesh, batch_size=self.batch_size
            )
        else:
            from clipjax.evaluate import probe

            tr_x, tr_y, names = self.embeddings(task.train, task.train_limit, task.fields)
            te_x, te_y, test_names = self.embeddings(task.data, task.limit, task.fields)
            names = names or test_names
            kwargs = {"num_classes": len(names)} if names else {}
            opts = dict(task.options)
            if task.kind == "linear_probe":
                if "l2_grid" in opts:
                    opts["l2_grid"] = tuple(opts["l2_grid"])
                metrics = probe.linear_probe(tr_x, tr_y, te_x, te_y, **kwargs, **opts)
            else:
                metrics = probe.fewshot(tr_x, tr_y, te_x, te_y, **kwargs, **opts)
            return metrics
        metrics["skipped"] = float(data.skipped)
        return metrics


def _default_templates(classnames: Sequence[str]) -> tuple[str, ...]:
    from clipjax.data.demo import DEMO_CLASSNAMES, DEMO_TEMPLATES
    from clipjax.evaluate.classnames import load_templates

    if tuple(classnames) == DEMO_CLASSNAMES:
        return DEMO_TEMPLATES
    return tuple(load_templates("openai"))


def run_task(
    task: Task,
    model: Any,
    params: Any,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 64,
    data_dir: str | None = None,
) -> dict[str, float]:
    """The metrics of one task (errors, including missing data, raise)."""
    return _Runner(model, params, mesh, batch_size, data_dir).run(task)


def run_suite(
    suite: Suite,
    model: Any,
    params: Any,
    *,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    data_dir: str | None = None,
) -> list[dict[str, Any]]:
    """One result per task: {'name', 'task', 'status': ok | skipped | failed, 'metrics' or
    'reason', 'seconds', ...}. `batch_size` / `data_dir` override the suite's."""
    data_dir = data_dir or suite.data_dir
    runner = _Runner(model, params, mesh, batch_size or suite.batch_size or 64, data_dir)
    results, missing = [], {}
    for task in suite.tasks:
        result: dict[str, Any] = {"name": task.name, "task": task.kind, "data": task.data}
        if task.train:
            result["train"] = task.train
        start = time.time()
        for spec in (task.data, task.train):
            if spec and spec not in missing:
                missing[spec] = missing_data(spec, data_dir)
        reason = missing.get(task.data) or missing.get(task.train)
        if reason:
            result.update(status="skipped", reason=reason)
            log.warning("suite task %s skipped: %s", task.name, reason)
        else:
            try:
                result.update(status="ok", metrics=runner.run(task))
            except (ValueError, KeyError, OSError) as e:  # bad data; bugs still raise
                result.update(status="failed", reason=f"{type(e).__name__}: {e}")
                log.error("suite task %s failed: %s", task.name, e)
        result["seconds"] = round(time.time() - start, 2)
        results.append(result)
    return results


def suite_metrics(results: Sequence[Mapping[str, Any]], prefix: str = "suite") -> dict[str, float]:
    """Flat {'suite/<task>/<metric>': value} of the tasks that ran (for metrics.jsonl / TB)."""
    return {
        f"{prefix}/{r['name']}/{k}": float(v)
        for r in results
        if r["status"] == "ok"
        for k, v in r["metrics"].items()
    }


# ------------------------------------------------------------------ table
def _shown(key: str) -> bool:
    return not (key.startswith("num_") or key == "skipped" or key.endswith("_std"))


def _is_fraction(key: str) -> bool:
    return "top1" in key or "top5" in key or "R@" in key or key.startswith("mean_per_class")


def format_value(key: str, value: float) -> str:
    return f"{100 * value:6.2f} %" if _is_fraction(key) else f"{value:g}"


def format_suite_table(results: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """One text table: a row per (task, metric); skipped / failed tasks with their reason."""
    rows: list[tuple[str, str, str]] = []
    for r in results:
        if r["status"] != "ok":
            rows.append((r["name"], r["status"], r["reason"]))
            continue
        first = True
        for k, v in r["metrics"].items():
            if _shown(k):
                rows.append((r["name"] if first else "", k, format_value(k, v)))
                first = False
    w1 = max([len("task")] + [len(a) for a, _, _ in rows])
    w2 = max([len("metric")] + [len(b) for _, b, c in rows if len(c) <= 12])
    lines = [title] if title else []
    lines += [f"{'task':<{w1}}  {'metric':<{w2}}  {'value':>9}", "-" * (w1 + w2 + 13)]
    for a, b, c in rows:
        lines.append(f"{a:<{w1}}  {b:<{w2}}  {c:>9}" if len(c) <= 12 else f"{a:<{w1}}  {b}: {c}")
    return "\n".join(lines)
