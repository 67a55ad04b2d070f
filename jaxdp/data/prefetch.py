"""Host work overlapped with the device step: a generator run ahead by a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield ``items`` in order while a thread computes up to ``depth`` of them ahead (0: no thread).

    Gathering the next Poisson draw (from memory or from array_record files) then happens while the
    current step runs. The items are the same, in the same order; an exception in the producer is
    raised here, at the item where it happened. Stopping early (``close()`` or garbage collection)
    stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_END, None))
        except BaseException as e:  # handed to the consumer
            buffer.put((_END, e))

    thread = threading.Thread(target=produce, name="jaxdp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
