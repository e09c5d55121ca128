"""Zero-shot and retrieval evaluation: metrics vs brute-force references, mesh vs no mesh, CLI."""

import json

import flax
import jax
import numpy as np
import pytest

from clipjax.evaluate.__main__ import main as evaluate_main
from clipjax.evaluate.classnames import load_classnames, load_templates
from clipjax.evaluate.retrieval import retrieval_metrics, retrieval_recall
from clipjax.evaluate.zeroshot import classifier_weights, zeroshot_accuracy
from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIP, CLIPConfig, abstract_variables
from clipjax.parallel.mesh import make_mesh

# Real CLIP vocabulary so the real tokenizer's ids fit.
TINY = CLIPConfig(
    embed_dim=16,
    image_size=32,
    patch_size=16,
    vision_width=64,
    vision_layers=1,
    vision_heads=2,
    context_length=16,
    text_width=64,
    text_layers=1,
    text_heads=2,
)


@pytest.fixture(scope="module")
def model_params():
    rng = np.random.default_rng(0)
    shapes = flax.core.meta.unbox(abstract_variables(TINY))["params"]
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    return CLIP(TINY), params


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ assets
def test_packaged_classnames_and_templates(tmp_path):
    names = load_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    openai = load_templates("openai")
    assert len(openai) == 80 and len(set(openai)) == 80 and all("{}" in t for t in openai)
    assert load_templates("simple")[0] == "itap of a {}." and len(load_templates("simple")) == 7
    assert len(load_classnames("demo")) == 12 and load_templates("photo") == ["a photo of a {}."]
    assert load_classnames("cat, dog") == ["cat", "dog"]
    assert load_templates("openai_imagenet_templates.txt") == openai  # packaged file by name
    f = tmp_path / "t.txt"
    f.write_text("a {} here\nno placeholder\n")
    with pytest.raises(ValueError, match="no placeholder"):
        load_templates(str(f))
    with pytest.raises(ValueError, match="expected one of"):
        load_classnames("imagenet21k")


# ------------------------------------------------------------------ retrieval metrics
def brute_force_recall(img, txt, owner, ks):
    """Reference: full argsort rankings."""
    sims = img @ txt.T
    out = {}
    i2t_order = np.argsort(-sims, axis=1)
    t2i_order = np.argsort(-sims.T, axis=1)
    for k in ks:
        out[f"image_to_text/R@{k}"] = np.mean(
            [np.any(owner[i2t_order[i, :k]] == i) for i in range(len(img))]
        )
        out[f"text_to_image/R@{k}"] = np.mean(
            [owner[j] in t2i_order[j, :k] for j in range(len(txt))]
        )
    return out


def test_retrieval_metrics_match_brute_force_with_several_captions():
    rng = np.random.default_rng(0)
    n, d = 40, 8
    owner = np.concatenate([np.arange(n), rng.integers(0, n, 70)])  # 1-3+ captions per image
    img = unit(rng.standard_normal((n, d)))
    txt = unit(img[owner] + 0.9 * rng.standard_normal((len(owner), d)))  # noisy: partial recall
    got = retrieval_metrics(img, txt, owner, chunk=7)  # chunking must not matter
    ref = brute_force_recall(img, txt, owner, (1, 5, 10))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    assert 0 < got["image_to_text/R@1"] < 1 and got["text_to_image/R@10"] > got["text_to_image/R@1"]
    # Hand-checked: caption 0 (of image 0) is closest to image 1; image 1's own caption loses
    # to caption 0; everything else is a hit.
    img2 = np.eye(3)
    txt2 = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0.1, 0.9, 0]])
    m = retrieval_metrics(img2, txt2, np.array([0, 0, 2, 1]), ks=(1,))
    assert m["image_to_text/R@1"] == pytest.approx(2 / 3)
    assert m["text_to_image/R@1"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="have no caption"):
        retrieval_metrics(img2, txt2[:2], np.array([0, 0]))


