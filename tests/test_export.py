"""Export / import: param files, model directories, OpenAI and Hugging Face layouts, load, CLI."""

import json
import os
import subprocess
import sys

# transformers would import torch (when installed) next to TensorFlow, which crashes the process
# on import of its Flax models; the Flax tests need no torch.
os.environ.setdefault("USE_TORCH", "0")

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

from clipjax import files
from clipjax.export import serialization as ser
from clipjax.export.__main__ import main as export_main
from clipjax.export.load import check_params, detect_source, load, model_fingerprint
from clipjax.export.modeldir import read_model_dir, save_model_dir
from clipjax.export.openai import config_from_openai, from_openai_state_dict, to_openai_state_dict
from clipjax.models import CLIP, CLIPConfig

TINY = CLIPConfig(
    embed_dim=24,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=2,
    vision_heads=1,
    context_length=12,
    vocab_size=300,
    text_width=64,
    text_layers=2,
    text_heads=1,
)
TINY_RN = CLIPConfig(
    embed_dim=24,
    vision_type="resnet",
    image_size=64,
    vision_width=8,
    vision_layers=(1, 2, 1, 1),
    vision_heads=4,
    context_length=12,
    vocab_size=300,
    text_width=64,
    text_layers=1,
    text_heads=1,
)


def init_params(cfg, seed=0):
    """Random params of the model's shapes (from eval_shape: no compilation), all non-trivial."""
    from clipjax.models import abstract_variables

    rng = np.random.default_rng(seed)
    shapes = flax.core.meta.unbox(abstract_variables(cfg))
    v = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    if "batch_stats" in v:
        v["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, v["batch_stats"])
        return v
    v["params"]["logit_scale"] = np.array(2.6, np.float32)
    return v["params"]


def inputs(cfg, b=3, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ids = np.zeros((b, cfg.context_length), np.int32)
    for i in range(b):
        n = 2 + i
        ids[i, 0] = cfg.vocab_size - 2
        ids[i, 1:n] = rng.integers(1, cfg.vocab_size - 2, n - 1)
        ids[i, n] = cfg.vocab_size - 1  # end of text: the highest id
    return images, ids


def assert_trees_equal(a, b):
    fa, fb = ser.flatten_params(a), ser.flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def vit():
    return TINY, init_params(TINY)


# ------------------------------------------------------------------ serialization + model dir
def test_safetensors_and_msgpack_round_trip_keep_dtypes_and_scalars(tmp_path):
    tree = {
        "a": {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "h": np.ones(3, ml_dtypes.bfloat16),
        },
        "scale": np.array(2.5, np.float32),
    }
    for name, save, read in (
        ("p.safetensors", ser.save_safetensors, ser.load_safetensors),
        ("p.msgpack", ser.save_msgpack, ser.load_msgpack),
    ):
        path = tmp_path / name
        save(tree, path)
        back = read(path)
        assert_trees_equal(tree, back)
        assert back["scale"].shape == () and back["a"]["h"].dtype == ml_dtypes.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["p.msgpack", "p.safetensors"]  # no temp files left


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_unflatten_rejects_clashing_names():
    with pytest.raises(ValueError, match="clashes"):
        ser.unflatten_params({"a": np.zeros(1), "a/b": np.zeros(1)})


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack"])
def test_model_dir_round_trip_and_scan_layout(tmp_path, vit, fmt):
    cfg, params = vit
    save_model_dir(str(tmp_path / "m"), cfg, params, fmt)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", f"params.{fmt}"]
    cfg2, params2 = read_model_dir(str(tmp_path / "m"))
    assert cfg2 == cfg
    assert_trees_equal(params, params2)
    # A scanned-layer config stores the same (looped) names and loads stacked params.
    import dataclasses

    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    from clipjax.models import stack_layer_params

    save_model_dir(str(tmp_path / "s"), scan_cfg, stack_layer_params(params), fmt)
    assert (
        (
            ser.flatten_params(ser.load_safetensors(tmp_path / "s" / "params.safetensors")).keys()
            == ser.flatten_params(params).keys()
        )
        if fmt == "safetensors"
        else True
    )
    _, stacked = read_model_dir(str(tmp_path / "s"))
    assert stacked["visual"]["transformer"]["blocks"]["ln_1"]["scale"].shape == (2, 64)
    assert model_fingerprint(scan_cfg, stacked) == model_fingerprint(cfg, params)


def test_load_errors_name_the_problem(tmp_path, vit):
    cfg, params = vit
    with pytest.raises(FileNotFoundError, match="no such file"):
        detect_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model"):
        detect_source(str(tmp_path / "empty"))
    save_model_dir(str(tmp_path / "m"), cfg, params)
    os.remove(tmp_path / "m" / "params.safetensors")
    with pytest.raises(FileNotFoundError, match="params.safetensors"):
        load(str(tmp_path / "m"))
    cfg_file = tmp_path / "m" / "config.json"
    d = json.loads(cfg_file.read_text())
    d["version"] = 99
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="version 99"):
        load(str(tmp_path / "m"))
    bad = jax.tree.map(lambda a: a, params)
    bad["text"]["text_projection"] = np.zeros((64, 7), np.float32)
    with pytest.raises(ValueError, match="text/text_projection has shape"):
        check_params(cfg, bad, where="x")


def test_load_gives_model_params_preprocess(tmp_path, vit):
    from PIL import Image

    cfg, params = vit
    save_model_dir(str(tmp_path / "m"), cfg, params, "msgpack")
    import clipjax

    model, variables, preprocess = clipjax.load(str(tmp_path / "m"))
    assert set(variables) == {"params"}  # the same kind for every tower (ResNet: + batch_stats)
    x = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    images, ids = inputs(cfg)
    ref = CLIP(cfg).apply({"params": params}, images, method="encode_image")
    got = model.apply(variables, images, method="encode_image")
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))


