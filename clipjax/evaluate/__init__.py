"""Zero-shot classification (prompt ensembles), image<->text retrieval recall@K,
class names/templates.

May import clipjax.models, clipjax.data, clipjax.parallel and clipjax.export; never clipjax.train.
"""
