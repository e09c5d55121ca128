"""OpenAI CLIP / open_clip state-dict naming <-> clipjax params (ViT and ModifiedResNet towers).

The PyTorch layout: linear weights are [out, in], convolutions OIHW, attention q/k/v packed in
one `in_proj_weight` [3W, W]; clipjax uses Dense kernels [in, out], HWIO convolutions and
per-head [W, heads, head_dim] q/k/v kernels. The state dict does not record the activation or
head counts: OpenAI models use QuickGELU and 64-wide heads (the defaults below).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipjax.export.modeldir import variables_of
from clipjax.export.serialization import flatten_params, unflatten_params
from clipjax.models import CLIPConfig, unstack_layer_params

log = logging.getLogger(__name__)

# Entries of OpenAI's TorchScript state dicts that are not weights.
_IGNORED = re.compile(
    r"(^|\.)(num_batches_tracked|attn_mask)$|^(input_resolution|context_length|"
    r"vocab_size)$"
)
DEFAULT_ACT = {"openai": "quick_gelu", "open_clip": "gelu"}


# --------------------------------------------------------------------------- layout transforms
def _conv_to_jax(w: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))


def _conv_to_torch(k: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
    return np.transpose(k, (3, 2, 0, 1))


# kind -> (torch -> jax, jax -> torch)
_KINDS = {
    "same": (lambda v: v, lambda v: v),
    "linear": (np.transpose, np.transpose),  # [out, in] <-> [in, out]
    "conv": (_conv_to_jax, _conv_to_torch),
}


class _Mapper:
    """Collects clipjax flat params and the matching OpenAI tensors in one place, either way."""

    def __init__(
        self,
        to_jax: bool,
        sd: Mapping[str, np.ndarray] | None = None,
        flat: Mapping[str, np.ndarray] | None = None,
    ):
        self.to_jax = to_jax
        self.sd = dict(sd or {})
        self.flat = dict(flat or {})
        self.out: dict[str, np.ndarray] = {}
        self.used: set[str] = set()

    def _take(self, table: Mapping[str, np.ndarray], name: str, where: str) -> np.ndarray:
        if name not in table:
            raise KeyError(f"missing tensor {name!r} in the {where}")
        self.used.add(name)
        return np.asarray(table[name])

    def get_torch(self, name: str) -> np.ndarray:
        return self._take(self.sd, name, "state dict")

    def get_jax(self, name: str) -> np.ndarray:
        return self._take(self.flat, name, "clipjax params")

    def copy(self, jax_name: str, torch_name: str, kind: str = "same") -> None:
        """kind: same | linear ([out,in] <-> [in,out]) | conv (OIHW <-> HWIO)."""
        if kind not in _KINDS:
            raise ValueError(f"unknown tensor kind {kind!r}")
        if self.to_jax:
            self.out[jax_name] = _KINDS[kind][0](self.get_torch(torch_name))
        else:
            self.out[torch_name] = _KINDS[kind][1](self.get_jax(jax_name))

    def layer_norm(self, jax_prefix: str, torch_prefix: str) -> None:
        self.copy(f"{jax_prefix}/scale", f"{torch_prefix}.weight")
        self.copy(f"{jax_prefix}/bias", f"{torch_prefix}.bias")

    def batch_norm(self, jax_prefix: str, torch_prefix: str) -> None:
        self.copy(f"params/{jax_prefix}/scale", f"{torch_prefix}.weight")
        self.copy(f"params/{jax_prefix}/bias", f"{torch_prefix}.bias")
        self.copy(f"batch_stats/{jax_prefix}/mean", f"{torch_prefix}.running_mean")
        self.copy(f"batch_stats/{jax_prefix}/var", f"{torch_prefix}.running_var")

    def heads_in(self, jax_prefix: str, torch_w: str, torch_b: str, heads: int) -> None:
        """A [out, in] linear <-> DenseGeneral kernel [in, heads, head_dim], bias [heads, hd]."""
        if self.to_jax:
            w, b = self.get_torch(torch_w), self.get_torch(torch_b)
            self.out[f"{jax_prefix}/kernel"] = w.T.reshape(w.shape[1], heads, -1)
            self.out[f"{jax_prefix}/bias"] = b.reshape(heads, -1)
        else:
            k, b = self.get_jax(f"{jax_prefix}/kernel"), self.get_jax(f"{jax_prefix}/bias")
            self.out[torch_w] = k.reshape(k.shape[0], -1).T
            self.out[torch_b] = b.reshape(-1)

    def heads_out(self, jax_prefix: str, torch_w: str, torch_b: str, heads: int) -> None:
        """A [out, in] linear <-> DenseGeneral kernel [heads, head_dim, out], bias [out]."""
        if self.to_jax:
            w = self.get_torch(torch_w)
            self.out[f"{jax_prefix}/kernel"] = w.T.reshape(heads, -1, w.shape[0])
            self.copy(f"{jax_prefix}/bias", torch_b)
        else:
            k = self.get_jax(f"{jax_prefix}/kernel")
            self.out[torch_w] = k.reshape(-1, k.shape[-1]).T
            self.copy(f"{jax_prefix}/bias", torch_b)

    def packed_qkv(self, jax_prefix: str, torch_prefix: str, heads: int) -> None:
        """in_proj_weight [3W, W] / in_proj_bias [3W] <-> query/key/value DenseGeneral."""
        names = ("query", "key", "value")
        if self.to_jax:
            w = self.get_torch(f"{torch_prefix}.in_proj_weight")
            b = self.get_torch(f"{torch_prefix}.in_proj_bias")
            width = w.shape[1]
            for i, n in enumerate(names):
                self.out[f"{jax_prefix}/{n}/kernel"] = w[i * width : (i + 1) * width].T.reshape(
                    width, heads, -1
                )
                self.out[f"{jax_prefix}/{n}/bias"] = b[i * width : (i + 1) * width].reshape(
                    heads, -1
                )
        else:
            ws, bs = [], []
            for n in names:
                k = self.get_jax(f"{jax_prefix}/{n}/kernel")
                ws.append(k.reshape(k.shape[0], -1).T)
                bs.append(self.get_jax(f"{jax_prefix}/{n}/bias").reshape(-1))
            self.out[f"{torch_prefix}.in_proj_weight"] = np.concatenate(ws)
            self.out[f"{torch_prefix}.in_proj_bias"] = np.concatenate(bs)


def _transformer(m: _Mapper, jax_prefix: str, torch_prefix: str, layers: int, heads: int) -> None:
    for i in range(layers):
        j, t = f"{jax_prefix}/block_{i}", f"{torch_prefix}.resblocks.{i}"
        m.layer_norm(f"{j}/ln_1", f"{t}.ln_1")
        m.packed_qkv(f"{j}/attn", f"{t}.attn", heads)
        m.heads_out(f"{j}/attn/out", f"{t}.attn.out_proj.weight", f"{t}.attn.out_proj.bias", heads)
        m.layer_norm(f"{j}/ln_2", f"{t}.ln_2")
        m.copy(f"{j}/mlp/fc/kernel", f"{t}.mlp.c_fc.weight", "linear")
        m.copy(f"{j}/mlp/fc/bias", f"{t}.mlp.c_fc.bias")
        m.copy(f"{j}/mlp/proj/kernel", f"{t}.mlp.c_proj.weight", "linear")
        m.copy(f"{j}/mlp/proj/bias", f"{t}.mlp.c_proj.bias")


def _map_all(m: _Mapper, cfg: CLIPConfig) -> None:
    """Every tensor of the model, for mapper `m`. Param names carry a 'params/' prefix."""
    p = "params"
    if cfg.vision_type == "vit":
        m.copy(f"{p}/visual/conv1/kernel", "visual.conv1.weight", "conv")
        m.copy(f"{p}/visual/class_embedding", "visual.class_embedding")
        m.copy(f"{p}/visual/positional_embedding", "visual.positional_embedding")
        m.layer_norm(f"{p}/visual/ln_pre", "visual.ln_pre")
        _transformer(
            m, f"{p}/visual/transformer", "visual.transformer", cfg.vision_layers, cfg.vision_heads
        )
        m.layer_norm(f"{p}/visual/ln_post", "visual.ln_post")
        m.copy(f"{p}/visual/proj", "visual.proj")
    else:
        for i in (1, 2, 3):
            m.copy(f"{p}/visual/conv{i}/kernel", f"visual.conv{i}.weight", "conv")
            m.batch_norm(f"visual/bn{i}", f"visual.bn{i}")
        for stage, blocks in enumerate(cfg.vision_layers, start=1):
            for b in range(blocks):
                j, t = f"visual/layer{stage}_{b}", f"visual.layer{stage}.{b}"
                for i in (1, 2, 3):
                    m.copy(f"{p}/{j}/conv{i}/kernel", f"{t}.conv{i}.weight", "conv")
                    m.batch_norm(f"{j}/bn{i}", f"{t}.bn{i}")
                has_down = (
                    f"{t}.downsample.0.weight" in m.sd
                    if m.to_jax
                    else f"{p}/{j}/downsample_conv/kernel" in m.flat
                )
                if has_down:
                    m.copy(f"{p}/{j}/downsample_conv/kernel", f"{t}.downsample.0.weight", "conv")
                    m.batch_norm(f"{j}/downsample_bn", f"{t}.downsample.1")
        a, t = f"{p}/visual/attnpool", "visual.attnpool"
        m.copy(f"{a}/positional_embedding", f"{t}.positional_embedding")
        for n in ("q_proj", "k_proj", "v_proj"):
            m.heads_in(f"{a}/{n}", f"{t}.{n}.weight", f"{t}.{n}.bias", cfg.vision_heads)
        m.heads_out(f"{a}/c_proj", f"{t}.c_proj.weight", f"{t}.c_proj.bias", cfg.vision_heads)
    m.copy(f"{p}/text/token_embedding", "token_embedding.weight")
    m.copy(f"{p}/text/positional_embedding", "positional_embedding")
    _transformer(m, f"{p}/text/transformer", "transformer", cfg.text_layers, cfg.text_heads)
    m.layer_norm(f"{p}/text/ln_final", "ln_final")
    m.copy(f"{p}/text/text_projection", "text_projection")
    m.copy(f"{p}/logit_scale", "logit_scale")
    if cfg.logit_bias_init is not None:
        m.copy(f"{p}/logit_bias", "logit_bias")


# --------------------------------------------------------------------------- public API
def to_openai_state_dict(config: CLIPConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """clipjax params (or ResNet variables) -> OpenAI/open_clip-named float32 numpy tensors."""
    variables = variables_of(params)
    flat = flatten_params({k: unstack_layer_params(v) for k, v in variables.items()})
    m = _Mapper(to_jax=False, flat=flat)
    _map_all(m, config)
    unused = sorted(set(flat) - m.used)
    if unused:
        raise ValueError(f"clipjax params not covered by the OpenAI naming: {unused[:5]}")
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in m.out.items()}


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def config_from_openai(
    sd: Mapping[str, np.ndarray], act: str = "quick_gelu", **overrides: Any
) -> CLIPConfig:
    """Infer the architecture from tensor shapes (OpenAI's conventions: 64-wide heads)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in sd:
            raise KeyError(f"state dict has no {name!r}: not an OpenAI/open_clip CLIP state dict")
        return tuple(np.shape(sd[name]))

    text_width = shape("ln_final.weight")[0]
    kw: dict[str, Any] = dict(
        embed_dim=shape("text_projection")[1],
        context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0],
        text_width=text_width,
        text_layers=_count(sd, r"^transformer\.resblocks\.(\d+)\."),
        text_heads=max(text_width // 64, 1),
        mlp_ratio=shape("transformer.resblocks.0.mlp.c_fc.weight")[0] / text_width,
        act=act,
    )
    if "visual.proj" in sd:
        width, _, patch, _ = shape("visual.conv1.weight")
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        kw.update(
            vision_type="vit",
            vision_width=width,
            patch_size=patch,
            image_size=patch * grid,
            vision_heads=max(width // 64, 1),
            vision_layers=_count(sd, r"^visual\.transformer\.resblocks\.(\d+)\."),
        )
    elif "visual.attnpool.positional_embedding" in sd:
        grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        width = shape("visual.layer1.0.conv1.weight")[0]
        layers = tuple(_count(sd, rf"^visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4))
        kw.update(
            vision_type="resnet",
            vision_width=width,
            vision_layers=layers,
            image_size=grid * 32,
            vision_heads=width * 32 // 64,
        )
    else:
        raise ValueError(
            "state dict has neither visual.proj (ViT) nor visual.attnpool (ResNet); "
            "only OpenAI CLIP's naming (shared by open_clip's CLIP models) is "
            "supported"
        )
    if "logit_bias" in sd:
        kw["logit_bias_init"] = float(np.asarray(sd["logit_bias"]))
    kw.update(overrides)
    return CLIPConfig(**kw)


def from_openai_state_dict(
    sd: Mapping[str, Any], act: str = "quick_gelu", **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """OpenAI/open_clip state dict -> (config, params), or (config, variables) for ResNets."""
    sd = {k: np.asarray(v, dtype=np.float32) for k, v in sd.items() if not _IGNORED.search(k)}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DDP-wrapped checkpoints
    for scalar in ("logit_scale", "logit_bias"):  # stored as [] or [1]
        if scalar in sd:
            sd[scalar] = sd[scalar].reshape(())
    config = config_from_openai(sd, act=act, **overrides)
    m = _Mapper(to_jax=True, sd=sd)
    _map_all(m, config)
    unused = sorted(set(sd) - m.used)
    if unused:
        raise ValueError(
            f"state dict tensors not understood (not OpenAI CLIP naming?): "
            f"{unused[:5]}{' ...' if len(unused) > 5 else ''}"
        )
    variables = unflatten_params(m.out)
    if config.vision_type == "vit":
        return config, variables["params"]
    return config, variables


def read_state_dict(path: str, *, trust_torchscript: bool = False) -> dict[str, np.ndarray]:
    """A state dict from .safetensors or .pt/.pth/.bin, read as data: nothing in the file runs.

    PyTorch zip checkpoints and TorchScript archives (OpenAI's released .pt files) are read
    without torch by `clipjax.export.torchfile`. Only a TorchScript archive that reader cannot
    read, and only with `trust_torchscript=True`, goes to torch.jit.load, which runs its code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (expected an OpenAI/open_clip state dict .safetensors or .pt)"
        )
    if path.endswith(".safetensors"):
        from clipjax.export.serialization import load_safetensors_flat

        return load_safetensors_flat(path)
    if not path.endswith((".pt", ".pth", ".bin")):
        raise ValueError(
            f"{path}: unknown state dict format; expected .safetensors, .pt, .pth or .bin"
        )
    obj = _read_torch_file(path, trust_torchscript)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: np.asarray(v, dtype=np.float32) for k, v in obj.items() if isinstance(v, np.ndarray)}


def _import_torch(path: str, what: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: {what} needs torch, which is not installed; convert the "
            f"file to .safetensors or install torch"
        ) from None
    return torch


def _torch_to_numpy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    return obj.float().numpy() if hasattr(obj, "numpy") else obj


def _torch_load_weights_only(path: str, error: ValueError) -> Any:
    """torch's own weights-only unpickler (it allows a few more types), when torch is here."""
    try:
        import torch
    except ImportError:
        raise error from None
    try:
        return _torch_to_numpy(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:
        raise error from None


def _read_torch_file(path: str, trust_torchscript: bool) -> Any:
    """What a .pt file holds, tensors as numpy; see read_state_dict for what may run."""
    import zipfile

    from clipjax.export.torchfile import UnsafePickleError, is_torchscript, read_torch_zip

    if not zipfile.is_zipfile(path):  # torch.save's format before PyTorch 1.6
        _import_torch(path, "reading a legacy (non-zip) PyTorch checkpoint")
        return _torch_load_weights_only(
            path,
            UnsafePickleError(
                f"{path}: a legacy PyTorch checkpoint refused by torch.load(weights_only=True)"
            ),
        )
    try:
        return read_torch_zip(path)
    except ValueError as e:
        if not is_torchscript(path):
            return _torch_load_weights_only(path, e)
        if not trust_torchscript:
            raise UnsafePickleError(
                f"{e}\n{path} is a TorchScript archive that cannot be read as data only; "
                f"torch.jit.load would run the code stored in it. If you trust where it came "
                f"from, pass --trust-torchscript (trust_torchscript=True in Python)."
            ) from None
        torch = _import_torch(path, "--trust-torchscript (torch.jit.load)")
        log.warning(
            "%s: loading with torch.jit.load because trust_torchscript is set: code in "
            "this file runs now (%s)",
            path,
            e,
        )
        return _torch_to_numpy(torch.jit.load(path, map_location="cpu").state_dict())
