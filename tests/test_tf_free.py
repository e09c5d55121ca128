"""The train step, the loss benchmarks, `clipjax.load` and embedding images given as arrays run
where TensorFlow cannot be imported (as on accelerator machines that carry JAX but not TF)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD_AND_EMBED = """
import sys
import numpy as np
import flax, jax
from PIL import Image
import clipjax
from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIPConfig, abstract_variables

cfg = CLIPConfig(embed_dim=16, image_size=32, patch_size=16, vision_width=64, vision_layers=1,
                 vision_heads=2, context_length=16, text_width=64, text_layers=1, text_heads=2)
rng = np.random.default_rng(0)
shapes = flax.core.meta.unbox(abstract_variables(cfg))["params"]
params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
save_model_dir(sys.argv[1], cfg, params)
model, variables, preprocess = clipjax.load(sys.argv[1])
pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
images = np.stack([preprocess(Image.fromarray(pixels))])
image_emb = model.apply(variables, images, method="encode_image")
text_emb = model.apply(variables, clipjax.tokenize(["a photo"], 16), method="encode_text")
assert image_emb.shape == (1, 16) and text_emb.shape == (1, 16)
assert np.all(np.isfinite(image_emb)) and np.all(np.isfinite(text_emb))
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print("OK")
"""


@pytest.fixture
def no_tf_env(tmp_path):
    """Environment whose `import tensorflow` fails, in this process's children and theirs."""
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ImportError('TensorFlow is blocked in this test')\n"
    )
    path = os.pathsep.join([str(blocker.parent), ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmarks expect
    return env


def run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_blocker_blocks(no_tf_env):
    proc = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=no_tf_env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_load_and_embed_without_tensorflow(no_tf_env, tmp_path):
    out = run([sys.executable, "-c", LOAD_AND_EMBED, str(tmp_path / "model")], no_tf_env)
    assert out.strip().endswith("OK")


def test_train_step_benchmark_without_tensorflow(no_tf_env):
    out = run(
        [sys.executable, "benchmarks/train_step.py", "--quick", "--dtypes", "float32"], no_tf_env
    )
    result = json.loads(out.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert row["preset"] == "tiny" and row["clipjax"]["images_per_s"] > 0


def test_loss_benchmark_without_tensorflow(no_tf_env):
    out = run([sys.executable, "benchmarks/loss.py", "--quick"], no_tf_env)
    result = json.loads(out.strip().splitlines()[-1])
    assert all(r["fits"] for r in result["rows"]), result["rows"]


MANIFEST_READS = """
import json, os, sys
from clipjax.data.shards import dataset_classnames, record_counts
d = sys.argv[1]
open(os.path.join(d, "train-00000.tfrecord"), "wb").close()
manifest = {"classnames": ["cat", "dog"], "shards": [{"file": "train-00000.tfrecord", "count": 7}]}
with open(os.path.join(d, "manifest.json"), "w") as f:
    json.dump(manifest, f)
shards = os.path.join(d, "*.tfrecord")
assert dataset_classnames(shards) == ["cat", "dog"]
assert record_counts([os.path.join(d, "train-00000.tfrecord")], manifest_only=True) == [7]
print("OK")
"""


def test_local_manifest_reads_without_tensorflow(no_tf_env, tmp_path):
    """Config validation reads class names from the shards' manifest before the input pipeline
    starts: a local manifest is read without importing TensorFlow (seconds of start-up)."""
    out = run([sys.executable, "-c", MANIFEST_READS, str(tmp_path)], no_tf_env)
    assert out.strip().endswith("OK")


ALLOCATOR = """
import os
os.environ.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
import clipjax.data
assert "TF_CPU_ALLOCATOR_USE_BFC" not in os.environ  # importing the package changes nothing
clipjax.data.use_pooled_tf_allocator()
assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "true"
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "false"
clipjax.data.use_pooled_tf_allocator()
assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "false"  # the caller's own setting is kept
print("OK")
"""


def test_pooled_allocator_is_set_by_programs_not_by_import(no_tf_env):
    out = run([sys.executable, "-c", ALLOCATOR], no_tf_env)
    assert out.strip().endswith("OK")
