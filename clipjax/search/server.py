"""The search service over HTTP: a page at `/` and a JSON API (Starlette, served by uvicorn).

Starlette + uvicorn: a small, widely used and maintained ASGI toolkit and server (the base of
FastAPI), with multipart parsing, static files and exception handlers, and no code generation;
requests are served concurrently on one event loop, the blocking work (encoding, search,
thumbnails) in a thread pool, so 50 clients are no trouble (see benchmarks/RESULTS.md).

API (all errors are JSON {"error": message} with a 4xx status; never a traceback):
  GET  /health                          {"status": "ok", "indexes": [...]}
  GET  /metrics                         Prometheus text: per-stage latency histograms
  GET  /api/indexes                     [{"name", "count", "dim", "search", "recall_at_10"}]
  GET  /api/search?q=TEXT[&index=&k=&offset=&dedup=]
  POST /api/search  JSON {"text": str} | {"image": base64} | {"embedding": [D floats]} |
                    {"id": row}, plus "index", "k", "offset", "dedup" (a cosine)
                    or multipart/form-data with an "image" file part and the same fields
  GET  /api/similar/INDEX/ROW[?k=&offset=&dedup=]   results like entry ROW ("more like this")
  GET  /api/thumb/INDEX/ROW             a JPEG thumbnail       (by row number, never by path)
  GET  /api/file/INDEX/ROW              the indexed image itself
Search answers {"index", "k", "offset", "results": [{"id", "score", "name", "path", "caption",
"key", "thumbnail", "file"}], "timings_ms": {...}}. Nothing writes: the service is read-only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.resources
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from clipjax.search.service import QueryError, SearchService

log = logging.getLogger(__name__)

_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
_STATIC = ("index.html", "app.js", "style.css")
_MEDIA = {"html": "text/html; charset=utf-8", "js": "text/javascript", "css": "text/css"}


def create_app(service: SearchService) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    static = {
        name: importlib.resources.files("clipjax.search").joinpath("static", name).read_bytes()
        for name in _STATIC
    }

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def page(request: Request) -> Response:
        return Response(static["index.html"], media_type=_MEDIA["html"])

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static or name == "index.html":
            return error(404, "no such asset")
        return Response(static[name], media_type=_MEDIA[name.rsplit(".", 1)[1]])

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "indexes": list(service.collections)})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def indexes(request: Request) -> Response:
        return JSONResponse([c.describe() for c in service.collections.values()])

    async def search_get(request: Request) -> Response:
        q = request.query_params
        return await run_search(dict(q), text=q.get("q"))

    async def search_post(request: Request) -> Response:
        body = await _read_body(request, service.max_upload_bytes * 4 // 3 + 65536)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            request._body = body  # Starlette's form parser reads the cached, bounded body
            form = await request.form(max_files=1, max_fields=20)
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                if "text" not in fields:
                    raise QueryError("multipart search: give an 'image' file part or 'text'")
                return await run_search(fields, text=fields["text"])
            return await run_search(fields, image=await upload.read())
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise QueryError("the body must be JSON (or multipart/form-data)") from None
        if not isinstance(data, dict):
            raise QueryError("the JSON body must be an object")
        given = [f for f in ("text", "image", "embedding", "id") if data.get(f) is not None]
        if len(given) != 1:
            raise QueryError("give exactly one of 'text', 'image', 'embedding', 'id'")
        if "image" in given:
            if not isinstance(data["image"], str):
                raise QueryError("'image' must be a base64 string")
            try:
                image = base64.b64decode(data["image"], validate=True)
            except (binascii.Error, ValueError):
                raise QueryError("'image' is not valid base64") from None
            return await run_search(data, image=image)
        return await run_search(
            data, text=data.get("text"), embedding=data.get("embedding"), row=data.get("id")
        )

    async def similar(request: Request) -> Response:
        p = request.path_params
        return await run_search({**request.query_params, "index": p["index"]}, row=p["row"])

    async def run_search(
        opts: dict, *, text=None, image=None, embedding=None, row=None
    ) -> Response:
        collection = service.collection(opts.get("index"))
        k = _int(opts.get("k", 20), "k")
        offset = _int(opts.get("offset", 0), "offset")
        dedup = opts.get("dedup")
        dedup = None if dedup in (None, "", "0", 0) else _float(dedup, "dedup")
        t0 = time.perf_counter()

        def work() -> tuple[list, dict]:
            t = time.perf_counter()
            if text is not None:
                query = service.encode_text(text)
            elif image is not None:
                query = service.encode_image(image)
            elif embedding is not None:
                query = service.embedding_query(embedding, collection)
            elif row is not None:
                query = collection.index.embeddings[service.row(collection, row)].astype("float32")
            else:
                raise QueryError("give a query: text (q), image, embedding or id")
            t_enc = time.perf_counter()
            results = service.search(collection, query, k=k, offset=offset, dedup=dedup)
            t_search = time.perf_counter()
            return results, {
                "encode": round(1000 * (t_enc - t), 3),
                "search": round(1000 * (t_search - t_enc), 3),
            }

        results, timings = await run_in_threadpool(work)
        service.metrics.observe("request", time.perf_counter() - t0)
        return JSONResponse(
            {
                "index": collection.name,
                "k": k,
                "offset": offset,
                "results": results,
                "timings_ms": timings,
            }
        )

    async def thumb(request: Request) -> Response:
        c = service.collection(request.path_params["index"])
        row = service.row(c, request.path_params["row"])
        data = await run_in_threadpool(service.thumbnail, c, row)
        return Response(
            data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"}
        )

    async def original(request: Request) -> Response:
        c = service.collection(request.path_params["index"])
        row = service.row(c, request.path_params["row"])
        data, kind = await run_in_threadpool(service.original, c, row)
        return Response(data, media_type=kind, headers={"content-disposition": "inline"})

    async def on_query_error(request: Request, exc: QueryError) -> Response:
        return error(exc.status, str(exc))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    async def on_other_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error serving %s", request.url.path)
        return error(500, "internal error (logged by the server)")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", asset),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/api/indexes", indexes),
            Route("/api/search", search_get, methods=["GET"]),
            Route("/api/search", search_post, methods=["POST"]),
            Route("/api/similar/{index}/{row}", similar),
            Route("/api/thumb/{index}/{row}", thumb),
            Route("/api/file/{index}/{row}", original),
        ],
        exception_handlers={
            QueryError: on_query_error,
            HTTPException: on_http_error,
            Exception: on_other_error,
        },
    )

    async def with_headers(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                route = "/".join(scope["path"].split("/")[:3]) or "/"
                if route.startswith("/api/") or route in ("/", "/health", "/metrics"):
                    service.metrics.count(route, message["status"])
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        return await app(scope, receive, send_with_headers)

    return with_headers


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, or QueryError 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise QueryError(f"the request body is {declared} bytes; at most {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise QueryError(f"the request body is over {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _int(value: Any, name: str) -> int:
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be an integer, got {value!r}") from None


def _float(value: Any, name: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be a number, got {value!r}") from None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless `allow_remote`; warn when it is given."""
    if host in LOOPBACK:
        return
    if not allow_remote:
        raise ValueError(
            f"--host {host}: serving beyond this machine lets anyone who can reach it read "
            f"every indexed image; pass --allow-remote as well if that is what you want"
        )
    log.warning(
        "serving on %s: anyone on that network can search and read the indexed images", host
    )


def _uvicorn_server(service: SearchService, host: str, port: int) -> Any:
    import uvicorn

    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_level="warning",
        server_header=False,
        timeout_keep_alive=30,
        backlog=512,
    )
    return uvicorn.Server(config)


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted."""
    _uvicorn_server(service, host, port).run()


@contextlib.contextmanager
def serving_in_thread(service: SearchService, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve on a free port of `host` in a background thread; yields the base URL, stops after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = _uvicorn_server(service, host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the search server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
