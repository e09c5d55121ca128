"""Contrastive losses as distributed algorithms: softmax InfoNCE (reference/gathered/ring), SigLIP,
momentum queue, token-wise similarity, and `make_loss` config selection. Imports jax/numpy only.
"""

from clipjax.losses.factory import LOSS_DEFAULTS, make_loss, validate_loss_config
from clipjax.losses.infonce import infonce_gathered, infonce_reference
from clipjax.losses.queue import QueueState, ema_update, queue_init, queue_push
from clipjax.losses.ring import infonce_ring
from clipjax.losses.sigmoid import sigmoid_gathered, sigmoid_reference, sigmoid_ring
from clipjax.losses.tokenwise import (token_similarity, tokenwise_gathered,
                                      tokenwise_reference)

__all__ = [
    "LOSS_DEFAULTS", "QueueState", "ema_update", "infonce_gathered", "infonce_reference",
    "infonce_ring", "make_loss", "queue_init", "queue_push", "sigmoid_gathered",
    "sigmoid_reference", "sigmoid_ring", "token_similarity", "tokenwise_gathered",
    "tokenwise_reference", "validate_loss_config",
]
