"""Wake-ups for job watchers: a worker in this process says when it stored a change to a job, so watchers
here read the job again at once rather than at their next poll. Changes made by workers in other processes
(a Redis broker) are still seen by polling."""

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class JobChanges:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        """The job changed in its store; callable from any thread."""
        with self._lock:
            watchers = list(self._watchers.get(job_id, ()))
        for loop, event in watchers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop has closed
                pass

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event of the running loop, set at each change of the job notified while the block runs."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._watchers.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._watchers[job_id]
                entries.remove(entry)
                if not entries:
                    del self._watchers[job_id]


CHANGES = JobChanges()  # this process's: its job workers and its JobManager share it
