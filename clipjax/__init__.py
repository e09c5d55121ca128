"""clipjax: CLIP-style contrastive image-text pretraining in JAX/Flax.

Top-level conveniences: `clipjax.tokenize(texts)` and `clipjax.load(path)`.
"""

__version__ = "0.1.0"


def tokenize(texts, context_length: int = 77):
    """CLIP BPE token ids, np.int32 [N, context_length] (see clipjax.data.tokenizer)."""
    from clipjax.data.tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length)


def load(path, **kwargs):
    """Load a model: returns (model, params, preprocess). See clipjax.export.load.load
    (keywords: step, dtype, trust_torchscript)."""
    from clipjax.export.load import load as _load

    return _load(path, **kwargs)
