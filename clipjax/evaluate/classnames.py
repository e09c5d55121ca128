"""Class-name lists and prompt templates: packaged ones by name, or your own text files."""

from __future__ import annotations

import os

import importlib_resources

_ASSETS = "clipjax.evaluate"

CLASSNAME_SETS = {"imagenet": "imagenet_classnames.txt"}
TEMPLATE_SETS = {
    "openai": "openai_imagenet_templates.txt",  # the 80 ImageNet prompts of the CLIP paper
    "simple": "simple_imagenet_templates.txt",  # its 7-prompt subset
    "photo": None,  # the single prompt "a photo of a {}."
}


def _asset_lines(name: str) -> list[str]:
    text = (importlib_resources.files(_ASSETS) / "assets" / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _file_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected {what}, one per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty (expected {what}, one per line)")
    return lines


def load_classnames(spec: str) -> list[str]:
    """'imagenet' (the 1000 ImageNet classes), 'demo' (the demo dataset), a text file with one
    name per line, or comma-separated names ("cat,dog")."""
    if spec in CLASSNAME_SETS:
        return _asset_lines(CLASSNAME_SETS[spec])
    if spec in CLASSNAME_SETS.values() and not os.path.exists(spec):  # a packaged file by name
        return _asset_lines(spec)
    if spec == "demo":
        from clipjax.data.demo import DEMO_CLASSNAMES

        return list(DEMO_CLASSNAMES)
    if os.path.exists(spec) or os.sep in spec or spec.endswith(".txt"):
        return _file_lines(spec, "class names")
    if "," in spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if len(names) >= 2:
            return names
    raise ValueError(
        f"class names {spec!r}: expected one of {sorted(CLASSNAME_SETS) + ['demo']}, "
        f"a text file with one class name per line, or comma-separated names"
    )


def load_templates(spec: str) -> list[str]:
    """'openai' (80 prompts), 'simple' (7), 'photo' (1), 'demo' (the demo dataset's), or a text
    file of templates containing '{}'."""
    if spec in TEMPLATE_SETS:
        asset = TEMPLATE_SETS[spec]
        return ["a photo of a {}."] if asset is None else _asset_lines(asset)
    if spec in TEMPLATE_SETS.values() and not os.path.exists(spec):  # a packaged file by name
        return _asset_lines(spec)
    if spec == "demo":
        from clipjax.data.demo import DEMO_TEMPLATES

        return list(DEMO_TEMPLATES)
    if os.path.exists(spec) or os.sep in spec or spec.endswith(".txt"):
        templates = _file_lines(spec, "prompt templates containing '{}'")
        missing = [t for t in templates if "{}" not in t]
        if missing:
            raise ValueError(f"{spec}: template {missing[0]!r} has no '{{}}' for the class name")
        return templates
    raise ValueError(
        f"templates {spec!r}: expected one of {sorted(TEMPLATE_SETS) + ['demo']} or a text "
        f"file with one template (containing '{{}}') per line"
    )


def _name_key(name: str) -> str:
    """How names are matched: case, '_'/'-' versus spaces and extra spaces do not matter."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def align_classnames(
    given: list[str], dataset: list[str] | None, what: str = "--classnames"
) -> tuple[list[str], list[str]]:
    """`given` class names in the dataset's label order, and notes for the user.

    Without dataset names (`dataset` None) `given` is taken as is. Names are matched to the
    dataset's by `_name_key` (case, underscores): the same set in another order is re-ordered
    (a note says so); a list of the right length that matches none of them is taken as display
    names in label order (the notes give the mapping); any other difference is a ValueError
    naming the missing and extra names. Label i keeps meaning the dataset's class i.
    """
    if dataset is None or list(given) == list(dataset):
        return list(given), []
    keys = [_name_key(n) for n in given]
    dupes = sorted({n for n, k in zip(given, keys) if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"{what}: names given more than once: {_listing(dupes)}")
    by_key = dict(zip(keys, given))
    data_keys = [_name_key(n) for n in dataset]
    missing = [n for n, k in zip(dataset, data_keys) if k not in by_key]
    extra = [n for n, k in zip(given, keys) if k not in set(data_keys)]
    if not missing and not extra and len(given) == len(dataset):
        ordered = [by_key[k] for k in data_keys]
        if [_name_key(n) for n in ordered] == keys:  # same order, other spelling
            return ordered, []
        return ordered, [
            f"{what}: the {len(given)} names match the dataset's classes in another order; "
            "re-ordered to the dataset's label order"
        ]
    if len(given) == len(dataset) and len(extra) == len(given):
        mapping = [f"  label {i}: {d!r} -> {g!r}" for i, (d, g) in enumerate(zip(dataset, given))]
        return list(given), [
            f"{what}: none of the {len(given)} names is a class name of the dataset; taken as "
            "display names in label order:",
            *mapping,
        ]
    raise ValueError(
        f"{what}: {len(given)} names do not match the dataset's {len(dataset)} classes"
        + (f"; missing: {_listing(missing)}" if missing else "")
        + (f"; extra: {_listing(extra)}" if extra else "")
        + ". Give the dataset's class names (any order), or exactly as many names as it has "
        "classes (then taken in label order), or leave out --classnames to use its own"
    )


def classnames_for_shards(spec: str, shards: str, what: str) -> tuple[list[str], list[str]]:
    """The class names of `spec` (as `load_classnames`) in the label order of TFRecord `shards`
    whose manifest names their classes (`align_classnames`), and the notes for the user."""
    from clipjax.data.shards import dataset_classnames

    return align_classnames(load_classnames(spec), dataset_classnames(shards), what)