# ------------------------------------------------------------------ OpenAI / open_clip naming
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _resblocks(x, sd, prefix, layers, heads, causal):
    """OpenAI's residual attention blocks, straight from the PyTorch-layout tensors."""
    b, t, width = x.shape
    hd = width // heads
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        h = _ln(x, sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        qkv = h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
        q, k, v = (a.reshape(b, t, heads, hd) for a in np.split(qkv, 3, axis=-1))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        if causal:
            logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, width)
        x = x + a @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
        h = _ln(x, sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        h = h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
        h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
    return x


def openai_reference(sd, cfg, images_nhwc, ids):
    """OpenAI CLIP ViT forward in numpy float64 on an OpenAI-named state dict."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = images_nhwc.astype(np.float64).transpose(0, 3, 1, 2)  # NCHW, as torch
    b, p = x.shape[0], cfg.patch_size
    g = cfg.image_size // p
    patches = x.reshape(b, 3, g, p, g, p)
    x = np.einsum("bcipjq,wcpq->bijw", patches, sd["visual.conv1.weight"]).reshape(b, g * g, -1)
    cls = np.broadcast_to(sd["visual.class_embedding"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _resblocks(x, sd, "visual.transformer", cfg.vision_layers, cfg.vision_heads, False)
    img = _ln(x[:, 0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = _resblocks(t, sd, "transformer", cfg.text_layers, cfg.text_heads, True)
    t = _ln(t, sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[np.arange(b), ids.argmax(-1)] @ sd["text_projection"]
    norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    return norm(img), norm(txt)


def test_openai_export_matches_a_reference_forward_on_pytorch_layout(vit):
    cfg, params = vit
    sd = to_openai_state_dict(cfg, params)
    w = cfg.vision_width
    # PyTorch conventions: conv OIHW, packed qkv [3W, W], linear [out, in].
    assert sd["visual.conv1.weight"].shape == (w, 3, cfg.patch_size, cfg.patch_size)
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * w, w)
    assert sd["transformer.resblocks.1.mlp.c_fc.weight"].shape == (
        4 * cfg.text_width,
        cfg.text_width,
    )
    assert sd["visual.proj"].shape == (w, cfg.embed_dim) and sd["logit_scale"].shape == ()
    images, ids = inputs(cfg)
    ref_img, ref_txt = openai_reference(sd, cfg, images, ids)
    out = CLIP(cfg).apply({"params": params}, images, ids)
    np.testing.assert_allclose(np.asarray(out["image_embeds"]), ref_img, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["text_embeds"]), ref_txt, atol=2e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_RN], ids=["vit", "resnet"])
def test_openai_round_trip_exact(cfg):
    params = init_params(cfg)
    sd = to_openai_state_dict(cfg, params)
    sd["visual.bn1.num_batches_tracked" if cfg.vision_type == "resnet" else "input_resolution"] = (
        np.array(3)
    )  # bookkeeping entries of torch checkpoints are ignored
    cfg2, params2 = from_openai_state_dict(
        sd, act=cfg.act, text_heads=1, **({"vision_heads": 1} if cfg.vision_type == "vit" else {})
    )
    assert cfg2 == cfg
    assert_trees_equal(params, params2)


def test_openai_config_inference_and_unknown_tensors(vit):
    cfg, params = vit
    sd = to_openai_state_dict(cfg, params)
    inferred = config_from_openai(sd)
    assert (inferred.vision_heads, inferred.text_heads) == (1, 1)  # OpenAI: width // 64
    assert (inferred.image_size, inferred.patch_size, inferred.vision_layers) == (32, 8, 2)
    sd["visual.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="visual.extra.weight"):
        from_openai_state_dict(sd)
    with pytest.raises(KeyError, match="not an OpenAI"):
        config_from_openai({"foo": np.zeros(1)})


# ------------------------------------------------------------------ Hugging Face + CLI
@pytest.fixture(scope="module")
def exported(tmp_path_factory, vit):
    """A clipjax model dir and its HF export made by the CLI."""
    cfg, params = vit
    root = tmp_path_factory.mktemp("hf")
    save_model_dir(str(root / "m"), cfg, params)
    assert (
        export_main(["--model", str(root / "m"), "--out", str(root / "hf"), "--format", "hf"]) == 0
    )
    return root


def test_hf_export_loads_in_transformers_with_matching_outputs(exported, vit):
    os.environ.setdefault("USE_TORCH", "0")
    from transformers import FlaxCLIPModel

    cfg, params = vit
    assert sorted(os.listdir(exported / "hf")) == [
        "config.json",
        "flax_model.msgpack",
        "model.safetensors",
    ]
    hf_model, hf_params = FlaxCLIPModel.from_pretrained(str(exported / "hf"), _do_init=False)
    images, ids = inputs(cfg)
    out = hf_model(input_ids=ids, pixel_values=images.transpose(0, 3, 1, 2), params=hf_params)
    ref = CLIP(cfg).apply({"params": params}, images, ids)
    np.testing.assert_allclose(
        np.asarray(out.image_embeds), np.asarray(ref["image_embeds"]), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(out.text_embeds), np.asarray(ref["text_embeds"]), atol=1e-5
    )


_TORCH_CHECK = """
import sys, numpy as np, torch
from transformers import CLIPModel
d = np.load(sys.argv[2])
model = CLIPModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=torch.from_numpy(d["ids"]).long(),
                pixel_values=torch.from_numpy(d["images"].transpose(0, 3, 1, 2)))
