"""Weighted mixtures of training sources: several shard globs, each drawn with a share of the
samples, exactly resumable (each source's position is in the data state).

    config.data.train = {
        "laion": {"shards": "laion/*.tar", "weight": 0.7},
        "cc12m": {"shards": "cc12m/*.tfrecord", "weight": 0.3, "read_windows": 4},
    }

Each source is a `TrainPipeline` record stream (its own shard split over hosts, seeded read order,
shuffle buffer and epochs; TFRecords or webdataset tars), and every host draws its next sample's
source from a seeded categorical over the weights (weight 0: the source is left out, as in
big_vision). The draws are a pure function of (seed, host, process count, mixture epoch, draw
index), so a mixture's batches are as reproducible as one source's. Two ways to sample:

- resampled (default; open_clip's `--dataset-resampled` with upsampling factors): draws with
  replacement; each source cycles through its own epochs, so a small source with a large weight is
  repeated (upsampled). `epoch_samples` (global) only sets how draws are counted in epochs.
- without replacement (`resampled=False`; big_vision's `sample_from_datasets(...,
  stop_on_empty_dataset=True)`): mixture epoch E reads epoch E of every source at most once and
  ends when the first source runs out, or after `epoch_samples` samples if that comes first.

State. The host's position is {mix_epoch, mix_pos (draws in it), skipped, seen per source, and per
source {epoch, offset[, carry]}}. Records a source drew but the pipeline dropped as unusable still
advance that source, so a `tf.data` scan after the draws tags each record with every source's
next position; a batch's last record gives the state. After a change of process count each
source carries its old hosts' remaining records as a single source does (see train_pipeline);
the draws continue from the old hosts' mixture position.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from clipjax.data import records
from clipjax.data.shards import ShardInfo, caption_field_order, host_batch_size, process_info
from clipjax.data.stream import NumpyStream
from clipjax.data.train_pipeline import (
    _HOST_STRIDE,
    DEFAULT_SHUFFLE_BUFFER,
    TrainPipeline,
    _check_sizes,
    decode_batches,
    finish_batches,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
SOURCE_OPTIONS = ("shards", "weight", "read_windows", "shuffle_buffer")
_BLOCK = 4096  # draws generated per stateless call


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture: its shards, weight and per-source reading options."""

    name: str
    shards: str
    weight: float
    read_windows: int | None = None
    shuffle_buffer: int | None = None


def is_mixture(spec) -> bool:
    """True for a `{name: {shards, weight, ...}}` mapping (a ConfigDict too), not a glob."""
    return not isinstance(spec, str) and hasattr(spec, "items")


def parse_sources(spec, key: str = "data.train") -> list[SourceSpec]:
    """The mixture's sources, checked; ValueError naming the key (`key.NAME.OPTION`) otherwise.
    Sources of weight 0 are kept (the pipeline leaves them out and says so)."""
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    if not spec:
        raise ValueError(f"{key}={{}}: a mixture needs at least one source")
    out = []
    for name, opts in spec.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{key}: source name {name!r} must be a non-empty string without '/'")
        if isinstance(opts, str):
            opts = {"shards": opts}
        if not isinstance(opts, Mapping):
            raise ValueError(
                f"{where}={opts!r}: expected a glob or a dict with keys {list(SOURCE_OPTIONS)}"
            )
        unknown = sorted(set(opts) - set(SOURCE_OPTIONS))
        if unknown:
            raise ValueError(
                f"{where}.{unknown[0]}: unknown source option; expected {list(SOURCE_OPTIONS)}"
            )
        shards = opts.get("shards")
        if not isinstance(shards, str) or not shards:
            raise ValueError(f"{where}.shards={shards!r}: expected a glob of TFRecords or tars")
        weight = opts.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{where}.weight={weight!r}: expected a number >= 0 (0: left out)")
        ints = {}
        for opt in ("read_windows", "shuffle_buffer"):
            v = opts.get(opt)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{where}.{opt}={v!r}: expected an int > 0")
            ints[opt] = v
        out.append(SourceSpec(name, shards, float(weight), **ints))
    if not any(s.weight > 0 for s in out):
        raise ValueError(f"{key}: every source has weight 0; give at least one a positive weight")
    return out


