"""LiT (Zhai et al. 2022): a released image tower, locked; the text tower trained from scratch.

  python -m clipjax.train --config experiments/lit.py:path=MODEL,data=GLOB --workdir workdirs/lit

MODEL is anything `clipjax.load` reads (a clipjax model directory, a Hugging Face CLIP directory,
an OpenAI/open_clip state dict, a training workdir); the run's architecture is read from it, so
the loaded image tower fits exactly and the images are preprocessed at its resolution. Only the
image tower (`^visual/`, projection included) is loaded; it gets no gradient and no optimizer
state. The text tower and the temperature start fresh (`init.logit_scale=reset`).

Args (comma-separated key=value after ':'): path=MODEL (required), data=GLOB (training shards),
steps=N, batch=N, lr=X. On accelerators add --config.model.dtype=bfloat16.
"""

from clipjax.train.config import base_config, parse_config_arg
from clipjax.train.init_from import source_model_overrides


def get_config(arg: str | None = None):
    a = parse_config_arg(
        arg, "experiments/lit.py", path="", data="", steps=20_000, batch=4096, lr=1e-3
    )
    if not a["path"]:
        raise ValueError("experiments/lit.py: give path=MODEL, the model whose image tower to lock")
    c = base_config()
    c.model.preset, overrides = source_model_overrides(a["path"])
    c.model.overrides.update(overrides)
    c.init.path = a["path"]
    c.init.include = r"^visual/"
    c.init.logit_scale = "reset"
    c.optimizer.lock_image = True
    c.optimizer.lr = a["lr"]
    c.optimizer.warmup_steps = min(1000, a["steps"] // 10)
    c.optimizer.weight_decay = 1e-4  # LiT's setting; the text tower learns from scratch
    c.num_steps = a["steps"]
    c.batch_size = a["batch"]
    c.data.train = a["data"]
    return c
