"""B/16 on LAION-style shards: softmax InfoNCE (ring) vs SigLIP, each at two learning rates.

  python -m clipjax.launch.sweep experiments/sweeps/b16_loss.py --launcher tpu \
      --root gs://BUCKET/sweeps --launcher-args "--zone us-central2-b --type v4-64" --dry-run
"""

from clipjax.launch.sweep import grid, zipped

CONFIG = "experiments/b16_laion.py"


def get_sweep():
    losses = zipped(
        {
            "loss.name": ["softmax", "sigmoid"],
            "loss.impl": ["ring", "ring"],
            "model.overrides.logit_bias_init": [None, -10.0],
        }
    )
    lrs = grid({"optimizer.lr": [5e-4, 1e-3]})
    return [{**loss, **lr} for loss in losses for lr in lrs]