def _source_seed(seed: int, name: str) -> int:
    """Each source's own seed (its read order and augmentation keys differ from the others')."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 31)


class MixturePipeline:
    """Endless, exactly resumable batches drawn from weighted sources (see the module doc).

    Iterating yields `(batch, state)` like `TrainPipeline`; `state` is this host's position (a
    dict with `sources`). Checkpoint `train_pipeline.gather_state(state)` and pass it back as
    `state=` to continue with exactly the batch that would have come next.
    """

    def __init__(
        self,
        sources,
        *,
        global_batch: int,
        image_size: int,
        context_length: int = 77,
        seed: int = 0,
        resampled: bool = True,
        epoch_samples: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        crop_scale=(0.9, 1.0),
        cycle_length: int = 16,
        read_windows: int = 1,
        prefetch: int = 2,
        threads: int | None = None,
        state: dict | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        caption_ratio: dict[str, float] | None = None,
    ):
        self.process_index, self.process_count = process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        _check_sizes(image_size, context_length, shuffle_buffer, read_windows)
        if epoch_samples < 0:
            raise ValueError(f"epoch_samples must be >= 0 (0: natural length), got {epoch_samples}")
        specs = parse_sources(sources)
        for s in specs:
            if s.weight == 0:
                log.info("mixture source %r has weight 0: left out", s.name)
        self.specs = [s for s in specs if s.weight > 0]
        self.names = [s.name for s in self.specs]
        self.seed, self.resampled = int(seed), bool(resampled)
        self.image_size, self.context_length = image_size, context_length
        self.crop_scale = tuple(crop_scale)
        self.prefetch, self.threads = prefetch, threads
        self.sources = []
        for s in self.specs:
            try:
                self.sources.append(
                    TrainPipeline(
                        s.shards,
                        global_batch=self.process_count,  # a source needs a record per host
                        image_size=image_size,
                        context_length=context_length,
                        seed=_source_seed(seed, s.name),
                        shuffle_buffer=s.shuffle_buffer or shuffle_buffer,
                        cycle_length=cycle_length,
                        read_windows=s.read_windows or read_windows,
                        process_index=self.process_index,
                        process_count=self.process_count,
                    )
                )
            except ValueError as e:
                raise ValueError(f"mixture source {s.name!r}: {e}") from None
        weights = np.array([s.weight for s in self.specs], np.float64)
        self.shares = weights / weights.sum()
        infos = [src.info for src in self.sources]
        self.info = ShardInfo(
            tuple(f for i in infos for f in i.files),
            all(i.has_label for i in infos),
            all(i.has_tokens for i in infos),
            caption_fields=caption_field_order(f for i in infos for f in i.caption_fields),
        )
        self.caption_weights = records.caption_weights(self.info, caption_ratio)
        self.sizes = [src.count_records(src.all_files, manifest_only=True) for src in self.sources]
        known = None if None in self.sizes else sum(self.sizes)
        self.epoch_samples = int(epoch_samples) or (known if self.resampled else 0) or 0
        self._log_shares()
        self._state = self._fresh_state()
        if state is not None:
            self.restore(state)

    def _log_shares(self) -> None:
        lines = []
        for spec, share, size, src in zip(self.specs, self.shares, self.sizes, self.sources):
            line = (
                f"  {spec.name}: weight {spec.weight:g}, share {share:.1%}, "
                f"{len(src.all_files)} files, {size if size is not None else 'unknown'} records"
            )
            if self.resampled and self.epoch_samples and size:
                line += f", {share * self.epoch_samples / size:.2f} passes per mixture epoch"
            lines.append(line)
        how = "with replacement (resampled)" if self.resampled else "without replacement"
        if self.epoch_samples:
            length = f"epoch of {self.epoch_samples} samples"
        else:
            length = "epochs not counted" if self.resampled else "epoch until a source ends"
        log.info(
            "data mixture of %d sources, drawn %s, %s:\n%s",
            len(self.specs),
            how,
            length,
            "\n".join(lines),
        )

    # -- state ----------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {
            "seed": self.seed,
            "mix_epoch": 0,
            "mix_pos": 0,
            "skipped": 0,
            "seen": {n: 0 for n in self.names},
            "sources": {n: {"epoch": 0, "offset": 0} for n in self.names},
        }

    def state(self) -> dict:
        return _copy(self._state)

    def restore(self, state: dict) -> None:
        """Continue from a state from `gather_state` (or this host's own `state()`), saved with
        this or another process count. Sources the state lacks start afresh; sources it has but
        the config no longer does are dropped (both with a warning)."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state has seed {state.get('seed')}, pipeline has {self.seed}")
        if "sources" not in state:
            raise ValueError(
                "the data state is of a single shard glob, but config.data.train is now a mixture "
                "of sources; resume with the data config the run started with"
            )
        try:
            if "hosts" not in state:
                self._state = self._local(state, {})
            elif int(state["process_count"]) == self.process_count:
                self._state = self._local(state["hosts"][self.process_index], state)
            else:
                self._state = self._resized(state)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(
                f"bad mixture data state {state!r} ({type(e).__name__}: {e})"
            ) from None

    def _check_names(self, saved: Sequence[str]) -> None:
        added = [n for n in self.names if n not in saved]
        dropped = [n for n in saved if n not in self.names]
        if added or dropped:
            log.warning(
                "the mixture's sources changed since the data state was saved: %s start "
                "afresh, %s are dropped",
                added or "none",
                dropped or "none",
            )

    def _local(self, host: dict, gathered: dict) -> dict:
        """This host's state from its entry (and the gathered state's carry structures)."""
        self._check_names(list(host["sources"]))
        out = self._fresh_state()
        out.update(
            mix_epoch=int(host["mix_epoch"]),
            mix_pos=int(host["mix_pos"]),
            skipped=int(host["skipped"]),
        )
        for name in self.names:
            out["seen"][name] = int(host.get("seen", {}).get(name, 0))
            if name not in host["sources"]:
                continue
            src = host["sources"][name]
            local = {"epoch": int(src["epoch"]), "offset": int(src["offset"])}
            carry = src.get("carry") or gathered.get("carry", {}).get(name)
            offset = src["carry"]["offset"] if src.get("carry") else src.get("carry_offset", -1)
            if carry is not None:  # offset -1: used up
                local["carry"] = {
                    "process_count": int(carry["process_count"]),
                    "hosts": [
                        {"epoch": int(h["epoch"]), "offset": int(h["offset"])}
                        for h in carry["hosts"]
                    ],
                    "offset": int(offset),
                }
            out["sources"][name] = local
        return out

    def _resized(self, state: dict) -> dict:
        """This host's start after a change of process count: each source carries its old hosts'
        remaining records (TrainPipeline.resized_state); the draws continue after the old hosts'
        furthest position (resampled) or in the next mixture epoch (without replacement)."""
        old_count, hosts = int(state["process_count"]), state["hosts"]
        if len(hosts) != old_count:
            raise ValueError(f"{len(hosts)} host states for {old_count} processes")
        self._check_names(list(hosts[0]["sources"]))
        out = self._fresh_state()
        for name, src in zip(self.names, self.sources):
            if name not in hosts[0]["sources"]:
                continue
            single = {
                "seed": src.seed,
                "process_count": old_count,
                "hosts": [
                    {
                        "epoch": h["sources"][name]["epoch"],
                        "offset": h["sources"][name]["offset"],
                        "skipped": 0,
                    }
                    for h in hosts
                ],
            }
            carry = state.get("carry", {}).get(name)
            if carry is not None and any(
                h["sources"][name].get("carry_offset", -1) >= 0 for h in hosts
            ):
                single["carry"] = carry
            local = src.resized_state(single)
            out["sources"][name] = {
                k: v for k, v in local.items() if k in ("epoch", "offset", "carry")
            }
            if self.process_index == 0:
                out["seen"][name] = sum(int(h["seen"].get(name, 0)) for h in hosts)
        if self.process_index == 0:
            out["skipped"] = sum(int(h["skipped"]) for h in hosts)
        if self.resampled:  # about as many draws per host as the old hosts made in all
            drawn = max(int(h["mix_pos"]) for h in hosts) * old_count
            out["mix_pos"] = -(-drawn // self.process_count)
        else:
            out["mix_epoch"] = max(int(h["mix_epoch"]) for h in hosts) + 1
        return out

    # -- tf.data graph --------------------------------------------------------------------
    def _draws(self, mix_epoch, start):
        """Source indices of this host's draws from `start` in mixture epoch `mix_epoch`."""
        import tensorflow as tf

        cdf = tf.constant(np.cumsum(self.shares)[:-1], tf.float64)
        base = tf.random.experimental.stateless_fold_in(
            tf.stack(
                [
                    tf.constant(self.seed, tf.int64),
                    tf.cast(mix_epoch, tf.int64) * _HOST_STRIDE + self.process_index,
                ]
            ),
            tf.constant(self.process_count, tf.int64),
        )

        def block(b):
            u = tf.random.stateless_uniform(
                [_BLOCK], seed=tf.random.experimental.stateless_fold_in(base, b), dtype=tf.float64
            )
            return tf.data.Dataset.from_tensor_slices(
                tf.searchsorted(cdf, u, side="right", out_type=tf.int64)
            )

        start = tf.cast(start, tf.int64)
        first = start // _BLOCK
        return (
            tf.data.Dataset.range(first, 1 << 40)
            .flat_map(records.traced(block))
            .skip(start - first * _BLOCK)
        )

    def _tagged(self, i: int, ds):
        import tensorflow as tf

        return ds.map(
            records.traced(
                lambda t, rec, key: (t | {"_source": tf.constant(i, tf.int64)}, rec, key)
            )
        )

    def _source_start(self, i: int, local: dict):
        """Source i's records from its saved position to the end of that epoch (carry first)."""
        src = self.sources[i]
        ds = src.epoch_records(local["epoch"], local["offset"])
        if _carrying(local):
            ds = src.carried_records(local["carry"]).concatenate(ds)
        return self._tagged(i, ds)

    def _mixed(self, state: dict):
        """(tags, record, key) of this host's draws from `state`, tagged with the mixture epoch
        and position of each draw."""
        import tensorflow as tf

        locals_ = [state["sources"][n] for n in self.names]
        m0, e0 = state["mix_pos"], state["mix_epoch"]

        def with_pos(e, ds, start):
            return ds.enumerate(start).map(
                records.traced(
                    lambda m, item: (
                        item[0] | {"_mix_epoch": tf.cast(e, tf.int64), "_mix_pos": m},
                        item[1],
                        item[2],
                    )
                )
            )

        if self.resampled:
            streams = []
            for i, (src, local) in enumerate(zip(self.sources, locals_)):
                later = tf.data.Dataset.range(local["epoch"] + 1, 1 << 40).flat_map(
                    records.traced(lambda e, src=src: src.epoch_records(e, 0))
                )
                streams.append(self._source_start(i, local).concatenate(self._tagged(i, later)))
            ds = tf.data.Dataset.choose_from_datasets(streams, self._draws(0, m0))
            return with_pos(0, ds, m0)

        n = self.epoch_samples // self.process_count if self.epoch_samples else 1 << 62

        def epoch_of(e, streams, start):
            ds = tf.data.Dataset.choose_from_datasets(
                streams, self._draws(e, start), stop_on_empty_dataset=True
            )
            return with_pos(e, ds.take(max(n - start, 0)), start)

        first = epoch_of(e0, [self._source_start(i, loc) for i, loc in enumerate(locals_)], m0)

        def later(e):
            streams = [self._tagged(i, s.epoch_records(e, 0)) for i, s in enumerate(self.sources)]
            return epoch_of(e, streams, 0)

        return first.concatenate(
            tf.data.Dataset.range(e0 + 1, 1 << 40).flat_map(records.traced(later))
        )

    def _positions(self, ds, state: dict):
        """Tag every draw with every source's position after it (a scan, before any record is
        dropped): [S] epochs, next offsets and carry offsets (-1: not carrying), and the number
        of draws so far."""
        import tensorflow as tf

        locals_ = [state["sources"][n] for n in self.names]
        init = (
            tf.constant([loc["epoch"] for loc in locals_], tf.int64),
            tf.constant([loc["offset"] for loc in locals_], tf.int64),
            tf.constant(
                [loc["carry"]["offset"] if _carrying(loc) else -1 for loc in locals_], tf.int64
            ),
            tf.constant(0, tf.int64),
        )

        def step(carry_state, item):
            epochs, offsets, carry_offsets, n = carry_state
            tags, rec, key = item
            i = tags["_source"][None, None]
            nxt = tags["_pos"] + 1
            carried = tags["_carried"]
            epochs = tf.where(
                carried, epochs, tf.tensor_scatter_nd_update(epochs, i, tags["_epoch"][None])
            )
            offsets = tf.where(carried, offsets, tf.tensor_scatter_nd_update(offsets, i, nxt[None]))
            carry_offsets = tf.tensor_scatter_nd_update(
                carry_offsets, i, tf.where(carried, nxt, tf.constant(-1, tf.int64))[None]
            )
            new = (epochs, offsets, carry_offsets, n + 1)
            tags = tags | {
                "_src_epoch": epochs,
                "_src_offset": offsets,
                "_src_carry": carry_offsets,
                "_draws": n + 1,
            }
            return new, (tags, rec, key)

        return ds.scan(init, records.traced(step))

    def dataset(self, state: dict | None = None, gate=None):
        """The endless tf.data.Dataset of mixed batches from `state` (default: the current one);
        `gate` as in TrainPipeline.dataset."""
        state = state or self._state
        ds = self._positions(self._mixed(state), state)
        ds = decode_batches(
            ds,
            self.info,
            self.image_size,
            self.crop_scale,
            self.context_length,
            self.batch_size,
            self.caption_weights,
        )
        return finish_batches(ds, self.info, self.context_length, self.prefetch, self.threads, gate)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """The batches from the current state; close the iterator when done with it."""
        state = _copy(self._state)
        drawn = 0
        with NumpyStream(lambda gate: self.dataset(state, gate)) as stream:
            for batch in stream:
                tags = {k: batch.pop(k) for k in list(batch) if k.startswith("_")}
                state, drawn = self._advance(state, tags, drawn)
                self._state = state
                yield batch, _copy(state)

    def _advance(self, state: dict, tags: dict, drawn: int) -> tuple[dict, int]:
        state = _copy(state)
        last_draws = int(tags["_draws"][-1])
        state["skipped"] += last_draws - drawn - self.batch_size
        state["mix_epoch"] = int(tags["_mix_epoch"][-1])
        state["mix_pos"] = int(tags["_mix_pos"][-1]) + 1
        for i, count in enumerate(np.bincount(tags["_source"], minlength=len(self.names))):
            state["seen"][self.names[i]] += int(count)
        for i, name in enumerate(self.names):
            src = state["sources"][name]
            src["epoch"] = int(tags["_src_epoch"][-1][i])
            src["offset"] = int(tags["_src_offset"][-1][i])
            if src.get("carry") is not None:  # kept when used up (-1): gather_state needs it
                src["carry"]["offset"] = int(tags["_src_carry"][-1][i])
        return state, last_draws

    def epoch_of(self, state: dict) -> float:
        """The mixture epoch of a state (fractional with resampling and a known epoch length)."""
        if self.resampled and self.epoch_samples:
            return state["mix_pos"] * self.process_count / self.epoch_samples
        return float(state["mix_epoch"])


def _carrying(local: dict) -> bool:
    """Whether a source's local state is still inside records carried from other hosts."""
    return local.get("carry") is not None and local["carry"]["offset"] >= 0


def _copy(state: dict) -> dict:
    out = dict(state)
    out["seen"] = dict(state["seen"])
    out["sources"] = {}
    for name, src in state["sources"].items():
        src = dict(src)
        if src.get("carry") is not None:
            src["carry"] = dict(src["carry"])
        out["sources"][name] = src
    return out


def gather_mixture_state(local_state: dict) -> dict:
    """The checkpoint's data state from every host's mixture state (a collective when there are
    several processes)."""
    import jax

    names = list(local_state["sources"])
    row = [local_state["mix_epoch"], local_state["mix_pos"], local_state["skipped"]]
    row += [local_state["seen"][n] for n in names]
    for n in names:
        src = local_state["sources"][n]
        carry = src.get("carry")
        row += [src["epoch"], src["offset"], -1 if carry is None else carry["offset"]]
    row = np.array(row, np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, len(row))
    else:
        rows = row[None]
    return combine_mixture_states([_unflatten(r, names, local_state) for r in rows.tolist()])


def _unflatten(row: list[int], names: list[str], like: dict) -> dict:
    out = {
        "seed": like["seed"],
        "mix_epoch": row[0],
        "mix_pos": row[1],
        "skipped": row[2],
        "seen": dict(zip(names, row[3 : 3 + len(names)])),
        "sources": {},
    }
    for k, n in enumerate(names):
        epoch, offset, carry_offset = row[3 + len(names) + 3 * k : 6 + len(names) + 3 * k]
        src = {"epoch": epoch, "offset": offset}
        carry = like["sources"][n].get("carry")
        if carry is not None and carry_offset >= 0:
            src["carry"] = dict(carry, offset=carry_offset)
        out["sources"][n] = src
    return out


def combine_mixture_states(host_states: Sequence[dict]) -> dict:
    """The checkpoint's mixture data state from every host's own `state()`, in process order."""
    hosts, carry = [], {}
    for local in host_states:
        host = {k: int(local[k]) for k in ("mix_epoch", "mix_pos", "skipped")}
        host["seen"] = {n: int(v) for n, v in local["seen"].items()}
        host["sources"] = {}
        for name, src in local["sources"].items():
            entry = {"epoch": int(src["epoch"]), "offset": int(src["offset"])}
            if src.get("carry") is not None:
                entry["carry_offset"] = int(src["carry"]["offset"])
                carry[name] = {k: src["carry"][k] for k in ("process_count", "hosts")}
            host["sources"][name] = entry
        hosts.append(host)
    out = {
        "version": STATE_VERSION,
        "seed": host_states[0]["seed"],
        "process_count": len(hosts),
        "sources": list(host_states[0]["sources"]),
        "hosts": hosts,
    }
    if carry:
        out["carry"] = carry
    return out


def mixture_metrics(gathered: dict) -> dict[str, float]:
    """Samples seen per source over all hosts, each source's share of them, and records skipped
    as unusable, from a gathered mixture state."""
    seen: dict[str, int] = {}
    for host in gathered["hosts"]:
        for name, n in host["seen"].items():
            seen[name] = seen.get(name, 0) + n
    total = max(1, sum(seen.values()))
    out = {f"data/seen/{n}": float(v) for n, v in seen.items()}
    out |= {f"data/share/{n}": v / total for n, v in seen.items()}
    out["data/skipped"] = float(sum(h["skipped"] for h in gathered["hosts"]))
    return out
