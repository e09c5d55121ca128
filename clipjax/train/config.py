"""Train configs: the base ConfigDict every experiment builds on, and validation before compiling.

Experiments (`experiments/*.py`) define `get_config(arg=None)` returning `base_config()` with their
changes; the CLI applies `--config.key=value` overrides on top. `validate` checks the resolved
config against the devices and files at hand and raises `ConfigError` naming the key and the fix.

Every key must be one `base_config()` has (`check_keys`): a misspelt or renamed key is an error,
not a silently ignored setting. Free-form dicts take any key: a ConfigDict `base_config()` leaves
empty (`config.extra` for an experiment's own values, `model.overrides`, `sharding_rules`, ...)
or one named in `FREE_FORM` (dicts with defaults the user may extend); a leaf whose default is not
a ConfigDict may hold a dict of its own.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any

import ml_collections

from clipjax.files import check_replaceable, expand_globs
from clipjax.parallel.mesh import BATCH_AXES, MESH_AXES, batch_axis_size, resolve_axis_sizes
from clipjax.train.optimizer import SCHEDULES

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what was expected."""


# ConfigDicts of base_config() with defaults whose keys the user may add to (beside the empty
# ConfigDicts, which are free-form by being empty): tower names and their multipliers.
FREE_FORM = ("optimizer.towers", "optimizer.lr_mult")


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults. Experiments modify a copy of this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 256  # global, over all processes and devices
    c.microbatches = 1  # gradient accumulation with cached embeddings (see clipjax.train.step)

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.scan_layers = (
        True  # one compiled block: faster steps and ~6x faster compile (RESULTS.md)
    )
    # none | full | dots | dots_no_batch. "dots" saves only matmul outputs for the backward pass:
    # less memory and, with layer scan, fewer stacked residual buffers to write and read (faster,
    # not slower).
    c.model.remat = "dots"
    c.model.attention = "xla"  # 'cudnn': cuDNN flash attention on GPUs (bfloat16)
    # FLIP: share of each training image's patch tokens dropped (ViT); 0 = off, never at eval.
    c.model.patch_dropout = 0.0
    c.model.overrides = ml_collections.ConfigDict()  # any other CLIPConfig field

    # Passed to clipjax.losses.make_loss; keys and defaults are clipjax.losses.LOSS_DEFAULTS (name
    # softmax|sigmoid|tokenwise, impl reference|gathered|ring, queue_size, momentum, tile,
    # tokenwise_mode, and the false-negative rules positives, in_batch_negatives,
    # duplicate_threshold: see the README's "Batches of one category").
    c.loss = _loss_defaults()

    c.data = ml_collections.ConfigDict()
    # A glob (or comma-separated globs) of TFRecord shards or webdataset tars (.tar, .tar.gz), or
    # a weighted mixture {name: {"shards": GLOB, "weight": W, "read_windows": R,
    # "shuffle_buffer": B}} (clipjax.data.mixture; weight 0 leaves a source out).
    c.data.train = ml_collections.FieldReference("", field_type=object)
    # Mixtures: draw sources with replacement (each source repeats its epochs; upsampling) or
    # without (an epoch reads each source at most once and ends when the first runs out).
    c.data.resampled = True
    c.data.epoch_samples = 0  # mixture epoch length in samples (0: natural)
    c.data.shuffle_buffer = 10_000
    # Read each shard as this many windows of consecutive records, interleaved: batches of
    # class-sorted shards hold many categories without re-writing them (costs ~(W+1)/2 reads).
    c.data.read_windows = 1
    c.data.crop_scale = (0.9, 1.0)  # random-resized-crop area range (fractions of the image)
    # Records with several captions: '' = one drawn uniformly per epoch; 'txt=0.7,txt_synthetic=0.3'
    # = a caption field drawn by these weights (see the README's "Several captions per image").
    c.data.caption_ratio = ""

    # Axis sizes of the whole mesh (one may be -1: the rest). slices > 1: that many TPU slices
    # joined over the data-centre network; 'data' is split across them, fsdp and tensor stay
    # inside one (clipjax.parallel.mesh), so only gradient all-reduces cross slices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "slices": 1})
    c.sharding_rules = ml_collections.ConfigDict()  # logical name -> mesh axis overrides

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.2
    c.optimizer.clip_norm = 1.0  # 0 disables clipping
    c.optimizer.towers = ml_collections.ConfigDict({"image": r"^visual/", "text": r"^text/"})
    c.optimizer.lr_mult = ml_collections.ConfigDict({"image": 1.0, "text": 1.0})
    # LiT: image tower frozen (no grads, no optimizer state); give it weights with init.path.
    c.optimizer.lock_image = False
    c.optimizer.freeze = ()  # extra regexes of param paths to freeze

    # Start from another model's weights (a fresh run only; a resumed run restores its
    # checkpoint). See clipjax.train.init_from for the matching and resizing rules.
    c.init = ml_collections.ConfigDict()
    c.init.path = ""  # anything clipjax.load reads; "" = random initialisation
    c.init.step = ml_collections.FieldReference(None, field_type=int)  # workdir: that checkpoint
    c.init.include = ""  # regex on '/'-joined param paths ("^visual/"); "" = every parameter
    c.init.exclude = ""  # regex; "" = none
    c.init.logit_scale = "keep"  # keep | reset (start from model's logit_scale/bias init)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    # XLA options for the jitted init and step, e.g. {"xla_backend_optimization_level": 0} to
    # compile tiny test models faster.
    c.compiler_options = ml_collections.ConfigDict()
    # JAX's persistent compilation cache: 'auto' = JAX_COMPILATION_CACHE_DIR or the user cache
    # directory (~/.cache/clipjax/jax), '' = off, else a directory (clipjax.train.compile_cache).
    c.compile_cache_dir = "auto"
    c.log_every = 50
    c.tensorboard = True
    c.max_nonfinite = 20  # stop after this many non-finite steps in a row

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: only at the end of training
    c.eval.at_end = True
    c.eval.batch_size = 256
    c.eval.zeroshot = ml_collections.ConfigDict()
    c.eval.zeroshot.shards = ""  # labelled TFRecord shards
    c.eval.zeroshot.classnames = ""  # a file, package asset name, or comma-separated names
    c.eval.zeroshot.templates = ""
    c.eval.retrieval = ml_collections.ConfigDict()
    c.eval.retrieval.shards = ""
    # An evaluation suite (clipjax.evaluate.suite: packaged name, .json or .py file) run with
    # the evals above; each figure is logged as suite/<task>/<metric>.
    c.eval.suite = ""

    c.export = ml_collections.ConfigDict()
    c.export.dir = ""  # if set: write a model directory there at the end
    c.export.format = "safetensors"

    # An experiment's own values (any keys): the trainer reads none of them. Every other key
    # must be one of the above (check_keys).
    c.extra = ml_collections.ConfigDict()
    return c


