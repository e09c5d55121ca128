"""Search as a service: shard sources, the approximate index, the HTTP API and its safety rules,
and the page in a real browser (Debian's chromium + chromium-driver, driven by selenium)."""

import base64
import io
import os
import re
import shutil

import numpy as np
import pytest
import requests
from PIL import Image
from test_search import TINY, random_params, unit

from clipjax.data import schema
from clipjax.data.demo import DEMO_CLASSNAMES, make_demo_dataset
from clipjax.export.modeldir import save_model_dir
from clipjax.search.__main__ import main as search_main
from clipjax.search.ann import AnnIndex, build_ann, choose_factory, extend_ann
from clipjax.search.index import Index, exact_topk
from clipjax.search.server import check_host, serving_in_thread
from clipjax.search.service import SearchService
from clipjax.search.sources import example_bytes_features, tfrecord_offsets

HOSTILE = '<img src=x onerror="document.title=1">&amp;.png'


# ------------------------------------------------------------------ sources
def test_tfrecord_reader_matches_the_schema(tmp_path):
    """The pure-Python TFRecord reader gives the records TF wrote, at offsets it can seek to."""
    import tensorflow as tf

    path = str(tmp_path / "a.tfrecord")
    records = [
        schema.make_example(b"\xff\xd8jpeg%d" % i, f"caption {i} \u00e9", f"k{i}", label=i)
        for i in range(3)
    ]
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    got = list(tfrecord_offsets(path))
    assert [data for _, data in got] == records
    feats = example_bytes_features(got[2][1])
    assert feats == {"jpg": b"\xff\xd8jpeg2", "txt": "caption 2 \u00e9".encode(), "key": b"k2"}
    (tmp_path / "bad.tfrecord").write_bytes(open(path, "rb").read()[:-7])
    with pytest.raises(ValueError, match="truncated record"):
        list(tfrecord_offsets(str(tmp_path / "bad.tfrecord")))


# ------------------------------------------------------------------ approximate index
def clustered(n, dim, seed, centres=50):
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return unit(x).astype(np.float32)


def test_ann_recall_mmap_extend_and_choice(tmp_path):
    x, queries = np.split(clustered(6100, 32, 0), [6000])  # queries: same clusters, not indexed
    d = str(tmp_path)
    meta = build_ann(d, x[:5000], target_recall=0.95, recall_queries=200, train_size=2000)
    assert meta.factory.endswith(",Flat") and meta.count == 5000
    assert meta.recall_at_10 >= 0.95 and meta.trained_on == 2000
    ann = AnnIndex.load(d)  # memory-mapped, read-only
    _, truth = exact_topk(x[:5000], queries, 10)
    _, found = ann.search(x[:5000], queries, 10)
    hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert hits >= 0.9  # held-out queries (not rows of the index)
    # Rows added to the index but not yet to the approximate one are searched exactly.
    _, tail = ann.search(x, x[5500:5501], 1)
    assert tail[0, 0] == 5500
    trained_on = meta.trained_on
    meta = extend_ann(d, x)  # no retraining: the same lists, 1000 more vectors
    assert meta.count == 6000 and meta.trained_on == trained_on
    ann = AnnIndex.load(d)
    assert ann.index.ntotal == 6000 and ann.search(x, x[5900:5901], 1)[1][0, 0] == 5900
    # PQ (when float32 codes exceed the budget), re-ranked exactly.
    assert choose_factory(1_000_000, 512) == "IVF1024,Flat"
    assert choose_factory(1_000_000, 512, memory_budget=200 << 20) == "IVF1024,PQ128"
    with pytest.raises(ValueError, match="memory budget"):
        choose_factory(10**9, 512, memory_budget=1 << 20)
    meta = build_ann(str(tmp_path / "pq"), x, factory="IVF16,PQ4x4", recall_queries=100)
    assert meta.rerank
    scores, ids = AnnIndex.load(str(tmp_path / "pq")).search(x, x[:3], 5)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[ids], x[:3]), atol=1e-5)


