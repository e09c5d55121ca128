"""Data: record schema + shard writer (make_shards), sources, tf.data train/eval pipelines, demo
data, tokenizer and image transforms. May import numpy/tensorflow/PIL/jax, never clipjax.train.

Submodules import TensorFlow lazily, so image-encoding worker processes of the writer start fast:
import the submodules directly (`from clipjax.data.train_pipeline import TrainPipeline`).
"""
