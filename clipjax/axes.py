"""Logical axis names of the model parameters: models name every parameter's dimensions with
them (`nn.with_logical_partitioning`) and `clipjax.parallel.rules` maps them to mesh axes, so both
import them from here. A name the rules map to nothing is replicated.
"""

EMBED = "embed"
MLP_HIDDEN = "mlp"
HEADS = "heads"
KV = "kv"
VOCAB = "vocab"
POS = "pos"
PROJ = "proj"
NORM = "norm"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
LAYERS = "layers"
# Activations (`clipjax.models.sharding.constrain`), not parameters.
ACT_BATCH = "activation_batch"
ACT_HEADS = "activation_heads"
ACT_MLP = "activation_mlp"
LOGICAL_AXES: dict[str, str] = {
    EMBED: "residual-stream width of a tower (d_model)",
    MLP_HIDDEN: "hidden width of a transformer MLP",
    HEADS: "attention heads",
    KV: "per-head feature size (head_dim)",
    VOCAB: "token vocabulary (text embedding rows)",
    POS: "position in a learned positional embedding",
    PROJ: "joint image-text embedding size (output of the projections)",
    NORM: "feature dim of a LayerNorm / BatchNorm scale or bias",
    CONV_IN: "input channels of a convolution kernel",
    CONV_OUT: "output channels of a convolution kernel",
    LAYERS: "stacked layer axis of a scanned transformer (only with scan_layers)",
    ACT_BATCH: "batch dim of an activation (split like the input batch)",
    ACT_HEADS: "attention-head dim of an activation (q, k, v, attention output)",
    ACT_MLP: "hidden dim of a transformer MLP's activation",
}
# Spatial kernel dims of convolutions are left unnamed (None): they are tiny and never sharded.
