"""Work handed off the request path: a bounded queue of requests' arrays and the one thread that consumes it.

Model monitoring (jaxbig.serve.monitor) and request logging (jaxbig.serve.request_log) both take an answered
request's arrays (the ones the server already holds: nothing is copied) and work on them later. `offer` never
blocks: when the queue already holds `max_items` items or `max_bytes` of arrays (a request's logits are
B*T*V floats, so a count alone would not bound memory), the item is refused and the caller counts the drop.
The thread wakes at most every `period` seconds and then handles everything queued: under load that is one
wake-up for many requests instead of one each (each wake-up takes the GIL from the threads serving requests).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class Handoff:
    def __init__(self, work: Callable[..., None], name: str, *, max_items: int, max_bytes: int, period: float = 0.05):
        self._work, self.name, self.max_bytes, self.period = work, name, max_bytes, period
        self._stopping = threading.Event()
        self._queue: queue.Queue = queue.Queue(max_items)
        self._lock = threading.Lock()
        self._bytes = 0  # bytes of arrays in the queue (guarded by _lock)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, *item) -> bool:
        """Queues `item` (its numpy arrays and dicts of them count towards max_bytes); False when it is refused."""
        nbytes = sum(a.nbytes for x in item for a in (x.values() if isinstance(x, dict) else [x]) if isinstance(a, np.ndarray))
        with self._lock:
            if self._bytes + nbytes > self.max_bytes or self._queue.full():
                return False
            self._bytes += nbytes
            self._queue.put_nowait((item, nbytes))
        return True

    def _run(self) -> None:
        while True:
            entry = self._queue.get()  # sleeps until there is work
            while entry is not None:
                self._handle(*entry)
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if entry is None:  # stop()
                self._queue.task_done()
                return
            self._stopping.wait(self.period)  # let the next requests gather

    def _handle(self, item: tuple, nbytes: int) -> None:
        try:
            self._work(*item)
        except Exception:  # noqa: BLE001 - one bad item must not stop the thread (nor serving)
            log.exception("%s: handling a request failed", self.name)
        finally:
            with self._lock:
                self._bytes -= nbytes
            self._queue.task_done()

    def drain(self) -> None:
        """Waits until every queued item has been handled."""
        self._queue.join()

    def stop(self) -> None:
        """Handles what is queued, then ends the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=30)
