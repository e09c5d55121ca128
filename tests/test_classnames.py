"""Class names given with --classnames are matched to the dataset's own by name, never paired
with labels silently by position."""

import json

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from clipjax.evaluate.__main__ import main as evaluate_main
from clipjax.evaluate.classnames import align_classnames
from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIPConfig, abstract_variables

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
FOLDERS = ("cat", "dog", "sea_fish")  # labels 0, 1, 2; the dataset names them cat, dog, sea fish


def test_align_permutation_reordered_with_note():
    names, notes = align_classnames(["Sea fish", "cat", "dog"], ["cat", "dog", "sea fish"])
    assert names == ["cat", "dog", "Sea fish"]
    assert len(notes) == 1 and "re-ordered" in notes[0]


def test_align_same_names_or_no_dataset_names_unchanged():
    assert align_classnames(["cat", "dog"], ["cat", "dog"]) == (["cat", "dog"], [])
    assert align_classnames(["CAT", "dog"], ["cat", "dog"]) == (["CAT", "dog"], [])
    assert align_classnames(["x", "y"], None) == (["x", "y"], [])


def test_align_disjoint_names_of_right_length_are_display_names_with_mapping():
    names, notes = align_classnames(["tabby", "puppy"], ["cat", "dog"])
    assert names == ["tabby", "puppy"]
    assert "label 0: 'cat' -> 'tabby'" in "\n".join(notes)
    assert "label 1: 'dog' -> 'puppy'" in "\n".join(notes)


@pytest.mark.parametrize(
    "given, fragments",
    [
        (["cat", "dog"], ["2 names", "3 classes", "missing: 'fish'"]),
        (["cat", "dog", "zebra"], ["missing: 'fish'", "extra: 'zebra'"]),
        (["cat", "dog", "fish", "zebra"], ["extra: 'zebra'"]),
        (["a", "b"], ["missing: 'cat', 'dog', 'fish'", "extra: 'a', 'b'"]),
        (["cat", "Cat", "dog"], ["more than once", "'Cat'"]),
    ],
)
def test_align_other_mismatches_are_errors_naming_names(given, fragments):
    with pytest.raises(ValueError) as err:
        align_classnames(given, ["cat", "dog", "fish"])
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classnames")
    rng = np.random.default_rng(0)
    shapes = flax.core.meta.unbox(abstract_variables(TINY))["params"]
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_model_dir(str(root / "model"), TINY, params)
    for cls in FOLDERS:
        (root / "data" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / cls / f"{i}.png")
    return root


def _zeroshot(root, out, *extra):
    argv = ["--model", str(root / "model"), "--task", "zeroshot", "--data", str(root / "data")]
    argv += ["--templates", "photo", "--batch-size", "4", "--out", str(out), *extra]
    return evaluate_main(argv)


def test_cli_permuted_classnames_score_as_the_folders_own(folders, capsys):
    assert _zeroshot(folders, folders / "own.json") == 0
    own = json.loads((folders / "own.json").read_text())["metrics"]
    capsys.readouterr()
    assert _zeroshot(folders, folders / "perm.json", "--classnames", "sea fish,dog,cat") == 0
    printed = capsys.readouterr().out
    assert "re-ordered to the dataset's label order" in printed
    assert json.loads((folders / "perm.json").read_text())["metrics"] == own


def test_cli_display_names_print_the_mapping(folders, capsys):
    assert _zeroshot(folders, folders / "disp.json", "--classnames", "kitten,puppy,trout") == 0
    printed = capsys.readouterr().out
    for line in ("label 0: 'cat' -> 'kitten'", "label 2: 'sea fish' -> 'trout'"):
        assert line in printed


@pytest.mark.parametrize(
    "names, fragments",
    [("cat,dog", ["missing: 'sea fish'"]), ("cat,dog,cow", ["missing: 'sea fish'", "'cow'"])],
)
def test_cli_mismatched_classnames_are_a_clear_error(folders, capsys, names, fragments):
    assert _zeroshot(folders, folders / "bad.json", "--classnames", names) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --classnames") and all(f in err for f in fragments)
    assert not (folders / "bad.json").exists()


def test_trainer_zeroshot_names_are_matched_to_the_eval_shards(tmp_path, caplog):
    """config.eval.zeroshot.classnames is aligned with the eval shards' manifest before any
    compiling: a permutation is re-ordered (label i keeps its class), a mismatch stops the run."""
    from clipjax.data.demo import DEMO_CLASSNAMES
    from clipjax.demo import get_config, make_demo_data
    from clipjax.evaluate.classnames import classnames_for_shards
    from clipjax.train.config import ConfigError, validate

    make_demo_data(str(tmp_path), "quick")
    c = get_config(f"quick,data={tmp_path}")
    c.eval.zeroshot.classnames = ",".join(reversed(DEMO_CLASSNAMES))
    with caplog.at_level("INFO"):
        validate(c, num_devices=8)
    assert "re-ordered" in caplog.text
    names, _ = classnames_for_shards(c.eval.zeroshot.classnames, c.eval.zeroshot.shards, "x")
    assert names == list(DEMO_CLASSNAMES)
    c.eval.zeroshot.classnames = ",".join(DEMO_CLASSNAMES[:-1] + ("a purple cloud",))
    with pytest.raises(ConfigError, match="eval.zeroshot.classnames"):
        validate(c, num_devices=8)
