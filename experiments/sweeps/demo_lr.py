"""Learning rate x weight decay on the demo (6 runs, each a few minutes on a CPU).

python -m clipjax.launch.sweep experiments/sweeps/demo_lr.py --launcher local [--dry-run]
"""

from clipjax.launch.sweep import grid

CONFIG = "experiments/demo.py"


def get_sweep():
    return grid({"optimizer.lr": [3e-4, 1e-3, 3e-3], "optimizer.weight_decay": [0.0, 0.1]})
