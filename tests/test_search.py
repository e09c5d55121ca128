"""Image search: exact top-k, the on-disk index (resume, incremental add, mismatch), query CLI."""

import json
import os

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from clipjax.export.load import load, model_fingerprint
from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIPConfig, abstract_variables
from clipjax.search.__main__ import main as search_main
from clipjax.search.build import build_index, list_images
from clipjax.search.index import Index, IndexMismatchError, IndexWriter, exact_topk

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


def random_params(cfg, seed):
    rng = np.random.default_rng(seed)
    shapes = flax.core.meta.unbox(abstract_variables(cfg))["params"]
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ exact top-k
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_topk_matches_full_sort(dtype):
    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((1000, 32))).astype(dtype)
    queries = unit(rng.standard_normal((4, 32))).astype(np.float32)
    scores, ids = exact_topk(emb, queries, 7)
    full = queries.astype(dtype) @ emb.T
    ref_ids = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(
        np.take_along_axis(full, ids, 1), np.take_along_axis(full, ref_ids, 1)
    )  # same scores, in order
    assert np.all(np.diff(scores, axis=1) <= 0)
    s1, i1 = exact_topk(emb, queries[0], 2000)  # k > N: everything, sorted
    assert s1.shape == (1000,) and sorted(i1.tolist()) == list(range(1000))


