"""Two-stage training at low then full resolution (CLIPA): most steps on small images and short
captions, which cost a fraction of the compute, then a short stage at full size that starts from
stage 1's weights.

  python -m clipjax.train --config experiments/clipa.py:stage=1,data=GLOB --workdir workdirs/s1
  python -m clipjax.train --config experiments/clipa.py:stage=2,data=GLOB,init=workdirs/s1 \\
      --workdir workdirs/s2

Stage 1 trains PRESET at `image_size` (default 112) with a `context` of 32 tokens; stage 2 trains
PRESET at its own size (224 and 77 for the OpenAI presets), loading everything from `init` (stage
1's workdir or its export): the image positional embedding is resampled to the larger patch grid
and the text positional embedding extended (see README, "Start from released weights").

Args (comma-separated key=value after ':'): stage=1|2, data=GLOB, init=PATH (stage 2), preset=B/16,
image_size=N and context=N (stage 1), steps=N, batch=N, lr=X (stage 2 uses a quarter of it).
"""

from clipjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None):
    a = parse_config_arg(
        arg,
        "experiments/clipa.py",
        stage=1,
        data="",
        init="",
        preset="B/16",
        image_size=112,
        context=32,
        steps=10000,
        batch=1024,
        lr=1e-3,
    )
    if a["stage"] not in (1, 2):
        raise ValueError(f"experiments/clipa.py: stage={a['stage']}; expected 1 or 2")
    c = base_config()
    c.model.preset = a["preset"]
    c.num_steps = a["steps"]
    c.batch_size = a["batch"]
    c.data.train = a["data"]
    c.optimizer.weight_decay = 0.2
    if a["stage"] == 1:
        c.model.overrides.image_size = a["image_size"]
        c.model.overrides.context_length = a["context"]
        c.optimizer.lr = a["lr"]
        c.optimizer.warmup_steps = min(2000, a["steps"] // 10)
    else:
        if not a["init"]:
            raise ValueError("experiments/clipa.py: stage=2 needs init=PATH (stage 1's workdir)")
        c.init.path = a["init"]
        c.optimizer.lr = a["lr"] / 4
        c.optimizer.warmup_steps = min(500, a["steps"] // 10)
    return c
