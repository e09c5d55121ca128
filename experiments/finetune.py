"""Fine-tune a released CLIP model on your own image-text pairs: both towers loaded and trained.

  python -m clipjax.train --config experiments/finetune.py:path=MODEL,data=GLOB \
      --workdir workdirs/finetune

MODEL is anything `clipjax.load` reads; the run's architecture is read from it and every weight
(temperature included) is loaded. A low learning rate and a short warmup keep the released
features; add --config.init.exclude=REGEX to start some parameters fresh.

Args (comma-separated key=value after ':'): path=MODEL (required), data=GLOB (training shards),
steps=N, batch=N, lr=X. On accelerators add --config.model.dtype=bfloat16.
"""

from clipjax.train.config import base_config, parse_config_arg
from clipjax.train.init_from import source_model_overrides


def get_config(arg: str | None = None):
    a = parse_config_arg(
        arg, "experiments/finetune.py", path="", data="", steps=5000, batch=1024, lr=1e-5
    )
    if not a["path"]:
        raise ValueError("experiments/finetune.py: give path=MODEL, the model to fine-tune")
    c = base_config()
    c.model.preset, overrides = source_model_overrides(a["path"])
    c.model.overrides.update(overrides)
    c.init.path = a["path"]
    c.optimizer.lr = a["lr"]
    c.optimizer.warmup_steps = min(500, a["steps"] // 10)
    c.optimizer.weight_decay = 0.1
    c.num_steps = a["steps"]
    c.batch_size = a["batch"]
    c.data.train = a["data"]
    return c