# ------------------------------------------------------------------ index storage
def test_index_writer_resume_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "idx")
    w = IndexWriter(out, dim=8, dtype="float16", model_fingerprint="abc")
    e1 = unit(rng.standard_normal((3, 8)))
    w.add_chunk(["/a", "/b", "/c"], e1)
    w.add_chunk([], np.zeros((0, 8)), failed={"/bad": "broken"})
    w.close()  # releases the index's lock
    # Re-open (as a resumed run does): knows what is done, appends after it.
    w2 = IndexWriter(out, dim=8, dtype="float16", model_fingerprint="abc")
    assert w2.indexed_paths() == {"/a", "/b", "/c", "/bad"}
    e2 = unit(rng.standard_normal((2, 8)))
    w2.add_chunk(["/d", "/e"], e2)
    w2.close()
    index = Index.load(out)
    assert index.paths == ["/a", "/b", "/c", "/d", "/e"]
    assert index.embeddings.dtype == np.float32  # widened for BLAS
    np.testing.assert_allclose(index.embeddings, np.concatenate([e1, e2]), atol=1e-3)
    with pytest.raises(IndexMismatchError, match="different model"):
        IndexWriter(out, dim=8, dtype="float16", model_fingerprint="xyz")
    with pytest.raises(IndexMismatchError, match="dimension 8"):
        IndexWriter(out, dim=4, dtype="float16", model_fingerprint="abc")
    with pytest.raises(ValueError, match="stores float16"):
        IndexWriter(out, dim=8, dtype="float32", model_fingerprint="abc")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(FileExistsError, match="not a clipjax image index"):
        IndexWriter(str(tmp_path / "other"), dim=8, dtype="float32", model_fingerprint="abc")
    with pytest.raises(FileNotFoundError, match="missing"):
        Index.load(str(tmp_path / "nope"))
    os.remove(os.path.join(out, "chunk-00001.npy"))
    with pytest.raises(FileNotFoundError, match="chunk-00001.npy"):
        Index.load(out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ------------------------------------------------------------------ building + querying
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    save_model_dir(str(root / "model"), TINY, random_params(TINY, 0))
    save_model_dir(str(root / "other_model"), TINY, random_params(TINY, 1))
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    for i in range(9):
        arr = rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "imgs" / ("sub" if i % 2 else "") / f"im{i}.png")
    (root / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


class _Killed(BaseException):  # like KeyboardInterrupt: not swallowed as a bad image
    pass


def test_build_resumes_after_a_kill_and_adds_new_files(setup, tmp_path):
    model, params, preprocess = load(str(setup / "model"))
    fp = model_fingerprint(model.config, params)
    paths = list_images(str(setup / "imgs"))
    assert len(paths) == 10
    kw = dict(
        model=model, params=params, fingerprint=fp, batch_size=4, chunk_size=3, progress=False
    )
    # Reference: one uninterrupted build.
    full = build_index(str(tmp_path / "full"), paths, preprocess=preprocess, **kw)
    assert (full.added, full.failed, full.index_size) == (9, 1, 9)
    # A run killed while loading its 5th image keeps the first complete chunk only.
    calls = []

    def dying(im):
        calls.append(1)
        if len(calls) == 5:
            raise _Killed()
        return preprocess(im)

    out = str(tmp_path / "resumed")
    with pytest.raises(_Killed):
        build_index(out, paths[:8], preprocess=dying, threads=1, **kw)
    # (paths[0] is broken.jpg: recorded as unreadable in that chunk, never retried)
    assert Index.load(out).paths == [p for p in paths[:3] if not p.endswith("broken.jpg")]
    stats = build_index(out, paths[:8], preprocess=preprocess, **kw)
    assert stats.already == 3 and stats.added + stats.failed == 5
    # Incremental: only the two new files are embedded.
    stats = build_index(out, paths, preprocess=preprocess, **kw)
    assert (stats.already, stats.added + stats.failed) == (8, 2)
    ref, got = Index.load(str(tmp_path / "full")), Index.load(out)
    assert sorted(got.paths) == sorted(ref.paths)
    order = [got.paths.index(p) for p in ref.paths]
    np.testing.assert_allclose(got.embeddings[order], ref.embeddings, atol=1e-6)
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert list(meta["failed"]) == [str(setup / "imgs" / "broken.jpg")]


def test_cli_index_query_html_and_errors(setup, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert (
        search_main(
            [
                "index",
                "--model",
                str(setup / "model"),
                "--images",
                str(setup / "imgs" / "**" / "*.png"),
                "--out",
                idx,
                "--float16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "9 images indexed" in capsys.readouterr().out
    html = tmp_path / "r.html"
    assert (
        search_main(
            [
                "query",
                "--index",
                idx,
                "--model",
                str(setup / "model"),
                "a red square",
                "-k",
                "3",
                "--html",
                str(html),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    ranked = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
    assert len(ranked) == 3 and [r[0] for r in ranked] == ["1", "2", "3"]
    scores = [float(r[1]) for r in ranked]
    assert scores == sorted(scores, reverse=True)
    # Scores are the cosine similarities of the model's text embedding with the stored images.
    model, params, _ = load(str(setup / "model"))
    from clipjax.data.tokenizer import tokenize

    q = model.apply(params, tokenize(["a red square"], 16), method="encode_text")
    index = Index.load(idx)
    expect = np.sort(index.embeddings @ np.asarray(q)[0])[::-1][:3]
    np.testing.assert_allclose(scores, expect, atol=2e-4)
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "a red square" in page
    # An indexed image as query needs no model and finds itself first with score 1.
    target = index.paths[4]
    assert search_main(["query", "--index", idx, "--image", target, "-k", "1"]) == 0
    top = capsys.readouterr().out.splitlines()[-1].split()
    assert top[2] == target and abs(float(top[1]) - 1.0) < 1e-3
    # Errors: a different model, a missing index, a missing query image.
    assert search_main(["query", "--index", idx, "--model", str(setup / "other_model"), "cat"]) == 1
    assert "different model" in capsys.readouterr().err
    assert search_main(["query", "--index", str(tmp_path / "none"), "cat"]) == 1
    assert "clipjax image index" in capsys.readouterr().err
    assert search_main(["query", "--index", idx, "--image", str(tmp_path / "no.png")]) == 1
    assert "no.png: no such file" in capsys.readouterr().err
    assert (
        search_main(
            [
                "index",
                "--model",
                str(setup / "model"),
                "--images",
                str(tmp_path / "*.jpg"),
                "--out",
                str(tmp_path / "i2"),
            ]
        )
        == 1
    )
    assert "matches no files" in capsys.readouterr().err


def test_query_does_not_open_the_model_an_index_names_unasked(setup, tmp_path, capsys, monkeypatch):
    """An index can come from anyone and name any path: a text query needs --model (or
    --trust-torchscript), and without either nothing is loaded."""
    import clipjax.export.load as load_module

    idx = str(tmp_path / "idx")
    paths = list_images(str(setup / "imgs" / "**" / "*.png"))[:2]
    model, params, preprocess = load(str(setup / "model"))
    build_index(
        idx,
        paths,
        model=model,
        params=params,
        preprocess=preprocess,
        fingerprint=model_fingerprint(model.config, params),
        model_path=str(setup / "model"),
        progress=False,
    )
    loaded = []
    real_load = load_module.load
    monkeypatch.setattr(load_module, "load", lambda p, **kw: loaded.append(p) or real_load(p, **kw))
    assert search_main(["query", "--index", idx, "a red square"]) == 1
    err = capsys.readouterr().err
    assert "pass --model PATH" in err and str(setup / "model") in err and loaded == []
    # An indexed image as the query needs no model at all.
    assert search_main(["query", "--index", idx, "--image", paths[0], "-k", "1"]) == 0
    assert loaded == []
    capsys.readouterr()
    assert search_main(["query", "--index", idx, "--trust-torchscript", "a red square"]) == 0
    assert loaded == [str(setup / "model")]
    assert search_main(["query", "--index", idx, "--model", str(setup / "model"), "x"]) == 0
    assert loaded == [str(setup / "model")] * 2


# ------------------------------------------------------------------ odd names, locking, old format
ODD_NAMES = [b"cr\rname.png", b"nl\nname.png", b"latin1-\xe9\xff.png", b"javascript:alert(1).png"]


def test_index_stores_any_file_name_losslessly(setup, tmp_path, capsys):
    """Names with '\\r', '\\n' or bytes that are not UTF-8 are indexed and load back identical
    (today: '\\r' corrupts the paths file, a non-UTF-8 name aborts after an orphan chunk)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for i, name in enumerate(ODD_NAMES + [b"plain.png"]):
        arr = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(os.fsencode(imgs), name), format="PNG")
    paths = list_images(str(imgs))
    assert len(paths) == 5
    model, params, preprocess = load(str(setup / "model"))
    fp = model_fingerprint(model.config, params)
    out = str(tmp_path / "idx")
    kw = dict(model=model, params=params, fingerprint=fp, chunk_size=2, progress=False)
    stats = build_index(out, paths, preprocess=preprocess, **kw)
    assert (stats.added, stats.failed) == (5, 0)
    index = Index.load(out)
    assert sorted(index.paths) == paths  # same str, so os.fsencode gives the same bytes
    assert {os.path.basename(os.fsencode(p)) for p in index.paths} == set(ODD_NAMES) | {
        b"plain.png"
    }
    assert build_index(out, paths, preprocess=preprocess, **kw).already == 5  # nothing redone
    # The query CLI prints every name on one line and finds an odd-named image by itself.
    target = next(p for p in index.paths if "\n" in p)
    assert search_main(["query", "--index", out, "--image", target, "-k", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.split()[2].endswith("nl\\nname.png") and abs(float(last.split()[1]) - 1) < 1e-3


def test_reads_version_1_indexes_and_removes_orphan_chunks(tmp_path):
    """An index written by the previous format (one path per line) still loads and grows; chunk
    files of a killed run that meta.json does not list are removed by the next writer."""
    out = tmp_path / "old"
    out.mkdir()
    emb = unit(np.random.default_rng(0).standard_normal((2, 4))).astype(np.float32)
    np.save(out / "chunk-00000.npy", emb)
    (out / "chunk-00000.paths").write_bytes(b"/x/a b.png\n/x/c\rd.png\n")
    meta = {
        "format": "clipjax-image-index",
        "version": 1,
        "dim": 4,
        "dtype": "float32",
        "model_fingerprint": "fp",
        "model_path": "",
        "image_size": 0,
        "count": 2,
        "chunks": [{"name": "chunk-00000", "count": 2}],
        "failed": {},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    assert Index.load(str(out)).paths == ["/x/a b.png", "/x/c\rd.png"]
    (out / "chunk-00001.npy").write_bytes(b"half a chunk")  # a killed run's leftover
    with IndexWriter(str(out), dim=4, dtype="float32", model_fingerprint="fp") as w:
        assert not (out / "chunk-00001.npy").exists()
        w.add_chunk(["/x/new\n.png"], emb[:1])
    index = Index.load(str(out))
    assert index.paths == ["/x/a b.png", "/x/c\rd.png", "/x/new\n.png"]
    np.testing.assert_array_equal(index.embeddings, np.concatenate([emb, emb[:1]]))
    meta["version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99 is not supported.*rebuild"):
        Index.load(str(out))


def test_two_writers_cannot_share_an_index(setup, tmp_path, capsys):
    from clipjax.search.index import IndexBusyError

    out = str(tmp_path / "idx")
    w = IndexWriter(out, dim=16, dtype="float32", model_fingerprint="fp")
    with pytest.raises(IndexBusyError, match="another index run holds .*\\.lock"):
        IndexWriter(out, dim=16, dtype="float32", model_fingerprint="fp")
    argv = ["index", "--model", str(setup / "model"), "--images", str(setup / "imgs")]
    assert search_main(argv + ["--out", out, "--no-progress"]) == 1
    assert "another index run holds" in capsys.readouterr().err
    w.close()
    with IndexWriter(out, dim=16, dtype="float32", model_fingerprint="fp"):
        pass  # free again once the first writer is closed


def test_html_page_quotes_links_and_escapes_names(tmp_path):
    from clipjax.search.html import results_page

    names = ["javascript:alert(1).jpg", "a#b.jpg", "<b>x?.jpg", "d\udcffe.jpg"]
    page = results_page(
        "q <i>", [(0.5, str(tmp_path / n)) for n in names], str(tmp_path / "r.html")
    )
    hrefs = [h.split('"')[0] for h in page.split('href="')[1:]]
    assert hrefs == ["javascript%3Aalert%281%29.jpg", "a%23b.jpg", "%3Cb%3Ex%3F.jpg", "d%FFe.jpg"]
    assert "<b>x" not in page and "&lt;b&gt;x?.jpg" in page and "q &lt;i&gt;" in page
    assert "d\\xffe.jpg" in page  # an undecodable byte is shown, not a crash


def test_damaged_paths_file_names_the_line(tmp_path):
    out = str(tmp_path / "idx")
    with IndexWriter(out, dim=2, dtype="float32", model_fingerprint="fp") as w:
        w.add_chunk(["/a", "/b", "/c"], np.eye(3, 2, dtype=np.float32))
    assert Index.load(out).paths == ["/a", "/b", "/c"]
    jsonl = tmp_path / "idx" / "chunk-00000.jsonl"
    jsonl.write_bytes(b'"/a"\n"/b", "/x"\n"/c"\n')  # three lines, one of them not a path
    with pytest.raises(ValueError, match="chunk-00000.jsonl:2: not a JSON string"):
        Index.load(out)
