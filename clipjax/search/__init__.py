"""Image search: embed an image collection into an on-disk index; exact top-k query by text or
image.

May import clipjax.models, clipjax.data, clipjax.export and clipjax.evaluate.embed;
never clipjax.train.
"""
