"""The demo: a tiny CLIP on the procedural shapes dataset, trained on a laptop CPU in minutes.

  python -m clipjax.train --config experiments/demo.py --workdir workdirs/demo
  python -m clipjax.train --config experiments/demo.py:quick --workdir workdirs/quick   # a few steps

Variants (the `:ARG`): none = the full demo; 'quick' = a handful of steps on tiny images for
tests and smoke runs.
"""

from clipjax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.seed = 0
    c.model.preset = "tiny"
    # The demo captions are at most 14 tokens with start/end: a 16-token context halves the text
    # tower's work.
    c.model.overrides.context_length = 16
    # Narrower than the 'tiny' preset: compute-bound on 2 CPU cores, and the shapes need little.
    c.model.overrides.update(dict(vision_width=64, vision_heads=2, text_width=64, text_heads=2,
                                  embed_dim=64))
    c.data.demo_dir = "demo_out/data"
    c.data.demo_n_train = 12000
    c.data.shuffle_buffer = 4000
    c.data.augment_scale = (0.8, 1.0)
    c.num_steps = 900
    c.batch_size = 128
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.1
    c.log_every = 50
    c.checkpoint.every_steps = 300
    c.checkpoint.keep = 2
    c.eval.zeroshot.shards = "demo"
    c.eval.zeroshot.classnames = "demo"
    c.eval.zeroshot.templates = "demo"
    c.eval.retrieval.shards = "demo"
    c.eval.batch_size = 200
    if arg == "quick":
        c.num_steps = 6
        c.batch_size = 16
        c.data.demo_n_train = 256
        c.data.demo_n_test = 64
        c.data.shuffle_buffer = 64
        c.optimizer.warmup_steps = 2
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.batch_size = 32
        c.compiler_options = {"xla_backend_optimization_level": 0}  # compiling dominates here
        c.model.overrides.update(dict(image_size=16, patch_size=8, vision_width=32,
                                      vision_layers=1, vision_heads=2, text_width=32,
                                      text_layers=1, text_heads=2, embed_dim=32,
                                      context_length=16))
    elif arg:
        raise ValueError(f"experiments/demo.py: unknown variant {arg!r}; expected none or 'quick'")
    return c
