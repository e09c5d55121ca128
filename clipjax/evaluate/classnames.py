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
