"""Contrastive losses as distributed algorithms: softmax InfoNCE (reference/gathered/ring) with
false-negative rules, SigLIP, momentum queue, token-wise similarity, and `make_loss` (a `Loss` that
owns its state). Imports jax/numpy and clipjax.parallel.mesh only.
"""

from clipjax.losses.factory import LOSS_DEFAULTS, Loss, make_loss, validate_loss_config
from clipjax.losses.infonce import infonce_gathered, infonce_reference
from clipjax.losses.pairs import PairInfo, PairRules, batch_homogeneity
from clipjax.losses.queue import QueueState, ema_update, queue_init, queue_push
from clipjax.losses.ring import infonce_ring
from clipjax.losses.sigmoid import sigmoid_gathered, sigmoid_reference, sigmoid_ring
from clipjax.losses.tokenwise import token_similarity, tokenwise_gathered, tokenwise_reference

__all__ = [
    "LOSS_DEFAULTS",
    "Loss",
    "PairInfo",
    "PairRules",
    "QueueState",
    "batch_homogeneity",
    "ema_update",
    "infonce_gathered",
    "infonce_reference",
    "infonce_ring",
    "make_loss",
    "queue_init",
    "queue_push",
    "sigmoid_gathered",
    "sigmoid_reference",
    "sigmoid_ring",
    "token_similarity",
    "tokenwise_gathered",
    "tokenwise_reference",
    "validate_loss_config",
]
