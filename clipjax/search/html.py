"""A self-contained HTML page of search results (thumbnails embedded as base64 JPEG).

Links to the files are percent-quoted relative URLs (so `javascript:x.jpg` stays a file
and `a#b.jpg` is not cut at the '#'), and text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
import urllib.parse
from collections.abc import Sequence

from clipjax.search.index import display_path

THUMB_SIZE = 192


def thumbnail_jpeg(source: str | bytes, size: int = THUMB_SIZE) -> bytes | None:
    """A small JPEG of an image (a file path or encoded bytes), brought to RGB by the project's
    image rule (`to_rgb`), or None if it cannot be read."""
    from clipjax.data.image import to_rgb
    from clipjax.search.sources import open_image

    try:
        with open_image(source) as im:
            im.draft(None, (size, size))  # JPEG: decode at a reduced scale when it can
            im = to_rgb(im)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:
        return None
    return buf.getvalue()


def thumbnail_data_uri(path: str, size: int = THUMB_SIZE) -> str | None:
    """A small JPEG of `path` as a data: URI, or None if the image cannot be read."""
    data = thumbnail_jpeg(path, size)
    if data is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def file_href(path: str, base: str) -> str:
    """A relative URL from directory `base` to the file `path`: every byte of the name that is
    not a letter, digit, '/' or '_.-~' percent-encoded, so no name reads as a scheme
    (`javascript:`), fragment ('#') or query ('?')."""
    rel = os.path.relpath(path, base)
    if os.sep != "/":
        rel = rel.replace(os.sep, "/")
    return urllib.parse.quote(os.fsencode(rel), safe="/")


def results_page(query: str, results: Sequence[tuple[float, str | dict]], html_path: str) -> str:
    """The HTML text: the query, then a grid of (rank, score, thumbnail linked to the file).
    A result is an image file's path, or an index entry (`Index.entry`): a shard record is shown
    with its key and caption, its thumbnail read from the shard, and no link."""
    from clipjax.search.sources import entry_image

    base = os.path.dirname(os.path.abspath(html_path))
    cards = []
    for rank, (score, entry) in enumerate(results, start=1):
        path = entry if isinstance(entry, str) else entry.get("path")
        if path is not None:
            uri = thumbnail_data_uri(path)
            name = html.escape(display_path(os.path.basename(path)))
        else:
            try:
                data = thumbnail_jpeg(entry_image(entry))
            except (OSError, ValueError):
                data = None
            uri = data and "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
            name = html.escape(display_path(f"{entry.get('key', '')}: {entry.get('caption', '')}"))
        img = (
            f'<img src="{uri}" alt="{name}">'
            if uri
            else '<div class="missing">image not readable</div>'
        )
        if path is not None:
            img = f'<a href="{html.escape(file_href(path, base))}">{img}</a>'
        cards.append(
            f"<figure>{img}<figcaption>#{rank} <b>{score:.4f}</b><br>{name}</figcaption></figure>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>clipjax search: {html.escape(display_path(query))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB_SIZE}px; }}
img {{ max-width: {THUMB_SIZE}px; max-height: {THUMB_SIZE}px; display: block; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
.missing {{ width: {THUMB_SIZE}px; height: 80px; background: #eee; }}
</style></head>
<body><h2>{html.escape(display_path(query))}</h2><div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
