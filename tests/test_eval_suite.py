"""Evaluation suites: a suite over the project's own data (zero-shot, retrieval, linear probe,
few-shot) through the CLI and the trainer; missing data skipped with its reason; the linear
probe against scikit-learn and its optimality conditions; few-shot against a numpy ridge."""

import json
import os

import flax
import jax
import numpy as np
import pytest

from clipjax.evaluate import probe
from clipjax.evaluate.__main__ import main as evaluate_main
from clipjax.evaluate.suite import format_suite_table, load_suite, parse_suite, suite_metrics
from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIPConfig, abstract_variables

TINY = CLIPConfig(
    embed_dim=16,
    image_size=32,
    patch_size=16,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    context_length=16,
    text_width=32,
    text_layers=1,
    text_heads=2,
)


def blobs(n, centers, rng, noise=1.0):
    """Gaussian blobs: labels uniform over the centers' rows."""
    y = rng.integers(0, len(centers), n)
    return centers[y] + noise * rng.standard_normal((n, centers.shape[1])), y


# ------------------------------------------------------------------ the suite, end to end
@pytest.fixture(scope="module")
def project_data(tmp_path_factory):
    """A tiny random model, the demo shards, and class folders drawn from the demo renderer."""
    from PIL import Image

    from clipjax.data.demo import DEMO_CLASSNAMES, make_demo_dataset, render_example

    root = tmp_path_factory.mktemp("suite")
    rng = np.random.default_rng(0)
    shapes = flax.core.meta.unbox(abstract_variables(TINY))["params"]
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_model_dir(str(root / "model"), TINY, params)
    demo = make_demo_dataset(str(root / "demo"), n_train=180, n_test=60, image_size=32)
    for i in range(24):
        image, _, label = render_example(np.random.default_rng([7, i]), 32)
        folder = root / "folders" / DEMO_CLASSNAMES[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return root, demo


def demo_suite(root, demo) -> dict:
    """The suite the tests build from the project's own data, plus two tasks with no data."""
    return {
        "name": "project",
        "batch_size": 32,
        "data_dir": str(root / "no_tfds_here"),
        "tasks": [
            {"task": "zeroshot", "name": "demo/zeroshot", "data": demo.test,
             "classnames": "demo", "templates": "demo"},
            {"task": "zeroshot", "name": "folders/zeroshot", "data": str(root / "folders"),
             "templates": ["a photo of a {}."]},
            {"task": "retrieval", "name": "demo/retrieval", "data": demo.test},
            {"task": "linear_probe", "name": "demo/linear_probe", "train": demo.train,
             "data": demo.test, "l2_grid": [1e-2, 1e-4]},
            {"task": "fewshot", "name": "demo/fewshot", "train": demo.train, "data": demo.test,
             "shots": [1, 5], "seeds": 2},
            {"task": "zeroshot", "name": "cifar10/zeroshot", "data": "tfds:cifar10:test"},
            {"task": "linear_probe", "name": "gone/linear_probe",
             "train": str(root / "gone" / "*.tfrecord"), "data": demo.test},
        ],
    }  # fmt: skip


def test_suite_over_project_data_gives_table_and_json(project_data, capsys):
    root, demo = project_data
    suite_file = root / "suite.json"
    suite_file.write_text(json.dumps(demo_suite(root, demo)))
    out = root / "results.json"
    rc = evaluate_main(
        ["--suite", str(suite_file), "--model", str(root / "model"), "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.read_text())
    tasks = {t["name"]: t for t in result["tasks"]}
    assert list(tasks) == [t["name"] for t in demo_suite(root, demo)["tasks"]]  # suite order
    status = {n: t["status"] for n, t in tasks.items()}
    assert status == {
        "demo/zeroshot": "ok",
        "folders/zeroshot": "ok",
        "demo/retrieval": "ok",
        "demo/linear_probe": "ok",
        "demo/fewshot": "ok",
        "cifar10/zeroshot": "skipped",
        "gone/linear_probe": "skipped",
    }
    assert "'cifar10' is not prepared under" in tasks["cifar10/zeroshot"]["reason"]
    assert "no_tfds_here" in tasks["cifar10/zeroshot"]["reason"]
    assert "no such files" in tasks["gone/linear_probe"]["reason"]

    zs = tasks["demo/zeroshot"]["metrics"]
    assert (zs["num_examples"], zs["num_classes"]) == (60, 12)
    assert 0 <= zs["top1"] <= zs["top5"] <= 1
    folders = tasks["folders/zeroshot"]["metrics"]
    assert folders["num_examples"] == 24 and folders["num_classes"] == len(
        os.listdir(root / "folders")
    )
    r = tasks["demo/retrieval"]["metrics"]
    assert (r["num_images"], r["num_texts"]) == (60, 60)
    lp = tasks["demo/linear_probe"]["metrics"]
    assert (lp["num_train"], lp["num_test"]) == (180, 60)
    assert lp["l2"] in (1e-2, 1e-4) and 0 <= lp["top1"] <= 1 and 0 <= lp["val_top1"] <= 1
    fs = tasks["demo/fewshot"]["metrics"]
    assert set(fs) >= {"1shot/top1", "5shot/top1"} and 0 <= fs["5shot/top1"] <= 1

    # One table: every task, its figures as percentages, skipped tasks with their reason.
    assert "suite project" in printed
    for name in tasks:
        assert name in printed
    assert "skipped: tfds dataset 'cifar10'" in printed
    assert f"{100 * lp['top1']:6.2f} %" in printed and "5shot/top1" in printed
    assert format_suite_table(result["tasks"]) in printed
    flat = suite_metrics(result["tasks"])
    assert flat["suite/demo/linear_probe/top1"] == lp["top1"]
    assert not any(k.startswith("suite/cifar10") for k in flat)


def test_probe_tasks_from_the_command_line(project_data, capsys):
    root, demo = project_data
    out = root / "fewshot.json"
    args = ["--model", str(root / "model"), "--train-data", demo.train, "--data", demo.test]
    assert evaluate_main(args + ["--task", "fewshot", "--shots", "2,3", "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert set(m) == {"2shot/top1", "2shot/top1_std", "3shot/top1", "3shot/top1_std", "num_test"}
    assert "3shot/top1" in capsys.readouterr().out
    assert evaluate_main(args + ["--task", "fewshot", "--shots", "0"]) == 1
    assert "--shots '0'" in capsys.readouterr().err
    assert evaluate_main(["--model", str(root / "model"), "--task", "linear_probe",
                          "--data", demo.test]) == 1  # fmt: skip
    assert "needs --train-data" in capsys.readouterr().err
    assert evaluate_main(["--model", str(root / "model")]) == 1
    assert "either --suite or --task" in capsys.readouterr().err


def test_trainer_runs_the_suite_into_metrics(project_data, tmp_path):
    """run_evals (the trainer's periodic and end-of-training evaluation) runs config.eval.suite;
    the loop writes what it returns to metrics.jsonl / TensorBoard through MetricWriter."""
    from types import SimpleNamespace

    from clipjax.parallel.mesh import make_mesh
    from clipjax.train.config import ConfigError, base_config, validate
    from clipjax.train.hooks import run_evals
    from clipjax.train.metrics import MetricWriter

    root, demo = project_data
    suite = {
        "tasks": [
            {"task": "zeroshot", "name": "demo/zeroshot", "data": demo.test, "limit": 16,
             "classnames": "demo"},
            {"task": "fewshot", "name": "demo/fewshot", "train": demo.train, "data": demo.test,
             "shots": [2], "seeds": 1},
            {"task": "retrieval", "name": "missing/retrieval", "data": str(root / "nope")},
        ],
    }  # fmt: skip
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    c = base_config()
    c.eval.suite = str(tmp_path / "suite.json")
    c.eval.batch_size = 16
    from clipjax.export.load import load

    model, params, _ = load(str(root / "model"))
    trainer = SimpleNamespace(config=c, model_config=TINY, model=model, mesh=make_mesh())
    got = run_evals(trainer, params)
    assert got["suite/demo/zeroshot/num_examples"] == 16
    assert 0 <= got["suite/demo/fewshot/2shot/top1"] <= 1
    assert not any("missing" in k for k in got)
    writer = MetricWriter(str(tmp_path / "w"), enabled=True, tensorboard=True)
    writer.write(7, got)
    writer.close()
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        (logged,) = [json.loads(line) for line in f]
    assert logged["suite/demo/fewshot/2shot/top1"] == got["suite/demo/fewshot/2shot/top1"]

    c.data.train = demo.train
    c.eval.suite = str(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="eval.suite"):
        validate(c, num_devices=8)


# ------------------------------------------------------------------ suite files
def test_suite_files_are_checked_before_running(tmp_path):
    default = load_suite("default")
    kinds = {t.kind for t in default.tasks}
    assert kinds == {"zeroshot", "linear_probe", "fewshot"}
    assert all(t.data.startswith("tfds:") for t in default.tasks)
    demo = load_suite("demo")
    assert {t.kind for t in demo.tasks} == {"zeroshot", "retrieval", "linear_probe", "fewshot"}
    # A .py suite is a config file returning the same dict.
    py = tmp_path / "mine.py"
    py.write_text(
        "def get_suite():\n"
        "    return {'tasks': [{'task': 'fewshot', 'train': 'a/*.tfrecord', 'data': 'tfds:x',"
        " 'shots': [1, 2]}]}\n"
    )
    s = load_suite(str(py))
    assert s.name == "mine" and s.tasks[0].name == "x/fewshot"
    assert s.tasks[0].options == {"shots": [1, 2]}
    bad = [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": [{"task": "knn", "data": "x"}]}, "must be one of"),
        ({"tasks": [{"task": "linear_probe", "data": "x"}]}, "'train'"),
        ({"tasks": [{"task": "zeroshot", "data": "x", "shots": [1]}]}, "'shots'"),
        ({"tasks": [{"task": "fewshot", "data": "x", "train": "y", "shots": [0]}]}, "positive"),
        ({"tasks": [{"task": "zeroshot", "data": "x", "templates": ["no slot"]}]}, "'{}'"),
        ({"tasks": [{"task": "retrieval", "data": "a/x"}, {"task": "retrieval", "data": "b/x"}]},
         "unique"),
        ({"tasks": [{"task": "retrieval", "data": "x"}], "gpus": 2}, "unknown key"),
    ]  # fmt: skip
    for raw, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_suite(raw)
    with pytest.raises(FileNotFoundError, match="packaged suites"):
        load_suite(str(tmp_path / "none.json"))


# ------------------------------------------------------------------ linear probe
def logistic_objective_grad(x, y, w, b, l2):
    """Numpy gradient of mean cross-entropy + l2/2 |W|^2."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return x.T @ p / len(y) + l2 * w, p.mean(0)


def test_logistic_regression_reaches_the_optimum():
    rng = np.random.default_rng(0)
    centers = 0.5 * rng.standard_normal((5, 32))
    x, y = blobs(300, centers, rng)
    x = probe.normalize(x)
    for l2 in (1e-1, 1e-3):
        w, b = probe.fit_logistic(x, y, 5, l2)
        gw, gb = logistic_objective_grad(x.astype(np.float64), y, w, b, l2)
        assert np.abs(gw).max() < 1e-4 and np.abs(gb).max() < 1e-4, l2
    # Fitting on some rows equals fitting on those rows alone (the same shapes compile once).
    rows = np.arange(0, 300, 3)
    w1, b1 = probe.fit_logistic(x, y, 5, 1e-2, rows=rows)
    w2, b2 = probe.fit_logistic(x[rows], y[rows], 5, 1e-2)
    np.testing.assert_allclose(w1, w2, atol=2e-3)
    np.testing.assert_allclose(b1, b2, atol=2e-3)


def test_linear_probe_matches_scikit_learn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    centers = 0.45 * rng.standard_normal((5, 32))  # separable-ish: about 80 % accuracy
    train_x, train_y = blobs(400, centers, rng)
    test_x, test_y = blobs(400, centers, rng)
    got = probe.linear_probe(train_x, train_y, test_x, test_y)
    assert 0.6 < got["top1"] < 1.0  # the set is neither trivial nor hopeless
    n = len(train_y)
    # The same objective: C = 1 / (l2 * n). Both at the chosen strength, and the solutions at
    # another one, agree.
    ref = sklearn_lm.LogisticRegression(C=1 / (got["l2"] * n), max_iter=5000, tol=1e-8)
    ref.fit(probe.normalize(train_x), train_y)
    assert abs(got["top1"] - ref.score(probe.normalize(test_x), test_y)) <= 0.01
    w, b = probe.fit_logistic(probe.normalize(train_x), train_y, 5, 1e-3)
    ref = sklearn_lm.LogisticRegression(C=1 / (1e-3 * n), max_iter=5000, tol=1e-8)
    ref.fit(probe.normalize(train_x), train_y)
    np.testing.assert_allclose(w, ref.coef_.T, atol=1e-2 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-2 * np.abs(ref.coef_).max())


# ------------------------------------------------------------------ few-shot
def numpy_ridge_accuracy(x, y, x_test, y_test, num_classes, l2):
    """Reference: whitened features, bias feature, primal ridge to {-1, 1} targets (float64)."""
    x, x_test = probe.normalize(x).astype(np.float64), probe.normalize(x_test).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    pad = lambda a: np.concatenate([a, np.full((len(a), 1), probe.BIAS_FEATURE)], 1)  # noqa: E731
    x, x_test = pad((x - mean) / std), pad((x_test - mean) / std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ targets)
    return float(((x_test @ w).argmax(1) == y_test).mean())


def test_fewshot_equals_a_numpy_ridge_and_is_high_on_separable_data():
    rng = np.random.default_rng(2)
    centers = 3.0 * rng.standard_normal((5, 32))  # well separated
    train_x, train_y = blobs(300, centers, rng)
    test_x, test_y = blobs(200, centers, rng)
    shots = (1, 5, 10)  # 5 / 25 / 50 examples for 33 features: dual and primal solves
    for l2 in (probe.FEWSHOT_L2, 1.0):
        got = probe.fewshot(train_x, train_y, test_x, test_y, shots=shots, seeds=3, l2=l2)
        for k in shots:
            accs = []
            for seed in range(3):
                r = np.random.default_rng(seed)
                idx = np.concatenate(
                    [r.permutation(np.flatnonzero(train_y == c))[:k] for c in range(5)]
                )
                accs.append(numpy_ridge_accuracy(train_x[idx], train_y[idx], test_x, test_y, 5, l2))
            assert got[f"{k}shot/top1"] == pytest.approx(np.mean(accs), abs=1e-9), (k, l2)
            assert got[f"{k}shot/top1_std"] == pytest.approx(np.std(accs), abs=1e-9)
    assert got["5shot/top1"] > 0.9 and got["10shot/top1"] > 0.9
    with pytest.raises(ValueError, match="no shot count"):
        probe.fewshot(train_x[:20], train_y[:20], test_x, test_y, shots=(50,))
