"""Ahead-of-time plan of a training config on a TPU topology, compiled without a TPU.

`python -m clipjax.plan`: mesh, per-chip memory and fit, FLOPs bound, collectives. Uses
`clipjax.train`'s builder; nothing in `train` imports this package.
"""
