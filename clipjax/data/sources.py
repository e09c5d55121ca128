"""Sources of (image, caption[, label]) items for the shard writer.

Each `*_source` function checks its input up front (raising ValueError naming the file and what
was expected) and returns a `Source`: a re-iterable of `SourceItem`s in a fixed order, plus the
count when known, class names when labelled, and a description stored in the manifest.

Items are lazy (the image is read by `item.read()` when its shard is written) except where a
source has to read them in a stream: tfds and compressed webdataset tars set `in_memory`, and the
writer shuffles those with a bounded buffer instead of a global permutation (see `order`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import string
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from clipjax.data import schema
from clipjax.data.webdataset import (
    DEFAULT_MAX_MEMBER_BYTES,
    member_groups,
    read_member,
    split_member,
)
from clipjax.data.webdataset import IMAGE_EXTS as _WDS_IMAGE_EXTS
from clipjax.data.writer import SourceItem
from clipjax.files import expand_globs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class Source:
    items: Callable[[], Iterable[SourceItem]]
    description: dict
    total: int | None = None
    classnames: list[str] | None = None
    in_memory: bool = False  # items hold their image bytes: too many to list all at once
    shuffled_parts: Callable[[int], Iterable[SourceItem]] | None = None  # files in seeded order

    def __iter__(self) -> Iterator[SourceItem]:
        return iter(self.items())


def check_template(template: str) -> str:
    """A caption template with exactly the field '{}' (the class name); ValueError otherwise."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # e.g. a lone '{'
        fields = [f"<{e}>"]
    if fields.count("") < 1 or any(f != "" for f in fields):
        bad = [f for f in fields if f != ""]
        raise ValueError(
            f"caption template {template!r} must contain '{{}}' for the class name and no other "
            f"field{f' (found {{{bad[0]}}})' if bad else ''}; write literal braces as '{{{{' "
            "and '}}'"
        )
    return template


def _file_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return read


def _missing(message: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise OSError(message)

    return read


# (a) an image folder plus a captions file -------------------------------------------------------


def _decode_text_file(path: str) -> str:
    """The file as text; a byte that is not UTF-8 is an error naming the file and line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start : e.start + 1]!r} at offset "
            f"{e.start}); save the captions file as UTF-8"
        ) from None


def _read_caption_rows(path: str) -> list[tuple[Any, Any]]:
    """(image, caption) rows as the file holds them: a JSON caption may be null, a number or a
    list, which the writer skips as a bad caption (counted in the manifest)."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise ValueError(f"captions file {path} does not exist")
    if ext not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(
            f"captions file {path}: unknown extension {ext!r}; expected .jsonl "
            '(one {"image", "caption"} object per line) or .csv/.tsv'
        )
    rows: list[tuple[Any, Any]] = []
    f = io.StringIO(_decode_text_file(path), newline="")
    if ext in (".jsonl", ".json"):
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not a JSON object ({e}); expected one "
                    '{"image": relpath, "caption": text} per line'
                ) from None
            rows.append(
                (
                    obj.get("image") if isinstance(obj, dict) else None,
                    _row_captions(obj, f"{path}:{n}"),
                )
            )
    else:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path}: expected a header row with columns 'image' and "
                f"'caption' (and optionally caption_<name> columns), got {reader.fieldnames}"
            )
        for n, row in enumerate(reader, 2):
            row = {k: v or "" for k, v in row.items() if k is not None}
            rows.append((row["image"], _row_captions(row, f"{path}:{n}")))
    if not rows:
        raise ValueError(f"captions file {path} lists no images")
    return rows


