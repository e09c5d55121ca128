"""Named model variants. Parameter counts of the OpenAI ones equal OpenAI's released models."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from clipjax.models.clip import SPEC_FIELDS, CLIPConfig

PRESETS: dict[str, CLIPConfig] = {
    # Trains on a laptop CPU in minutes: 32px images, 16 patches, 3-layer towers; real CLIP vocab so
    # the real tokenizer works.
    "tiny": CLIPConfig(
        embed_dim=128,
        image_size=32,
        patch_size=8,
        vision_width=128,
        vision_layers=3,
        vision_heads=4,
        context_length=32,
        text_width=128,
        text_layers=3,
        text_heads=4,
    ),
    # open_clip's ViT-S-32 shape (no OpenAI release).
    "S/32": CLIPConfig(
        embed_dim=384,
        patch_size=32,
        vision_width=384,
        vision_layers=12,
        vision_heads=6,
        text_width=384,
        text_layers=12,
        text_heads=6,
    ),
    "B/32": CLIPConfig(
        embed_dim=512, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12
    ),
    "B/16": CLIPConfig(
        embed_dim=512, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12
    ),
    "L/14": CLIPConfig(
        embed_dim=768,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=768,
        text_layers=12,
        text_heads=12,
    ),
    "RN50": CLIPConfig(
        embed_dim=1024,
        vision_type="resnet",
        vision_width=64,
        vision_layers=(3, 4, 6, 3),
        vision_heads=32,
    ),
    "RN101": CLIPConfig(
        embed_dim=512,
        vision_type="resnet",
        vision_width=64,
        vision_layers=(3, 4, 23, 3),
        vision_heads=32,
    ),
}


def get_preset(name: str) -> CLIPConfig:
    """The CLIPConfig of a named variant; a clear error lists the names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {list(PRESETS)}") from None


def build_config(
    preset_or_config: str | CLIPConfig, overrides: Mapping[str, Any] | None = None
) -> CLIPConfig:
    """A preset name (or a CLIPConfig) with field overrides applied (lists become tuples).

    The one place a preset plus overrides becomes a CLIPConfig: `create_model`, the trainer and
    the export of a training workdir all go through it.
    """
    cfg = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if not isinstance(cfg, CLIPConfig):
        raise TypeError(
            f"expected a preset name or CLIPConfig, got {type(preset_or_config).__name__}"
        )
    if not overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(CLIPConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown CLIPConfig override(s) {unknown}; known keys: {sorted(known)}")
    return dataclasses.replace(
        cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    )


def config_from_spec(spec: Mapping[str, Any]) -> CLIPConfig:
    """The CLIPConfig of a model spec: {'preset', and optionally 'dtype', 'scan_layers', 'remat',
    'patch_dropout', 'overrides': {CLIPConfig field: value}} (the shape of a train config's
    `model` section)."""
    if "preset" not in spec:
        raise ValueError(f"model spec has no 'preset'; got keys {sorted(spec)}")
    fields = {k: spec[k] for k in SPEC_FIELDS if k in spec}
    if "scan_layers" in fields:
        fields["scan_layers"] = bool(fields["scan_layers"])
    fields.update(dict(spec.get("overrides") or {}))
    return build_config(spec["preset"], fields)


def create_model(preset_or_config: str | CLIPConfig, **overrides: Any):
    """A CLIP module from a preset name or config, with field overrides (e.g. dtype='bfloat16')."""
    from clipjax.models.clip import CLIP

    return CLIP(build_config(preset_or_config, overrides))