np.testing.assert_allclose(out.image_embeds.numpy(), d["image_embeds"], atol=1e-5)
np.testing.assert_allclose(out.text_embeds.numpy(), d["text_embeds"], atol=1e-5)
print("torch-ok")
"""


def test_hf_export_loads_in_pytorch_clipmodel(exported, vit, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    cfg, params = vit
    images, ids = inputs(cfg)
    ref = CLIP(cfg).apply({"params": params}, images, ids)
    np.savez(
        tmp_path / "ref.npz",
        images=images,
        ids=ids,
        image_embeds=np.asarray(ref["image_embeds"]),
        text_embeds=np.asarray(ref["text_embeds"]),
    )
    # A fresh process: torch and TensorFlow do not share one.
    env = {k: v for k, v in os.environ.items() if k not in ("USE_TORCH", "XLA_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_CHECK, str(exported / "hf"), str(tmp_path / "ref.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and "torch-ok" in proc.stdout, proc.stderr[-3000:]


def test_hf_round_trip_via_cli_is_exact_from_either_weight_file(exported, vit, tmp_path):
    cfg, params = vit
    assert (
        export_main(
            ["import", "--from", "hf", str(exported / "hf"), "--out", str(tmp_path / "back")]
        )
        == 0
    )
    cfg2, params2 = read_model_dir(str(tmp_path / "back"))
    assert cfg2 == cfg
    assert_trees_equal(params, params2)
    # Only the PyTorch-named safetensors: same params.
    import shutil

    shutil.copytree(exported / "hf", tmp_path / "pt_only")
    os.remove(tmp_path / "pt_only" / "flax_model.msgpack")
    _, variables3, _ = load(str(tmp_path / "pt_only"))
    assert_trees_equal(params, variables3["params"])


def test_openai_cli_round_trip_and_load_of_state_dict_file(exported, vit, tmp_path, capsys):
    cfg, params = vit
    sd_file = str(tmp_path / "openai.safetensors")
    assert (
        export_main(["--model", str(exported / "m"), "--out", sd_file, "--format", "openai"]) == 0
    )
    # Tiny widths (64) give one 64-wide head, OpenAI's convention, so shapes infer exactly.
    assert (
        export_main(
            [
                "import",
                "--from",
                "openai",
                sd_file,
                "--out",
                str(tmp_path / "imp"),
                "--format",
                "msgpack",
            ]
        )
        == 0
    )
    cfg2, params2 = read_model_dir(str(tmp_path / "imp"))
    assert cfg2 == cfg
    assert_trees_equal(params, params2)
    assert (
        export_main(["import", "--from", "open_clip", sd_file, "--out", str(tmp_path / "oc")]) == 0
    )
    assert read_model_dir(str(tmp_path / "oc"))[0].act == "gelu"  # open_clip default
    model, variables4, _ = load(sd_file)  # state dict files load directly
    assert_trees_equal(params, variables4["params"])


def test_cli_errors(exported, tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown format
        export_main(
            ["--model", str(exported / "m"), "--out", str(tmp_path / "o"), "--format", "onnx"]
        )
    with pytest.raises(SystemExit, match="already exists"):
        export_main(["--model", str(exported / "m"), "--out", str(exported / "hf")])
    with pytest.raises(SystemExit, match="not a Hugging Face CLIP directory"):
        export_main(["import", "--from", "hf", str(exported / "m"), "--out", str(tmp_path / "y")])
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "y")


def test_export_from_training_workdir(tmp_path):
    import jax.numpy as jnp

    from clipjax.train.checkpoint import Checkpointer
    from clipjax.train.state import TrainState

    overrides = {"vocab_size": 500, "text_layers": 1, "vision_layers": 1}
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "config.json").write_text(
        json.dumps(
            {
                "model": {
                    "preset": "tiny",
                    "dtype": "float32",
                    "scan_layers": False,
                    "remat": "none",
                    "overrides": overrides,
                },
                "seed": 0,
            }
        )
    )
    import dataclasses

    from clipjax.models import get_preset

    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    p1, p2 = init_params(cfg, 1), init_params(cfg, 2)
    ckpt = Checkpointer(str(tmp_path / "wd"), every_steps=1, keep=3, async_save=False)
    for step, p in ((10, p1), (20, p2)):
        state = TrainState.create(
            jax.tree.map(jnp.asarray, p),
            opt_state={"mu": jax.tree.map(jnp.zeros_like, p)},
            rng=jnp.zeros(2, jnp.uint32),
        )
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    assert export_main(["--workdir", str(tmp_path / "wd"), "--out", str(tmp_path / "latest")]) == 0
    cfg_l, params_l = read_model_dir(str(tmp_path / "latest"))
    assert cfg_l == cfg
    assert_trees_equal(p2, params_l)
    assert (
        export_main(
            ["--workdir", str(tmp_path / "wd"), "--step", "10", "--out", str(tmp_path / "s10")]
        )
        == 0
    )
    assert_trees_equal(p1, read_model_dir(str(tmp_path / "s10"))[1])
    assert (
        export_main(
            ["--workdir", str(tmp_path / "wd"), "--step", "15", "--out", str(tmp_path / "s15")]
        )
        == 1
    )
    _, variables_w, _ = load(str(tmp_path / "wd"))
    assert_trees_equal(p2, variables_w["params"])


def test_export_resnet_from_workdir_with_model_config(tmp_path):
    """The trainer's model_config.json names the architecture; BatchNorm statistics come from
    the checkpointed model_state."""
    import jax.numpy as jnp

    from clipjax.export.modeldir import config_to_json
    from clipjax.train.checkpoint import Checkpointer
    from clipjax.train.state import TrainState

    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "model_config.json").write_text(config_to_json(TINY_RN))
    v = init_params(TINY_RN, 3)
    state = TrainState.create(
        jax.tree.map(jnp.asarray, v["params"]),
        opt_state={},
        rng=jnp.zeros(2, jnp.uint32),
        model_state={"batch_stats": jax.tree.map(jnp.asarray, v["batch_stats"])},
    )
    ckpt = Checkpointer(str(tmp_path / "wd"), every_steps=1, keep=1, async_save=False)
    ckpt.save(3, state, {"step": 3})
    ckpt.close()
    assert export_main(["--workdir", str(tmp_path / "wd"), "--out", str(tmp_path / "m")]) == 0
    cfg, variables = read_model_dir(str(tmp_path / "m"))
    assert cfg == TINY_RN and sorted(os.listdir(tmp_path / "m")) == [
        "batch_stats.safetensors",
        "config.json",
        "params.safetensors",
    ]
    assert_trees_equal(v, variables)
    _, loaded, _ = load(str(tmp_path / "m"))  # the same kind of value as for a ViT tower
    assert set(loaded) == {"params", "batch_stats"}
    assert_trees_equal(v, loaded)
