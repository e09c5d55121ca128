"""Parameter files (safetensors / msgpack), the model directory, Hugging Face and OpenAI layouts,
load.

May import clipjax.models, clipjax.data (preprocessing) and orbax; never clipjax.train internals.
"""
