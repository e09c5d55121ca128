"""The open_clip side of `benchmarks/train_step.py --compare open_clip` (run by it as a subprocess).

    python benchmarks/openclip_step.py '{"config": {...clipjax CLIPConfig dict...}, "batch": 32,
                                         "dtype": "bfloat16", "steps": 3, "threads": 2,
                                         "patch_dropout": 0.0}'

Builds open_clip's CLIP with the architecture of the given clipjax config (random init; ViT image
tower, causal text tower, QuickGELU), then times the training step open_clip's own loop runs:
forward under bf16 autocast when dtype is bfloat16 (float32 otherwise), its ClipLoss, backward,
gradient clipping at 1.0, AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on matrices), and the
logit-scale clamp. `patch_dropout` (optional, default 0) is open_clip's
`CLIPVisionCfg(patch_dropout=p)`. Runs on the GPU when torch sees one (as clipjax's side runs on
jax's default device), else on the CPU. Prints one line 'RESULT {json}'. Needs the `bench` extra.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import RESULT_TAG, synthetic_batch  # noqa: E402

# open_clip's named configs with the OpenAI layout; the built model is checked against them.
NAMED = ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu")


def open_clip_configs(cfg: dict) -> tuple[int, dict, dict]:
    """(embed_dim, vision_cfg, text_cfg) for open_clip from a clipjax CLIPConfig dict."""
    if cfg["vision_type"] != "vit" or cfg["act"] != "quick_gelu":
        raise ValueError("the open_clip comparison supports ViT towers with quick_gelu only")
    vision = {
        "image_size": cfg["image_size"],
        "layers": cfg["vision_layers"],
        "width": cfg["vision_width"],
        "patch_size": cfg["patch_size"],
        "head_width": cfg["vision_width"] // cfg["vision_heads"],
        "mlp_ratio": cfg["mlp_ratio"],
    }
    text = {
        "context_length": cfg["context_length"],
        "vocab_size": cfg["vocab_size"],
        "width": cfg["text_width"],
        "heads": cfg["text_heads"],
        "layers": cfg["text_layers"],
        "mlp_ratio": cfg["mlp_ratio"],
    }
    return cfg["embed_dim"], vision, text


def matching_named_config(embed_dim: int, vision: dict, text: dict) -> str | None:
    """The open_clip named config equal to ours (defaults filled in), if any."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    ours = (embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text))
    for name in NAMED:
        named = open_clip.get_model_config(name)
        if named is None or not named.get("quick_gelu"):
            continue
        theirs = (
            named["embed_dim"],
            CLIPVisionCfg(**named["vision_cfg"]),
            CLIPTextCfg(**named["text_cfg"]),
        )
        if theirs == ours:
            return name
    return None


def main() -> None:
    spec = json.loads(sys.argv[1])
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    cfg, b = spec["config"], int(spec["batch"])
    embed_dim, vision, text = open_clip_configs(cfg)
    pdrop = float(spec.get("patch_dropout", 0.0))
    model = CLIP(
        embed_dim,
        CLIPVisionCfg(**vision, patch_dropout=pdrop),
        CLIPTextCfg(**text),
        quick_gelu=True,
        init_logit_scale=cfg["logit_scale_init"],
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    host = synthetic_batch(cfg, b)
    images = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2)))
    images = images.to(device)
    tokens = torch.from_numpy(host["text"].astype(np.int64)).to(device)
    bf16 = spec["dtype"] == "bfloat16"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = model(images, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return float(loss)  # waits for the step to finish on the device

    t0 = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - t0
    times = []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite open_clip loss: {losses}")
    print(
        RESULT_TAG
        + json.dumps(
            {
                "framework": "open_clip",
                "version": open_clip.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "step_s": times,
                "first_step_s": first,
                "num_params": sum(p.numel() for p in model.parameters()),
                "named_config": matching_named_config(embed_dim, vision, text),
                "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30
                if device.type == "cuda"
                else None,
                "loss": [losses[0], losses[-1]],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