def _is_free(node: ml_collections.ConfigDict, path: str) -> bool:
    return not node.keys() or path in FREE_FORM


def unknown_keys(
    config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None
) -> list[str]:
    """The dotted keys of `config` that `base` (default: `base_config()`) does not have, outside
    its free-form dicts (see the module docstring)."""
    base = base_config() if base is None else base
    out = []

    def walk(node, ref, prefix):
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in ref:
                out.append(path)
                continue
            value, default = node[key], ref[key]
            if isinstance(value, ml_collections.ConfigDict) and isinstance(
                default, ml_collections.ConfigDict
            ):
                if not _is_free(default, path):
                    walk(value, default, path + ".")

    walk(config, base, "")
    return out


def key_known(key: str, base: ml_collections.ConfigDict | None = None) -> bool:
    """Whether the dotted `key` (a --config.KEY override) is a key of `base` (default:
    `base_config()`), a key inside one of its free-form dicts or inside a leaf's own dict."""
    node = base_config() if base is None else base
    path = ""
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return True  # inside a leaf that holds a dict of its own
        if path and _is_free(node, path):
            return True
        if part not in node:
            return False
        node, path = node[part], f"{path}.{part}" if path else part
    return True


def suggest_keys(key: str, base: ml_collections.ConfigDict | None = None) -> list[str]:
    """Known dotted keys close to `key`: by the whole key, else by its last part (every key
    ending in a close last part); only those about as close as the closest (a renamed key
    suggests its new name, not its neighbours)."""
    from flax.traverse_util import flatten_dict

    base = base_config() if base is None else base
    known = list(flatten_dict(base.to_dict(), sep=".", keep_empty_nodes=True))
    close = _closest(key, known)
    if close:
        return close
    by_last: dict[str, list[str]] = {}
    for k in known:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return [full for name in _closest(key.rsplit(".", 1)[-1], by_last) for full in by_last[name]]


def _closest(word: str, words) -> list[str]:
    """Up to 3 of `words` with a difflib ratio >= 0.6 to `word`, within 0.05 of the best."""
    scored = sorted(((difflib.SequenceMatcher(None, word, w).ratio(), w) for w in words))[::-1]
    scored = [(r, w) for r, w in scored[:3] if r >= 0.6]
    return [w for r, w in scored if r >= scored[0][0] - 0.05] if scored else []


