"""Data: record schema + shard writer (make_shards), sources, tf.data train/eval pipelines, demo
data, tokenizer and image transforms. May import numpy/tensorflow/PIL/jax, never clipjax.train.

Submodules import TensorFlow lazily, so image-encoding worker processes of the writer start fast:
import the submodules directly (`from clipjax.data.train_pipeline import TrainPipeline`).
"""

import os
import sys


def use_pooled_tf_allocator() -> None:
    """Give TensorFlow's CPU tensors its pooling (BFC) allocator rather than malloc, for a process
    about to run the input pipeline (the training and demo CLIs call this first thing).

    A 128-image float batch is tens of MB, which glibc maps afresh and faults in page by page every
    time: about a fifth of the pipeline's time on small JPEGs (benchmarks/RESULTS.md, "Input
    pipeline"). TensorFlow reads the variable once, so this acts only before it is imported; a value
    already in the environment is kept. Importing `clipjax.data` alone changes nothing.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