def _row_captions(obj: Any, where: str) -> Any:
    """A captions-file row's caption(s): its 'caption' as the row holds it (the writer skips one
    that is not text), or {field: ...} with 'captions' (a list) as `txt` and every 'caption_<name>'
    as `txt_<name>` (schema's caption fields)."""
    if not isinstance(obj, dict) or "image" not in obj or not {"caption", "captions"} & set(obj):
        raise ValueError(
            f"{where}: expected keys 'image' and 'caption' (one text) or 'captions' (a list), "
            f"got {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}"
        )
    if "caption" in obj and "captions" in obj:
        raise ValueError(f"{where}: give 'caption' or 'captions', not both")
    named = {
        schema.TEXT_PREFIX + k[len("caption_") :]: v
        for k, v in obj.items()
        if k.startswith("caption_") and len(k) > len("caption_") and v not in ("", None)
    }
    if "captions" in obj:
        return {schema.TEXT: obj["captions"], **named}
    return {schema.TEXT: obj["caption"], **named} if named else obj["caption"]


def captions_source(captions: str, images: str) -> Source:
    """Images under `images` listed with captions in a JSONL or CSV file (paths relative to it).

    The key is the relative path, so several captions of one image share a key.
    """
    if not os.path.isdir(images):
        raise ValueError(f"--images {images} is not a directory")
    rows = _read_caption_rows(captions)

    def items() -> Iterator[SourceItem]:
        for n, (rel, caption) in enumerate(rows):
            if not isinstance(rel, str) or not rel:
                origin = f"{captions} row {n + 1}"
                read = _missing(f"image is {rel!r}, expected a relative path")
                yield SourceItem(key=f"row-{n + 1}", origin=origin, caption=caption, read=read)
                continue
            path = os.path.join(images, rel)
            yield SourceItem(key=rel, origin=path, caption=caption, read=_file_reader(path))

    return Source(
        items,
        {
            "kind": "captions",
            "captions": os.path.abspath(captions),
            "images": os.path.abspath(images),
        },
        total=len(rows),
    )


