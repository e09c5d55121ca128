"""Device meshes, multi-host initialisation and logical-axis sharding rules.

May import jax/flax only; knows nothing of models, losses, data or train.
"""
