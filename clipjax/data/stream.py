"""Numpy batches of a tf.data pipeline, closed without hanging.

The pipelines tokenize captions with `tf.numpy_function`, on tf.data's own threads, and such a
call needs the GIL. Freeing a TensorFlow iterator waits for the calls in flight, and Python frees
it holding the GIL: if a tokenizer call is running (or about to start), that wait deadlocks; at
interpreter exit it hangs for good, because CPython ends a thread that asks for the GIL during
finalisation, so the call never returns (a script that takes two batches and exits hung about
one run in ten). `NumpyStream.close()` therefore first shuts a gate that the pipeline places
before its Python ops, reads out what is already past it (waiting on TensorFlow releases the
GIL, so those calls finish), and only then frees the iterator. Streams that their owner did not
close are closed at exit, before finalisation (atexit).

    with NumpyStream(lambda gate: pipeline_dataset(gate=gate)) as stream:
        for batch in stream:
            ...
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_open: weakref.WeakSet = weakref.WeakSet()
_open_lock = threading.Lock()
_hook_registered = False


class NumpyStream:
    """Iterate numpy elements of `build(gate)`, a tf.data.Dataset in which `gate(ds)` was applied
    to the dataset before its first Python-backed op (e.g. the tokenizer's map)."""

    def __init__(self, build: Callable[[Callable[[Any], Any]], Any]):
        import tensorflow as tf

        self._stop = tf.Variable(False, trainable=False, name="stream_stop")
        self._iterator = iter(build(self._gate).as_numpy_iterator())
        global _hook_registered
        with _open_lock:
            _open.add(self)
            if not _hook_registered:  # after TensorFlow's own exit hooks: runs before them
                atexit.register(_close_open_streams)
                _hook_registered = True

    def _gate(self, ds):
        import tensorflow as tf

        from clipjax.data.records import traced

        stop = self._stop
        return ds.take_while(traced(lambda *_: tf.logical_not(stop.read_value())))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        """Stop the pipeline at its gate, read out what is past it and free the iterator.
        Idempotent; costs at most the batches already in flight."""
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        self._stop.assign(True)
        try:
            for _ in iterator:  # ends once the gate's end reaches the output
                pass
        except Exception:  # noqa: BLE001 - a pipeline error after its reader left: moot
            pass
        del iterator
        with _open_lock:
            _open.discard(self)

    def __enter__(self) -> NumpyStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def closing_iter(iterable: Iterable) -> Iterator[Iterator]:
    """`iter(iterable)`, closed (if it has `close`: generators, NumpyStream) on leaving."""
    it = iter(iterable)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _close_open_streams() -> None:
    with _open_lock:
        streams = list(_open)
    for stream in streams:
        stream.close()