def coco_source(annotations: str, images: str) -> Source:
    """COCO-style caption annotations (`captions_train2017.json`: 'images' with id and
    file_name, 'annotations' with image_id and caption): one item per image with all its
    captions, in the file's image order; the key is the file name."""
    if not os.path.isdir(images):
        raise ValueError(f"--images {images} is not a directory")
    if not os.path.isfile(annotations):
        raise ValueError(f"COCO annotations file {annotations} does not exist")
    try:
        data = json.loads(_decode_text_file(annotations))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        grouped: dict[int, list[Any]] = {i: [] for i in files}
        for n, ann in enumerate(data["annotations"]):
            image_id = int(ann["image_id"])
            if image_id not in grouped:
                raise ValueError(f"annotation {n} names image_id {image_id}, not in 'images'")
            grouped[image_id].append(ann["caption"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{annotations}: not COCO caption annotations ({type(e).__name__}: {e}); expected "
            "{'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
        ) from None
    if not files:
        raise ValueError(f"{annotations} lists no images")

    def items() -> Iterator[SourceItem]:
        for image_id, name in files.items():
            path = os.path.join(images, name)
            caption = {schema.TEXT: grouped[image_id]} if grouped[image_id] else None
            yield SourceItem(key=name, origin=path, caption=caption, read=_file_reader(path))

    return Source(
        items,
        {
            "kind": "coco",
            "annotations": os.path.abspath(annotations),
            "images": os.path.abspath(images),
        },
        total=len(files),
    )


# (b) an image folder laid out by class ----------------------------------------------------------


def class_folder_source(root: str, template: str = "a photo of a {}.") -> Source:
    """`root/<class>/<image>`: label = sorted class index, caption = template.format(class name)
    (underscores in folder names become spaces)."""
    check_template(template)
    if not os.path.isdir(root):
        raise ValueError(f"--class-folders {root} is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"--class-folders {root} has no sub-directories (expected one per class)")
    files = [
        (label, cls, name)
        for label, cls in enumerate(classes)
        for name in sorted(os.listdir(os.path.join(root, cls)))
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not files:
        raise ValueError(
            f"--class-folders {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
            "in its class sub-directories"
        )
    classnames = [c.replace("_", " ") for c in classes]

    def items() -> Iterator[SourceItem]:
        for label, cls, name in files:
            path = os.path.join(root, cls, name)
            yield SourceItem(
                key=f"{cls}/{name}",
                origin=path,
                caption=template.format(classnames[label]),
                read=_file_reader(path),
                label=label,
            )

    return Source(
        items,
        {"kind": "class_folders", "root": os.path.abspath(root), "template": template},
        total=len(files),
        classnames=classnames,
    )


# (c) webdataset tars (img2dataset's default output) ---------------------------------------------


def _range_reader(path: str, offset: int, size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: truncated at byte {offset + len(data)}")
        return data

    return read


def _is_plain_tar(path: str) -> bool:
    """An uncompressed tar, whose members can be read later by offset."""
    try:
        with tarfile.open(path, "r:"):
            return True
    except tarfile.TarError:
        return False


def _tar_items(path: str, lazy: bool, max_member_bytes: int) -> Iterator[SourceItem]:
    """The tar's items; `lazy` (uncompressed tars) reads each image by offset when needed,
    otherwise the images are read here, in one pass over a compressed stream. A member over
    `max_member_bytes` (by its header) is never read: its item is skipped with the reason."""

    def make(key: str, parts: dict[str, Any], too_big: str | None) -> SourceItem:
        origin = f"{path}:{key}"
        if too_big:  # a placeholder caption, so the writer calls read() and records the reason
            return SourceItem(key=key, origin=origin, caption="-", read=_missing(too_big))
        ext = next((e for e in _WDS_IMAGE_EXTS if e in parts), None)
        read = parts[ext] if ext else _missing(f"no image member for key {key}")
        label = None
        if "cls" in parts:
            try:
                label = int(parts["cls"].decode().strip())
            except ValueError:
                read = _missing(f"bad .cls member {parts['cls'][:20]!r} (expected an integer)")
        return SourceItem(
            key=key, origin=origin, caption=parts.get("txt", b""), read=read, label=label
        )

    def read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
        if split_member(member.name)[1] in ("txt", "cls"):
            return read_member(tar, member)
        if lazy:  # an image, read by offset when its shard is written
            return _range_reader(path, member.offset_data, member.size)
        return lambda d=read_member(tar, member): d

    wanted = (*_WDS_IMAGE_EXTS, "txt", "cls")
    try:
        with tarfile.open(path, "r:" if lazy else "r|*") as tar:
            for key, parts, problem in member_groups(tar, wanted, read, max_member_bytes):
                yield make(key, parts, problem and f"{problem} (--max-member-mb); not read")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(
            f"{path}: unreadable tar ({e}); expected webdataset shards (KEY.jpg + KEY.txt members)"
        ) from e


def webdataset_source(
    patterns: str | Iterable[str], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Source:
    """Webdataset `.tar` shards: members KEY.jpg/png/webp + KEY.txt (+ optional KEY.cls).

    A key whose image or text member is over `max_member_bytes` is skipped (and counted) without
    reading the member, so one huge or hostile member cannot exhaust memory.

    Uncompressed tars (webdataset's usual form) give lazy items, read by offset, so the writer
    can permute all of them; if any tar is compressed the source is `in_memory` and shuffled by
    tar order plus a bounded buffer.
    """
    if max_member_bytes < 1:
        raise ValueError(f"webdataset member size cap must be positive, got {max_member_bytes}")
    paths = expand_globs(
        patterns, missing=lambda p: ValueError(f"--webdataset {p!r} matches no files")
    )
    for p in paths:
        if not tarfile.is_tarfile(p):
            raise ValueError(f"{p}: not a tar file; expected webdataset shards")
    lazy = all(_is_plain_tar(p) for p in paths)

    def items_of(ordered: list[str]) -> Iterator[SourceItem]:
        for p in ordered:
            yield from _tar_items(p, lazy, max_member_bytes)

    def shuffled_parts(seed: int) -> Iterator[SourceItem]:
        return items_of([paths[i] for i in np.random.default_rng(seed).permutation(len(paths))])

    return Source(
        lambda: items_of(paths),
        {"kind": "webdataset", "paths": [os.path.abspath(p) for p in paths]},
        in_memory=not lazy,
        shuffled_parts=None if lazy else shuffled_parts,
    )


# (d) a tfds dataset ------------------------------------------------------------------------------


def tfds_source(
    name: str,
    split: str,
    data_dir: str | None = None,
    image_field: str = "image",
    text_field: str | None = None,
    label_field: str | None = None,
    template: str = "a photo of a {}.",
) -> Source:
    """A prepared tfds dataset: encoded images from `image_field`, the caption from `text_field`
    or else `template` over the class name of `label_field` (whose label is kept).

    Read as a stream (`in_memory`), so the writer shuffles it with a bounded buffer; tfds
    already shuffles examples when it prepares a dataset, so this is rarely class-sorted.
    """
    if text_field is None and label_field is None:
        raise ValueError("tfds source: give --text-field and/or --label-field")
    if text_field is None:
        check_template(template)
    builder = _tfds_builder(name, split, data_dir, image_field, text_field, label_field)
    classnames = _tfds_classnames(builder, name, text_field, label_field)

    def items() -> Iterator[SourceItem]:
        ds = _tfds_encoded(builder, split, image_field)
        for i, ex in enumerate(ds):
            label = int(ex[label_field]) if label_field is not None else None
            caption = (
                ex[text_field] if text_field is not None else template.format(classnames[label])
            )
            yield SourceItem(
                key=f"{name}/{split}/{i}",
                origin=f"tfds {name} {split}[{i}]",
                caption=caption,
                read=lambda d=ex[image_field]: d,
                label=label,
            )

    return Source(
        items,
        {
            "kind": "tfds",
            "name": name,
            "split": split,
            "image_field": image_field,
            "text_field": text_field,
            "label_field": label_field,
            "template": None if text_field else template,
        },
        total=builder.info.splits[split].num_examples,
        classnames=classnames,
        in_memory=True,
    )


def _tfds_builder(name, split, data_dir, image_field, text_field, label_field):
    """The tfds builder of `name`, after checking its split and fields (an encoded image)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise ValueError(f"tfds dataset {name!r} (data_dir={data_dir}) not found: {e}") from e
    features = builder.info.features
    for field in (image_field, text_field, label_field):
        if field is not None and field not in features:
            raise ValueError(f"tfds {name}: no feature {field!r}; it has {sorted(features)}")
    if not isinstance(features[image_field], tfds.features.Image):
        raise ValueError(
            f"tfds {name}: feature {image_field!r} is "
            f"{type(features[image_field]).__name__}, expected an Image"
        )
    try:  # a split name or a slice of splits ('train[:10%]', 'train[:1000]+test')
        builder.info.splits[split]
    except (KeyError, ValueError):
        raise ValueError(
            f"tfds {name}: no split {split!r}; it has {sorted(builder.info.splits)} "
            "(slices such as 'train[:10%]' or 'train[100:200]' also work)"
        ) from None
    return builder


def _tfds_classnames(builder, name, text_field, label_field) -> list[str] | None:
    """The label feature's class names (None without labels); required to caption by template."""
    if label_field is None:
        return None
    feature = builder.info.features[label_field]
    classnames = list(getattr(feature, "names", None) or []) or None
    if text_field is None and classnames is None:
        raise ValueError(
            f"tfds {name}: {label_field!r} has no class names to caption with; give --text-field"
        )
    return classnames


def _tfds_encoded(builder, split: str, image_field: str):
    """The split's examples as numpy, images left encoded (the writer stores the bytes)."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={image_field: tfds.decode.SkipDecoding()}
    )
    return tfds.as_numpy(ds)
