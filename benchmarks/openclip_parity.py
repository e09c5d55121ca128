"""The open_clip side of `benchmarks/learning_parity.py` (run by it as a subprocess, with the
Python of an environment that has the `bench` extra).

    python benchmarks/openclip_parity.py '{"data": "DIR/arrays.npz", "config": {...clipjax
        CLIPConfig dict...}, "seed": 0, "steps": 200, "batch": 64, "lr": 5e-4, "warmup": 20,
        "weight_decay": 0.2, "crop_scale": [0.9, 1.0], "threads": 2, "out": "emb.npz"}'

Trains open_clip's CLIP with the architecture of the clipjax config (benchmarks/openclip_step.py's
mapping; random init under `seed`) on the train records of the npz the driver wrote: an epoch is a
seeded permutation, each image gets open_clip's train transform (RandomResizedCrop to the model's
size with `crop_scale`, bicubic, CLIP normalisation), the caption the same token ids as clipjax's.
The recipe is clipjax's: AdamW (0.9, 0.98, eps 1e-6) with weight decay on matrices but not
embeddings, linear warm-up from 0 then cosine to 0 (clipjax.train.optimizer.make_schedule),
gradient clipping at 1.0, ClipLoss, the logit scale clamped to ln 100. Then embeds the driver's
preprocessed test images, test captions and class prompts and writes them to `out`.
Prints one line 'RESULT {json}'.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from openclip_step import open_clip_configs  # noqa: E402
from train_step import RESULT_TAG  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """clipjax's schedule after `step` updates: linear warm-up from 0, then cosine to 0."""
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, max(total - warmup, 1)) / max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def main() -> None:
    spec = json.loads(sys.argv[1])
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(int(spec["threads"]))
    seed = int(spec["seed"])
    torch.manual_seed(seed)
    cfg = spec["config"]
    embed_dim, vision, text = open_clip_configs(cfg)
    model = CLIP(
        embed_dim,
        CLIPVisionCfg(**vision),
        CLIPTextCfg(**text),
        quick_gelu=True,
        init_logit_scale=cfg["logit_scale_init"],
    )
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
    ]
    peak, warmup, steps = float(spec["lr"]), int(spec["warmup"]), int(spec["steps"])
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(spec["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=peak,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    data = np.load(spec["data"])
    images, tokens = data["train_images"], data["train_tokens"].astype(np.int64)
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                cfg["image_size"],
                scale=tuple(spec["crop_scale"]),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    rng = np.random.default_rng(seed)
    batch, order, losses = int(spec["batch"]), np.empty(0, np.int64), []
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch:  # a new epoch (the remainder is dropped, as clipjax does)
            order = rng.permutation(len(images))
        idx, order = order[:batch], order[batch:]
        x = torch.stack([transform(Image.fromarray(images[i]).convert("RGB")) for i in idx])
        y = torch.from_numpy(tokens[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak, warmup, steps)
        opt.zero_grad(set_to_none=True)
        img, txt, scale = model(x, y)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite open_clip loss: {losses}")
    model.eval()
    with torch.no_grad():
        test = torch.from_numpy(np.ascontiguousarray(data["test_inputs"].transpose(0, 3, 1, 2)))
        out = {
            "image": model.encode_image(test).numpy(),
            "text": model.encode_text(torch.from_numpy(data["test_tokens"].astype(np.int64))),
            "prompts": model.encode_text(torch.from_numpy(data["prompt_tokens"].astype(np.int64))),
        }
    np.savez(spec["out"], **{k: np.asarray(v, np.float32) for k, v in out.items()})
    print(
        RESULT_TAG
        + json.dumps(
            {
                "framework": "open_clip",
                "version": open_clip.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "num_params": sum(p.numel() for p in model.parameters()),
                "train_s": train_s,
                "loss": [losses[0], losses[-1]],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
