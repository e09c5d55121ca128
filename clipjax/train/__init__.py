"""Training: config schema + validation, optimizer, train state, sharded step, orbax checkpoints,
metric writers and the loop behind `python -m clipjax.train`. Composes models/losses/data/parallel.
"""