def test_retrieval_recall_groups_captions_by_key(model_params):
    model, params = model_params
    rng = np.random.default_rng(1)
    images = rng.standard_normal((5, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((8, 16), np.int32)
    ids[:, 0] = 49406
    ids[np.arange(8), 1] = rng.integers(1, 40000, 8)
    ids[:, 2] = 49407
    # Records as the eval pipeline yields them: one row per caption, rows of an image share a
    # key, batches padded with masked rows. Image i has captions at rows where owner == i.
    owner = np.array([0, 1, 1, 2, 3, 3, 4, 0])
    keys = np.array([f"k{o}" for o in owner], dtype=object)
    pad = lambda a, n: np.concatenate([a, np.zeros((n,) + a.shape[1:], a.dtype)])  # noqa: E731
    batches = [
        {
            "image": pad(images[owner[:4]], 2),
            "text": pad(ids[:4], 2),
            "key": np.concatenate([keys[:4], ["", ""]]),
            "mask": np.arange(6) < 4,
        },
        {
            "image": pad(images[owner[4:]], 2),
            "text": pad(ids[4:], 2),
            "key": np.concatenate([keys[4:], ["", ""]]),
            "mask": np.arange(6) < 4,
        },
    ]
    got = retrieval_recall(model, params, batches, mesh=make_mesh(), batch_size=8)
    img_emb = np.asarray(model.apply({"params": params}, images, method="encode_image"))
    txt_emb = np.asarray(model.apply({"params": params}, ids, method="encode_text"))
    ref = retrieval_metrics(img_emb, txt_emb, owner)
    assert got["num_images"] == 5 and got["num_texts"] == 8
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


# ------------------------------------------------------------------ zero-shot
def test_zeroshot_on_mesh_matches_numpy_reference_and_ignores_padding(model_params):
    from clipjax.data.tokenizer import tokenize

    model, params = model_params
    classnames = ["cat", "dog", "red car", "tree", "boat", "cloud"]
    templates = ["a photo of a {}.", "a drawing of the {}."]
    # Reference prompt ensemble, computed directly.
    tok = tokenize([t.replace("{}", c) for c in classnames for t in templates], 16)
    emb = np.asarray(model.apply({"params": params}, tok, method="encode_text"))
    ref_w = unit(unit(emb).reshape(6, 2, -1).mean(1)).T  # [D, C]
    mesh = make_mesh()  # 8 fake devices on the batch axes
    w = classifier_weights(model, params, classnames, templates, mesh=mesh, batch_size=4)
    np.testing.assert_allclose(w, ref_w, atol=1e-5)

    rng = np.random.default_rng(2)
    images = rng.standard_normal((14, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(model.apply({"params": params}, images, method="encode_image")) @ ref_w
    order = np.argsort(-logits, axis=1)
    labels = np.where(np.arange(14) % 3 == 0, order[:, 0], order[:, 3])  # some top-1 right
    labels[5] = order[5, 1]
    ref_top1 = np.mean(order[:, 0] == labels)
    ref_top5 = np.mean([labels[i] in order[i, :5] for i in range(14)])
    # 3 batches of 6 rows (not divisible by 8 devices: padded); padding rows carry junk labels.
    batches = []
    for start in range(0, 14, 6):
        n = min(6, 14 - start)
        img = np.concatenate([images[start : start + n], np.ones((6 - n, 32, 32, 3), np.float32)])
        lab = np.concatenate([labels[start : start + n], np.full(6 - n, 999)])
        batches.append({"image": img, "label": lab, "mask": np.arange(6) < n})
    for m in (mesh, None):
        got = zeroshot_accuracy(model, params, batches, classnames, templates, mesh=m)
        assert got["num_examples"] == 14
        assert got["top1"] == pytest.approx(ref_top1) and got["top5"] == pytest.approx(ref_top5)
    per_class = [np.mean(order[labels == c, 0] == c) for c in np.unique(labels)]
    assert got["mean_per_class_top1"] == pytest.approx(np.mean(per_class))
    with pytest.raises(ValueError, match="outside the 6 class names"):
        zeroshot_accuracy(
            model,
            params,
            [{"image": images[:2], "label": np.array([0, 6])}],
            classnames,
            templates,
            weights=w,
        )


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, model_params):
    from PIL import Image

    from clipjax.data.demo import make_demo_dataset

    _, params = model_params
    root = tmp_path_factory.mktemp("eval")
    save_model_dir(str(root / "model"), TINY, params)
    demo = make_demo_dataset(str(root / "demo"), n_train=1, n_test=20, image_size=32)
    rng = np.random.default_rng(0)
    for cls in ("red_apple", "blue_sky"):
        (root / "folders" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                root / "folders" / cls / f"{i}.png"
            )
    (root / "folders" / "blue_sky" / "corrupt.jpg").write_bytes(b"garbage")
    return root, demo


def test_cli_zeroshot_and_retrieval_on_shards(cli_setup, capsys):
    root, demo = cli_setup
    out = root / "zs.json"
    assert (
        evaluate_main(
            [
                "--model",
                str(root / "model"),
                "--task",
                "zeroshot",
                "--data",
                demo.test,
                "--classnames",
                "demo",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert (m["num_examples"], m["num_classes"], res["num_templates"]) == (20, 12, 4)
    assert 0 <= m["top1"] <= m["top5"] <= 1 and "top1" in printed
    assert (
        evaluate_main(
            [
                "--model",
                str(root / "model"),
                "--task",
                "retrieval",
                "--data",
                demo.test,
                "--batch-size",
                "8",
                "--out",
                str(root / "r.json"),
            ]
        )
        == 0
    )
    m = json.loads((root / "r.json").read_text())["metrics"]
    assert (m["num_images"], m["num_texts"]) == (20, 20)
    assert m["image_to_text/R@1"] <= m["image_to_text/R@5"] <= m["image_to_text/R@10"]


def test_cli_class_folders_and_errors(cli_setup, capsys):
    root, _ = cli_setup
    assert (
        evaluate_main(
            [
                "--model",
                str(root / "model"),
                "--task",
                "zeroshot",
                "--data",
                str(root / "folders"),
                "--templates",
                "photo",
                "--batch-size",
                "4",
                "--out",
                str(root / "f.json"),
            ]
        )
        == 0
    )
    m = json.loads((root / "f.json").read_text())["metrics"]
    assert (m["num_examples"], m["num_classes"], m["skipped"]) == (6, 2, 1)
    assert m["top1"] in (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
    capsys.readouterr()
    assert (
        evaluate_main(
            [
                "--model",
                str(root / "model"),
                "--task",
                "zeroshot",
                "--data",
                str(root / "nothing*.tfrecord"),
            ]
        )
        == 1
    )
    assert "matches no files" in capsys.readouterr().err
    assert (
        evaluate_main(
            [
                "--model",
                str(root / "missing"),
                "--task",
                "retrieval",
                "--data",
                str(root / "folders"),
            ]
        )
        == 1
    )
    assert "missing: no such file" in capsys.readouterr().err
