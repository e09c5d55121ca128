"""Test setup: 8 fake CPU devices, set before jax initialises; one compilation cache per test run
(shared with the subprocesses the tests start, removed at the end, never the user's own)."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# transformers must not import torch next to TensorFlow (the two crash together in one process).
os.environ.setdefault("USE_TORCH", "0")
_CACHE = tempfile.mkdtemp(prefix="clipjax-test-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