def _section_keys(key: str) -> list[str]:
    """The keys base_config() has beside `key` (in its parent section), if that section exists."""
    node = base_config()
    for part in key.split(".")[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return []
        node = node[part]
    return sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []


def unknown_key_message(keys: list[str], where: str = "config.") -> str:
    """One line naming each unknown key with the closest known ones."""
    parts = []
    for key in keys:
        close = suggest_keys(key)
        section = key.rsplit(".", 1)[0] if "." in key else "config"
        beside = _section_keys(key)
        if close:
            hint = f" (did you mean {' or '.join(close)}?)"
        elif beside:
            hint = f" ({section} has {', '.join(beside)})"
        else:
            hint = ""
        parts.append(f"{where}{key}{hint}")
    return (
        f"unknown config key{'s' if len(keys) > 1 else ''} {'; '.join(parts)}: the trainer "
        "reads no such key; put deliberate extra keys under config.extra"
    )


def check_keys(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming every key of `config` the trainer does not read (see `unknown_keys`)."""
    unknown = unknown_keys(config)
    if unknown:
        raise ConfigError(unknown_key_message(unknown))


def _loss_defaults() -> ml_collections.ConfigDict:
    """LOSS_DEFAULTS as a ConfigDict; keys that default to None still take typed CLI values."""
    from clipjax.losses import LOSS_DEFAULTS

    none_types = {"tile": int, "duplicate_threshold": float}
    return ml_collections.ConfigDict(
        {
            k: (ml_collections.FieldReference(None, field_type=none_types[k]) if v is None else v)
            for k, v in LOSS_DEFAULTS.items()
        }
    )


def parse_config_arg(arg: str | None, where: str, **defaults: Any) -> dict[str, Any]:
    """An experiment's `:ARG` as a dict: comma-separated `key=value` items over `defaults`.

    Each value is converted to its default's type (bool: true/false/1/0); a bare `key` sets a
    bool key to True, so `experiments/demo.py:quick,data=DIR` gives quick=True, data='DIR'.
    Unknown keys and unconvertible values are errors naming `where` and the known keys.
    """
    out = dict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if key not in defaults:
            raise ValueError(
                f"{where}: unknown arg {key!r}; expected key=value with a key in {sorted(defaults)}"
            )
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ValueError(f"{where}: expected {key}=VALUE, got {part!r}")
            out[key] = True
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{where}: {key}={value!r}: expected true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value) if defaults[key] is not None else value
            except ValueError:
                raise ValueError(
                    f"{where}: {key}={value!r}: expected a value of type {kind.__name__}"
                ) from None
    return out


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config.{key}={value!r} is invalid: {expected}")


def _positive_int(c: ml_collections.ConfigDict, key: str, allow_zero: bool = False) -> int:
    value = c
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise _fail(key, value, f"expected an int {'>= 0' if allow_zero else '> 0'}")
    return value


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    try:
        sizes = resolve_axis_sizes(dict(config.mesh), num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh={dict(config.mesh)} is invalid: {e}") from None
    return dict(zip(MESH_AXES, sizes))


def validate(
    config: ml_collections.ConfigDict,
    num_devices: int,
    process_count: int = 1,
    check_files: bool = True,
) -> dict[str, int]:
    """Check a resolved config before any compilation; returns the mesh shape it implies."""
    check_keys(config)
    _validate_counts(config)
    _validate_model(config)
    shape = mesh_shape(config, num_devices)
    _validate_batch_split(config, batch_axis_size(shape), process_count)
    _validate_loss_and_rules(config)
    _validate_optimizer(config)
    _validate_init(config, check_files)
    _validate_data_and_eval(config, check_files)
    return shape


def _validate_counts(config: ml_collections.ConfigDict) -> None:
    """Step counts, sizes and intervals are (non-negative) ints; the seed is an int."""
    for key in (
        "num_steps",
        "batch_size",
        "microbatches",
        "log_every",
        "max_nonfinite",
        "checkpoint.keep",
        "eval.batch_size",
        "data.shuffle_buffer",
        "data.read_windows",
    ):
        _positive_int(config, key)
    for key in (
        "checkpoint.every_steps",
        "eval.every_steps",
        "optimizer.warmup_steps",
        "data.epoch_samples",
    ):
        _positive_int(config, key, allow_zero=True)
    if not isinstance(config.seed, int):
        raise _fail("seed", config.seed, "expected an int")


def _validate_batch_split(
    config: ml_collections.ConfigDict, batch_shards: int, process_count: int
) -> None:
    """The batch (and the momentum queue) split evenly over the batch shards, microbatches and
    processes."""
    per_step = batch_shards * config.microbatches
    if config.batch_size % per_step:
        raise _fail(
            "batch_size",
            config.batch_size,
            f"must be divisible by the batch axes {'x'.join(BATCH_AXES)}="
            f"{batch_shards} times microbatches={config.microbatches} (= {per_step}); "
            f"use a multiple of {per_step}",
        )
    if config.batch_size % process_count:
        raise _fail(
            "batch_size",
            config.batch_size,
            f"must be divisible by the number of processes ({process_count})",
        )
    if config.loss.queue_size:
        if config.loss.queue_size < config.batch_size:
            raise _fail(
                "loss.queue_size",
                config.loss.queue_size,
                f"a momentum queue must hold at least one batch ({config.batch_size})",
            )
        if config.loss.queue_size % batch_shards:
            raise _fail(
                "loss.queue_size",
                config.loss.queue_size,
                f"must be divisible by the batch shards ({batch_shards})",
            )


def _validate_loss_and_rules(config: ml_collections.ConfigDict) -> None:
    """config.loss and config.sharding_rules, by the checks of the modules that use them."""
    try:
        from clipjax.losses import validate_loss_config

        validate_loss_config(config.loss)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.loss is invalid: {e}") from None
    try:
        from clipjax.parallel.rules import make_rules

        make_rules(dict(config.sharding_rules))
    except ValueError as e:
        raise ConfigError(f"config.sharding_rules: {e}") from None


def _validate_model(config: ml_collections.ConfigDict) -> None:
    from clipjax.models import PRESETS, SPEC_FIELDS, CLIPConfig

    if config.model.preset not in PRESETS:
        raise _fail("model.preset", config.model.preset, f"expected one of {list(PRESETS)}")
    known = {f for f in CLIPConfig.__dataclass_fields__}
    for key in config.model.overrides:
        if key not in known:
            raise _fail(
                f"model.overrides.{key}",
                config.model.overrides[key],
                f"not a CLIPConfig field; known fields: {sorted(known)}",
            )
    for key in SPEC_FIELDS:
        if key in config.model.overrides and config.model.overrides[key] != config.model[key]:
            raise ConfigError(
                f"config.model.{key}={config.model[key]!r} and config.model.overrides.{key}="
                f"{config.model.overrides[key]!r} disagree; set config.model.{key} only"
            )
    try:
        model_config(config)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model is invalid: {e}") from None


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
    o = config.optimizer
    if not float(o.lr) > 0:
        raise _fail("optimizer.lr", o.lr, "expected a learning rate > 0")
    if o.schedule not in SCHEDULES:
        raise _fail("optimizer.schedule", o.schedule, f"expected one of {SCHEDULES}")
    if o.warmup_steps > config.num_steps:
        raise _fail(
            "optimizer.warmup_steps",
            o.warmup_steps,
            f"longer than the run (num_steps={config.num_steps})",
        )
    if not 0.0 <= float(o.min_lr_ratio) <= 1.0:
        raise _fail("optimizer.min_lr_ratio", o.min_lr_ratio, "expected a value in [0, 1]")
    if float(o.weight_decay) < 0 or float(o.clip_norm) < 0:
        raise _fail(
            "optimizer.weight_decay/clip_norm",
            (o.weight_decay, o.clip_norm),
            "expected values >= 0",
        )
    for tower in o.lr_mult:
        if tower not in o.towers:
            raise _fail(
                f"optimizer.lr_mult.{tower}",
                o.lr_mult[tower],
                f"unknown tower; optimizer.towers has {sorted(o.towers)}",
            )
    if o.lock_image and "image" not in o.towers:
        raise _fail("optimizer.lock_image", True, "needs optimizer.towers.image (a path regex)")


def _validate_init(config: ml_collections.ConfigDict, check_files: bool) -> None:
    """config.init: the source exists and is a model; regexes compile; a known logit_scale mode.
    The weights themselves are read (and their shapes checked) when a fresh run starts."""
    init = config.init
    for key in ("include", "exclude"):
        try:
            re.compile(init[key])
        except (re.error, TypeError) as e:
            raise _fail(f"init.{key}", init[key], f"not a regular expression ({e})") from None
    if init.logit_scale not in ("keep", "reset"):
        raise _fail("init.logit_scale", init.logit_scale, "expected 'keep' or 'reset'")
    if init.step is not None and (not isinstance(init.step, int) or init.step < 0):
        raise _fail("init.step", init.step, "expected a checkpoint step >= 0 (or None: latest)")
    if not init.path:
        if init.step is not None:
            raise _fail("init.step", init.step, "set only with init.path (a training workdir)")
        if config.optimizer.lock_image:
            log.warning(
                "optimizer.lock_image without init.path locks a randomly initialised image tower"
            )
        return
    if check_files:
        from clipjax.export.load import detect_source

        try:
            kind = detect_source(init.path)
        except (OSError, ValueError) as e:
            raise _fail("init.path", init.path, str(e)) from None
        if init.step is not None and kind != "workdir":
            raise _fail("init.step", init.step, f"applies to training workdirs; this is a {kind}")


def _validate_train_data(config: ml_collections.ConfigDict, check_files: bool) -> None:
    """config.data.train: a glob, or a mixture whose sources are well-formed (and match files)."""
    from clipjax.data.mixture import is_mixture, parse_sources

    if not isinstance(config.data.resampled, bool):
        raise _fail("data.resampled", config.data.resampled, "expected true or false")
    train = config.data.train
    if not is_mixture(train):
        if not isinstance(train, str):
            raise _fail(
                "data.train", train, "expected a glob or a mixture {name: {shards, weight}}"
            )
        if check_files and not train:
            raise _fail("data.train", train, "give a glob of TFRecord shards or tars")
        if check_files and not expand_globs(train):
            raise _fail(
                "data.train", train, "matches no files; expected a glob of TFRecord shards or tars"
            )
        return
    try:
        specs = parse_sources(train, "data.train")
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    for spec in specs:
        if check_files and spec.weight > 0 and not expand_globs(spec.shards):
            raise _fail(
                f"data.train.{spec.name}.shards",
                spec.shards,
                "matches no files; expected a glob of TFRecord shards or tars",
            )


def _validate_data_and_eval(config: ml_collections.ConfigDict, check_files: bool) -> None:
    from clipjax.data.records import parse_caption_ratio

    try:
        parse_caption_ratio(config.data.caption_ratio)
    except (ValueError, AttributeError) as e:
        raise _fail("data.caption_ratio", config.data.caption_ratio, str(e)) from None
    _validate_train_data(config, check_files)
    if check_files:
        for key in ("eval.zeroshot.shards", "eval.retrieval.shards"):
            spec = (
                config.eval.zeroshot.shards if "zeroshot" in key else config.eval.retrieval.shards
            )
            if spec and not expand_globs(spec):
                raise _fail(key, spec, "matches no files; expected a glob of TFRecord shards")
    if config.eval.suite:
        from clipjax.evaluate.suite import load_suite

        try:  # the suite file is checked now, not at the first evaluation
            load_suite(config.eval.suite)
        except (FileNotFoundError, ValueError) as e:
            raise _fail("eval.suite", config.eval.suite, str(e)) from None
    if config.eval.zeroshot.shards and not config.eval.zeroshot.classnames:
        raise _fail("eval.zeroshot.classnames", "", "needed when eval.zeroshot.shards is set")
    if check_files and config.eval.zeroshot.shards:
        from clipjax.evaluate.classnames import classnames_for_shards

        zs = config.eval.zeroshot
        try:  # matched to the shards' own class names now, not at the first evaluation
            _, notes = classnames_for_shards(zs.classnames, zs.shards, "eval.zeroshot.classnames")
            for note in notes:
                log.info("%s", note)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if config.export.format not in ("safetensors", "msgpack"):
        raise _fail("export.format", config.export.format, "expected 'safetensors' or 'msgpack'")
    if check_files and config.export.dir:
        from clipjax.export.modeldir import is_replaceable

        try:  # the end-of-training export replaces only a model directory: say so now
            check_replaceable(os.path.abspath(config.export.dir), is_replaceable)
        except FileExistsError as e:
            raise _fail("export.dir", config.export.dir, str(e)) from None


def model_config(config: ml_collections.ConfigDict):
    """The CLIPConfig a train config describes (preset + SPEC_FIELDS + overrides)."""
    from clipjax.models import config_from_spec

    return config_from_spec(config.model.to_dict())


def changed_fields(old_json: str | None, config: ml_collections.ConfigDict) -> list[str]:
    """'key: old -> new' for each dotted key whose value differs between a config saved as JSON
    (a workdir's config.json; None or unreadable: no changes known) and `config`."""
    import json

    from flax.traverse_util import flatten_dict

    try:
        old = flatten_dict(json.loads(old_json), sep=".") if old_json else {}
    except (ValueError, AttributeError):  # not JSON, or not a JSON object
        return []
    new = flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    missing = "<unset>"
    return [
        f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
        for k in sorted(set(old) | set(new))
        if old and old.get(k, missing) != new.get(k, missing)
    ]
