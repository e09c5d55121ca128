"""Data: record schema + shard writer (make_shards), sources, tf.data train/eval pipelines, demo
data, tokenizer and image transforms. May import numpy/tensorflow/PIL/jax, never clipjax.train.

Submodules import TensorFlow lazily, so image-encoding worker processes of the writer start fast:
import the submodules directly (`from clipjax.data.train_pipeline import TrainPipeline`).
"""

import os

# TensorFlow's CPU tensors from its pooling (BFC) allocator rather than malloc: a training batch is
# tens of MB, which glibc maps afresh and faults in page by page every time (about a fifth of the
# pipeline's time on small JPEGs; benchmarks/RESULTS.md, "Input pipeline"). TensorFlow reads this
# when it first allocates; a value already in the environment is kept.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
