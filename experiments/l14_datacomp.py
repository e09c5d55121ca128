"""ViT-L/14 CLIP on DataComp-1B-style img2dataset TFRecord shards, for a TPU pod (v5p, v4).

  launch/tpu_pod.sh --name clip-l14 --zone ZONE --type v5p-256 -- \
      --config experiments/l14_datacomp.py:shards=gs://BUCKET/datacomp1b/*.tfrecord \
      --workdir gs://BUCKET/runs/clip-l14

Plan it first (compiles for the pod on this machine, no TPU needed):
  python -m clipjax.plan --config experiments/l14_datacomp.py --topology v5p-128

Variant args (comma-separated key=value after ':'): shards=GLOB (training shards),
eval=GLOB (labelled held-out shards for zero-shot), steps=N, batch=N, fsdp=N. Defaults follow
DataComp's xlarge L/14 recipe (12.8B samples seen at a 90,112 batch: AdamW lr 1e-3, wd 0.2,
beta2 0.98, 10k warmup, cosine); bf16 compute with layer scan and remat; FSDP over 8 chips per
replica group, data parallel beyond; the ring InfoNCE so the logits never materialise.
"""

import ml_collections

from clipjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None):
    a = parse_config_arg(
        arg,
        "experiments/l14_datacomp.py",
        shards="gs://YOUR_BUCKET/datacomp1b/*.tfrecord",
        eval="",
        steps=142_000,
        batch=90_112,
        fsdp=8,
    )
    c = base_config()
    c.model.preset = "L/14"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.model.overrides.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
    c.loss.name = "softmax"
    c.loss.impl = "ring"
    c.batch_size = a["batch"]
    c.num_steps = a["steps"]
    c.mesh.update({"data": -1, "fsdp": a["fsdp"], "tensor": 1})
    c.data.train = a["shards"]
    c.data.shuffle_buffer = 20_000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10_000
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
