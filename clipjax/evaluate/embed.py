"""Jitted, mesh-sharded image/text encoding shared by the evaluators and the search indexer.

Batches are padded to a fixed size (one compilation) that divides over the mesh's batch axes;
padding rows are dropped again before results reach the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.export.modeldir import variables_of
from clipjax.parallel.mesh import batch_axis_size
from clipjax.parallel.placement import fetch_local, to_global


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad the leading dimension of `x` up to `rows`."""
    if x.shape[0] == rows:
        return x
    if x.shape[0] > rows:
        raise ValueError(f"batch of {x.shape[0]} rows exceeds the fixed batch size {rows}")
    pad = np.zeros((rows - x.shape[0],) + x.shape[1:], dtype=x.dtype)
    return np.concatenate([x, pad])


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Place host arrays on the mesh replicated (arrays already on devices are left alone)."""
    if mesh is None:
        return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), tree)
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: a if isinstance(a, jax.Array) else jax.device_put(a, sharding), tree
    )


class Encoder:
    """Encode images / token ids to normalised embeddings with a fixed, mesh-divisible batch."""

    def __init__(
        self,
        model: Any,
        params: Mapping[str, Any],
        *,
        mesh: Mesh | None = None,
        batch_size: int = 64,
    ):
        self.model = model
        self.mesh = mesh
        # Per-host batch; the global batch (x process count) must split over the batch axes.
        per_host = max(1, batch_axis_size(mesh) // jax.process_count())
        self.batch_size = round_up(max(1, batch_size), per_host)
        self.params = put_replicated(params, mesh)
        self._image_fn = jax.jit(self._encode("encode_image"))
        self._text_fn = jax.jit(self._encode("encode_text"))

    def _encode(self, method: str) -> Callable:
        model = self.model

        def fn(params, x):
            # variables_of: ResNet towers come as {'params', 'batch_stats'} variables dicts.
            return model.apply(variables_of(params), x, method=method).astype(jnp.float32)

        return fn

    def images(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] float32 -> [N, D] float32 (any N; processed in fixed-size batches)."""
        return self._run(self._image_fn, np.asarray(images, np.float32))

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """[N, L] int32 -> [N, D] float32."""
        return self._run(self._text_fn, np.asarray(tokens, np.int32))

    def _run(self, fn: Callable, x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            part = x[start : start + self.batch_size]
            emb = fn(self.params, to_global(pad_rows(part, self.batch_size), self.mesh))
            out.append(fetch_local(emb)[: part.shape[0]])
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)


def embed_labelled(encoder: Encoder, batches: Any) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings [N, D] and labels [N] of the real (unmasked) rows of labelled batches
    (the layout of clipjax.evaluate.data)."""
    embs, labels = [], []
    for batch in batches:
        if "label" not in batch:
            raise ValueError("the data has no labels (a probe needs labelled images)")
        b = np.asarray(batch["image"]).shape[0]
        mask = np.asarray(batch.get("mask", np.ones(b, bool))).astype(bool).reshape(-1)
        rows = np.flatnonzero(mask)
        if rows.size:
            embs.append(encoder.images(np.asarray(batch["image"])[rows]))
            labels.append(np.asarray(batch["label"]).reshape(-1)[rows].astype(np.int32))
    if not embs:
        raise ValueError("the data produced no (unmasked) examples")
    return np.concatenate(embs), np.concatenate(labels)