def test_ann_cli_and_a_collection_searches_through_it(tmp_path, capsys):
    from clipjax.search.index import IndexWriter
    from clipjax.search.service import Collection

    x, queries = np.split(clustered(1300, 16, 2), [1200])
    d = str(tmp_path / "idx")
    with IndexWriter(d, dim=16, dtype="float32", model_fingerprint="fp") as w:
        w.add_chunk([f"/img/{i}.jpg" for i in range(1200)], x)
    assert search_main(["ann", "--index", d, "--memory-budget", "x"]) == 1
    assert "--memory-budget 'x'" in capsys.readouterr().err
    assert search_main(["ann", "--index", d, "--memory-budget", "64M"]) == 0
    assert "recall@10" in capsys.readouterr().out
    c = Collection("idx", d, Index.load(d), AnnIndex.load(d))
    assert c.describe()["search"].startswith("IVF") and c.describe()["recall_at_10"] >= 0.95
    _, truth = exact_topk(x, queries, 10)
    found = np.stack([c.search(q, 10)[1] for q in queries])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]) >= 0.9


# ------------------------------------------------------------------ the service over HTTP
def odd_files(root):
    """A folder of two images, one with a file name that is HTML markup."""
    (root / "files").mkdir()
    rng = np.random.default_rng(0)
    for name in (HOSTILE, "plain.png"):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            root / "files" / name, format="PNG"
        )
    return str(root / "files")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A random tiny model; one index of demo TFRecord shards, one of files with odd names."""
    root = tmp_path_factory.mktemp("serve")
    save_model_dir(str(root / "model"), TINY, random_params(TINY, 0))
    make_demo_dataset(str(root / "data"), n_train=1, n_test=40, image_size=32, shard_size=25)
    model = str(root / "model")
    argv = ["index", "--model", model, "--no-progress", "--out"]
    shards = str(root / "data" / "test" / "*.tfrecord")
    assert search_main(argv + [str(root / "shapes"), "--tfrecord", shards]) == 0
    assert search_main(argv + [str(root / "odd"), "--images", odd_files(root)]) == 0
    service = SearchService(
        [str(root / "shapes"), str(root / "odd")], model, max_upload_bytes=200_000
    )
    with serving_in_thread(service) as url:
        yield url, root, service


def test_api_text_image_embedding_and_similar(api):
    url, root, service = api
    index = Index.load(str(root / "shapes"))
    assert [i["name"] for i in requests.get(url + "/api/indexes").json()] == ["shapes", "odd"]
    assert requests.get(url + "/health").json()["status"] == "ok"
    r = requests.get(url + "/api/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200
    body = r.json()
    # The same ranking and scores as exact search with the model's own text embedding.
    from clipjax.data.tokenizer import tokenize
    from clipjax.export.load import load

    model, params, _ = load(str(root / "model"))
    q = np.asarray(model.apply(params, tokenize(["a red circle"], 16), method="encode_text"))[0]
    scores, ids = exact_topk(index.embeddings, unit(q), 5)
    assert [x["id"] for x in body["results"]] == ids.tolist()
    np.testing.assert_allclose([x["score"] for x in body["results"]], scores, atol=1e-4)
    first = body["results"][0]
    entry = index.entry(first["id"])
    assert first["caption"] == entry["caption"] and first["key"] == entry["key"].strip()
    assert first["key"].startswith("test/")
    # Paging: offset 2 continues the same list.
    page2 = requests.post(url + "/api/search", json={"text": "a red circle", "k": 3, "offset": 2})
    assert [x["id"] for x in page2.json()["results"]] == ids[2:5].tolist()
    # The original image comes back byte-identical to the record's; an image query finds it.
    original = requests.get(url + first["file"])
    assert original.headers["content-type"] == "image/jpeg"
    assert original.content.startswith(b"\xff\xd8")
    for req in (
        dict(json={"image": base64.b64encode(original.content).decode(), "k": 1}),
        dict(files={"image": ("q.jpg", original.content)}, data={"k": "1"}),
    ):
        hit = requests.post(url + "/api/search", **req).json()["results"][0]
        assert hit["id"] == first["id"] and hit["score"] > 0.999
    emb = index.embeddings[7].tolist()
    assert (
        requests.post(url + "/api/search", json={"embedding": emb}).json()["results"][0]["id"] == 7
    )
    sim = requests.get(url + "/api/similar/shapes/7", params={"k": 3}).json()["results"]
    assert sim[0]["id"] == 7 and len(sim) == 3
    thumb = requests.get(url + "/api/thumb/shapes/7")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    # Near-duplicate hiding: no two results above the threshold.
    dd = requests.get(url + "/api/similar/shapes/7", params={"k": 10, "dedup": 0.9}).json()
    got = index.embeddings[[x["id"] for x in dd["results"]]]
    sims = got @ got.T
    assert (sims[np.triu_indices(len(got), 1)] <= 0.9 + 1e-5).all()
    metrics = requests.get(url + "/metrics").text
    for stage in ("encode_text", "encode_image", "search", "thumbnail"):
        count = re.search(rf'clipjax_search_stage_seconds_count{{stage="{stage}"}} (\S+)', metrics)
        assert count and float(count[1]) > 0, stage  # timed by the requests above
    assert requests.get(url + "/").headers["content-security-policy"].startswith("default-src")


def test_api_rejects_bad_requests_with_json_errors(api):
    url, _, service = api
    big = io.BytesIO()
    Image.new("L", (7000, 6000)).save(big, format="PNG")  # 42 Mpixel in a small file
    cases = [
        ("post", "/api/search", dict(data=b"{not json"), 400, "JSON"),
        ("post", "/api/search", dict(json={"text": "a", "id": 1}), 400, "exactly one"),
        ("post", "/api/search", dict(json={"image": "!!"}), 400, "base64"),
        ("post", "/api/search", dict(files={"image": ("x.png", b"GIF89a...")}), 400, "readable"),
        ("post", "/api/search", dict(files={"image": ("x.png", big.getvalue())}), 413, "pixels"),
        ("post", "/api/search", dict(data=b"x" * 400_000), 413, "bytes"),
        ("post", "/api/search", dict(json={"embedding": [1, 2]}), 400, "finite numbers"),
        ("post", "/api/search", dict(json={"url": "http://example.com/a.jpg"}), 400, "one of"),
        ("get", "/api/search?q=", {}, 400, "empty"),
        ("get", "/api/search?q=a&k=0", {}, 400, "k must"),
        ("get", "/api/search?q=a&k=x", {}, 400, "integer"),
        ("get", "/api/search?q=a&index=nope", {}, 404, "no index named"),
        ("get", "/api/similar/shapes/99999", {}, 404, "no entry"),
        ("get", "/api/thumb/shapes/-1", {}, 404, "no entry"),
        ("get", "/api/file/files/..%2F..%2Fetc%2Fpasswd", {}, 404, ""),
        ("get", "/api/file//etc/passwd", {}, 404, ""),
        ("get", "/static/../server.py", {}, 404, ""),
        ("delete", "/api/search", {}, 405, ""),
        ("get", "/nowhere", {}, 404, ""),
    ]
    for method, path, kw, status, words in cases:
        r = getattr(requests, method)(url + path, **kw)
        assert r.status_code == status, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"] == "application/json", path
        assert words in r.json()["error"] and "Traceback" not in r.text, (path, r.text)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    check_host("127.0.0.1", allow_remote=False)


def test_serve_cli_refuses_another_host_without_the_flag(api, capsys):
    _, root, _ = api
    argv = ["serve", "--index", str(root / "shapes"), "--model", str(root / "model")]
    assert search_main(argv + ["--host", "0.0.0.0"]) == 1
    assert "--allow-remote" in capsys.readouterr().err


# ------------------------------------------------------------------ the page in a browser
def _browser_or_skip():
    """A headless chromium driven through chromium-driver, or pytest.skip with the reason."""
    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium")
    if not driver_path or not browser:
        pytest.skip(
            "chromium and chromium-driver are not installed (`make test` installs them with "
            "apt-get where it runs as root; elsewhere: apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (it is in clipjax's test extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,760"):
        opts.add_argument(a)
    opts.add_argument("--disable-dev-shm-usage")
    return webdriver.Chrome(service=Service(driver_path), options=opts)


@pytest.fixture
def driver():
    """The browser, checked before the model is trained (skips without chromium)."""
    d = _browser_or_skip()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP trained for a minute on the demo shapes, and an index of held-out shapes."""
    from clipjax.demo import get_config
    from clipjax.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    make_demo_dataset(str(root / "data"), n_train=2000, n_test=96, image_size=32, shard_size=1000)
    c = get_config(f"quick,data={root / 'data'}")
    c.model.overrides.update(
        dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, embed_dim=32)
    )
    c.num_steps, c.batch_size, c.log_every = 250, 64, 100
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 20
    c.checkpoint.every_steps, c.data.shuffle_buffer = 10_000, 1000
    c.eval.zeroshot.shards = c.eval.retrieval.shards = ""
    c.export.dir = str(root / "model")
    assert train(c, str(root / "work")).status == "completed"
    shards = str(root / "data" / "test" / "*.tfrecord")
    argv = ["index", "--model", c.export.dir, "--no-progress", "--tfrecord", shards]
    assert search_main(argv + ["--out", str(root / "shapes")]) == 0
    argv = ["index", "--model", c.export.dir, "--no-progress", "--images", odd_files(root)]
    assert search_main(argv + ["--out", str(root / "odd")]) == 0
    return root


