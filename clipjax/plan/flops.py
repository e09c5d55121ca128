"""Analytic training FLOPs of a CLIP model (matmuls only), the count MFU is measured against.

XLA's `cost_analysis` counts a while loop's body once, so a layer scan would be undercounted;
this count does not depend on how the program is compiled. A train step is 3x the forward
matmul FLOPs of both towers (patch embedding, q/k/v/out projections, attention scores and
mixing, MLP, pooled projections) plus the B x B logits matmul of the loss. Rematerialised
forwards are not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of one sequence through a pre-LN transformer stack."""
    mlp = int(round(width * mlp_ratio))
    per_layer = (
        2 * tokens * width * 4 * width  # q, k, v, out projections
        + 2 * 2 * tokens * tokens * width  # scores q.k and mixing p.v
        + 2 * 2 * tokens * width * mlp  # fc and proj
    )
    return float(layers * per_layer)


def _as_dict(cfg: Any) -> Mapping[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def forward_flops_per_example(cfg: Any) -> dict[str, float]:
    """Forward matmul FLOPs per example of each tower of a ViT CLIP (`cfg`: a CLIPConfig or its
    dict); pooled projections only."""
    cfg = _as_dict(cfg)
    if cfg["vision_type"] != "vit":
        raise ValueError(f"FLOP count supports ViT image towers only, got {cfg['vision_type']!r}")
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    # Patch dropout: every patch is embedded, the transformer sees the kept ones (as open_clip).
    kept = max(1, int(patches * (1.0 - cfg.get("patch_dropout", 0.0))))
    vw, tw, d = cfg["vision_width"], cfg["text_width"], cfg["embed_dim"]
    image = (
        2 * patches * cfg["patch_size"] ** 2 * 3 * vw
        + transformer_flops(kept + 1, vw, cfg["vision_layers"], cfg["mlp_ratio"])
        + 2 * vw * d
    )
    text = (
        transformer_flops(cfg["context_length"], tw, cfg["text_layers"], cfg["mlp_ratio"])
        + 2 * tw * d
    )
    return {"image": float(image), "text": float(text)}


def train_step_flops(cfg: Any, batch: int) -> float:
    """fwd + bwd = 3 x forward matmul FLOPs of both towers and the B x B logits matmul."""
    per = forward_flops_per_example(cfg)
    d = _as_dict(cfg)["embed_dim"]
    return 3.0 * (batch * (per["image"] + per["text"]) + 2.0 * batch * batch * d)
