"""The demo: a tiny CLIP on the procedural shapes dataset, trained on a laptop CPU in minutes.

The config lives in the package (`clipjax.demo.get_config`, also used by `python -m clipjax.demo`);
this file makes it available to the training CLI. Generate the data first, then train:

  python -m clipjax.data.demo --out demo_out/data --n-train 12000 --n-test 600
  python -m clipjax.train --config experiments/demo.py --workdir workdirs/demo
  python -m clipjax.train --config experiments/demo.py:quick,data=DIR --workdir workdirs/quick

Args (the `:ARG`, comma-separated): `quick` = a handful of steps on tiny images for tests and
smoke runs (its data: --n-train 256 --n-test 64); `data=DIR` = the demo data directory (default
demo_out/data, where `python -m clipjax.demo` writes it).
"""

from clipjax.demo import get_config

__all__ = ["get_config"]
