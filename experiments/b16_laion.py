"""ViT-B/16 CLIP on LAION-style img2dataset TFRecord shards, for a TPU pod or GPU cluster.

  launch/tpu_pod.sh --name clip-b16 --zone ZONE --type v4-256 -- \
      --config experiments/b16_laion.py:shards=gs://BUCKET/laion400m/*.tfrecord \
      --workdir gs://BUCKET/runs/clip-b16

Variant args (comma-separated key=value after ':'): shards=GLOB (training shards),
eval=GLOB (labelled held-out shards for zero-shot), steps=N, batch=N. Defaults follow OpenCLIP's
B/16 LAION-400M recipe at 32k batch: AdamW lr 5e-4, wd 0.2, beta2 0.98, 2k warmup, cosine; bf16
compute with layer scan and remat; FSDP over 8 chips per replica group, data parallel beyond;
the ring InfoNCE so the 32k x 32k logits never materialise.
"""

import ml_collections

from clipjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None):
    a = parse_config_arg(
        arg,
        "experiments/b16_laion.py",
        shards="gs://YOUR_BUCKET/laion400m/*.tfrecord",
        eval="",
        steps=100_000,
        batch=32768,
    )
    c = base_config()
    c.model.preset = "B/16"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.model.overrides.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
    c.loss.name = "softmax"
    c.loss.impl = "ring"
    c.batch_size = a["batch"]
    c.num_steps = a["steps"]
    c.mesh.update({"data": -1, "fsdp": 8, "tensor": 1})
    c.data.train = a["shards"]
    c.data.shuffle_buffer = 20_000
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.2
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.clip_norm = 1.0
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.log_every = 100
    c.eval.every_steps = 5000
    c.eval.batch_size = 1024
    if a["eval"]:
        c.eval.zeroshot.shards = a["eval"]
        c.eval.zeroshot.classnames = "imagenet_classnames.txt"
        c.eval.zeroshot.templates = "openai_imagenet_templates.txt"
    return c