def test_page_in_a_real_browser(driver, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = trained
    service = SearchService([str(root / "shapes"), str(root / "odd")], str(root / "model"))
    index = Index.load(str(root / "shapes"))
    shapes = service.collection("shapes")
    # The class queries whose best match (exact search, in Python) is of that class: a minute of
    # training learns colour well and shape partly, so at least a third of the 12 classes
    # (chance: one in 12); the page must show the same first result for the first of them.
    right = []
    for name in DEMO_CLASSNAMES:
        query = f"a photo of a {name}."
        _, ids = shapes.search(service.encode_text(query), 1)
        color, shape = name.split()
        caption = index.entry(int(ids[0]))["caption"]
        if color in caption and shape in caption:
            right.append((query, caption))
    assert len(right) >= 4, right
    with serving_in_thread(service) as url:
        wait = WebDriverWait(driver, 30)

        def cards():
            return driver.find_elements(By.CSS_SELECTOR, "#results .card")

        def settled(n=1):
            wait.until(lambda d: len(cards()) >= n and "searching" not in _status(d))
            return cards()

        driver.get(url + "/")
        box = driver.find_element(By.ID, "q")
        query, expected = right[0]
        box.send_keys(query + "\n")
        first = settled()[0]
        assert first.find_element(By.CSS_SELECTOR, ".caption").text == expected
        assert "q=" + query.replace(" ", "+") in driver.current_url  # shareable
        driver.save_screenshot(str(tmp_path / "page.png"))
        shot = os.environ.get("CLIPJAX_SEARCH_SCREENSHOT")
        if shot:  # the README's screenshot (docs/search.png)
            shutil.copy(tmp_path / "page.png", shot)
        # "more like this" on the third result: it comes first (itself), then its kind.
        third = cards()[2]
        target = third.find_element(By.CSS_SELECTOR, ".caption").text
        third.find_element(By.CSS_SELECTOR, "button.more-like").click()
        wait.until(lambda d: "similar=" in d.current_url)
        top = settled()[0].find_element(By.CSS_SELECTOR, ".caption").text
        assert top == target
        # Upload an image: one of the indexed ones finds itself first.
        row = 11
        upload = tmp_path / "query.jpg"
        upload.write_bytes(service.original(service.collection("shapes"), row)[0])
        driver.find_element(By.ID, "upload").send_keys(str(upload))
        wait.until(lambda d: "similar=" not in d.current_url)
        top = settled()[0].find_element(By.CSS_SELECTOR, ".caption").text
        assert top == index.entry(row)["caption"]
        # A hostile file name is shown as text, not markup.
        driver.find_element(By.ID, "index").send_keys("odd")
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("anything\n")
        wait.until(lambda d: "index=odd" in d.current_url)
        names = [c.find_element(By.CSS_SELECTOR, ".name").text for c in settled(2)]
        assert HOSTILE in names, names
        assert driver.title == "clipjax search"  # the onerror handler never ran
        assert not driver.find_elements(By.CSS_SELECTOR, "#results img[src='x']")
        logs = driver.execute_script("return document.querySelectorAll('.error').length")
        assert logs == 0


def _status(driver):
    return driver.execute_script("return document.getElementById('status').textContent")


def test_demo_prints_the_serve_command():
    """The printed command is two valid `clipjax.search` invocations on the demo's outputs."""
    import shlex

    from clipjax.demo import serve_command
    from clipjax.search.__main__ import build_parser

    index_cmd, serve_cmd = serve_command("my out").split(" && ")
    words = shlex.split(index_cmd)
    assert words[:4] == ["python", "-m", "clipjax.search", "index"]
    args = build_parser().parse_args(words[3:])
    assert args.tfrecord == "my out/data/test/*.tfrecord" and args.model == "my out/model"
    words = shlex.split(serve_cmd)
    args = build_parser().parse_args(words[3:])
    assert args.command == "serve" and args.index == ["my out/search-index"]
    assert "--host" not in words and args.host == "127.0.0.1"  # the default: local only


def test_index_from_webdataset_tars_keeps_caption_and_key(api, tmp_path):
    import tarfile

    from clipjax.search.sources import entry_image

    _, root, _ = api
    images = {}
    tar_path = tmp_path / "shard-0000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), (80 * i, 40, 200)).save(buf, format="PNG")
            for name, data in (
                (f"s/{i:04d}.png", buf.getvalue()),
                (f"s/{i:04d}.txt", b"cap %d" % i),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            images[f"s/{i:04d}"] = buf.getvalue()
    out = str(tmp_path / "wds-index")
    argv = ["index", "--model", str(root / "model"), "--no-progress", "--out", out]
    assert search_main(argv + ["--webdataset", str(tar_path)]) == 0
    index = Index.load(out)
    entries = [index.entry(i) for i in range(len(index))]
    assert [(e["key"], e["caption"]) for e in entries] == [
        (f"s/{i:04d}", f"cap {i}") for i in range(3)
    ]
    assert all(entry_image(e) == images[e["key"]] for e in entries)
    assert search_main(argv + ["--webdataset", str(tar_path)]) == 0  # nothing new to add
    assert len(Index.load(out)) == 3
    gz = tmp_path / "c.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(tar_path, arcname="x.tar")
    assert search_main(argv[:-1] + [str(tmp_path / "w2"), "--webdataset", str(gz)]) == 1


def test_query_html_of_shard_records_shows_their_thumbnails(api, tmp_path, capsys):
    _, root, _ = api
    out = tmp_path / "r.html"
    argv = ["query", "--index", str(root / "shapes"), "--model", str(root / "model"), "a circle"]
    assert search_main(argv + ["-k", "3", "--html", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "test/0000" in page
    assert "<a href" not in page  # a record is not a file to link to
