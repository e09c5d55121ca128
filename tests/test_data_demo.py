"""Demo shapes dataset: deterministic, captions/labels/pixels agree, read back by the pipeline."""

import json
import os

import numpy as np
import pytest

from clipjax.data import demo
from clipjax.data.eval_pipeline import EvalPipeline
from clipjax.data.shards import dataset_classnames
from clipjax.data.train_pipeline import TrainPipeline


def test_render_agrees_with_caption_and_label():
    for i in range(40):
        pixels, caption, label = demo.render_example(np.random.default_rng(i), 32)
        color, shape = demo.DEMO_CLASSNAMES[label].split()
        assert color in caption and shape in caption
        # the most saturated pixel is (close to) the class colour
        flat = pixels.reshape(-1, 3).astype(int)
        most = flat[np.argmax(flat.max(1) - flat.min(1))]
        dists = {c: np.abs(most - np.array(rgb)).sum() for c, rgb in demo.COLORS.items()}
        assert min(dists, key=dists.get) == color, (i, caption, most)


def test_make_demo_dataset(tmp_path):
    ds = demo.make_demo_dataset(
        str(tmp_path / "a"), n_train=30, n_test=12, image_size=32, seed=1, shard_size=16
    )
    assert len(ds.classnames) == 12 and all("{}" in t for t in ds.templates)
    m = json.load(open(tmp_path / "a" / "train" / "manifest.json"))
    assert m["num_examples"] == 30 and [s["count"] for s in m["shards"]] == [16, 14]
    assert m["classnames"] == list(demo.DEMO_CLASSNAMES) == dataset_classnames(ds.test)
    again = demo.make_demo_dataset(
        str(tmp_path / "b"), n_train=30, n_test=12, image_size=32, seed=1, shard_size=16
    )
    for split in ("train", "test"):
        for name in sorted(os.listdir(tmp_path / "a" / split)):
            if name.endswith(".tfrecord"):
                assert (tmp_path / "a" / split / name).read_bytes() == (
                    tmp_path / "b" / split / name
                ).read_bytes()
    batches = list(
        EvalPipeline(
            again.test,
            global_batch=8,
            image_size=32,
            context_length=32,
            process_index=0,
            process_count=1,
        )
    )
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    captions = np.concatenate([b["caption"][b["mask"]] for b in batches])
    assert len(labels) == 12
    for lab, cap in zip(labels, captions):
        color, shape = demo.DEMO_CLASSNAMES[lab].split()
        assert color in cap and shape in cap
    assert all(k.startswith("test/") for b in batches for k in b["key"][b["mask"]])
    test_imgs = [b["image"][b["mask"]] for b in batches]
    assert np.concatenate(test_imgs).std() > 0.1
    batch, state = next(
        iter(
            TrainPipeline(
                again.train,
                global_batch=8,
                image_size=16,
                context_length=32,
                process_index=0,
                process_count=1,
            )
        )
    )
    assert batch["image"].shape == (8, 16, 16, 3) and state["offset"] == 8
    with pytest.raises(ValueError, match="30 records per epoch.*fewer than its batch of 64"):
        TrainPipeline(again.train, global_batch=64, image_size=16, process_index=0, process_count=1)
