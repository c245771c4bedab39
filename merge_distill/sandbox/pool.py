"""Long-lived worker processes speaking length-prefixed JSON over stdin/stdout, and a pool of them.

Used by the sandbox (its bubblewrap workers) and by the math grader (its math-verify workers). The
framing (:func:`write_frame`, :func:`read_frame`) is defined once, in the standard-library-only
:mod:`merge_distill.sandbox.framing`, and re-exported here.
"""

from __future__ import annotations

import atexit
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Callable

from merge_distill.sandbox.framing import read_frame, write_frame

__all__ = ["FramedWorker", "WorkerPool", "read_frame", "write_frame"]


class FramedWorker:
    """A child process speaking length-prefixed JSON over its stdin/stdout, with a ready handshake."""

    def __init__(self, argv: list[str], *, env: dict | None = None, ready_timeout: float = 30.0,
                 preexec_fn: Callable[[], None] | None = None):
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            start_new_session=True, close_fds=True, preexec_fn=preexec_fn,
        )
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        self.ready_timeout = ready_timeout
        self.ready_info: dict | None = None
        self.started_at = time.monotonic()

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the ready frame arrives; raise RuntimeError with the worker's stderr if not."""
        if self.ready_info is None:
            ready, _, _ = select.select([self.rfd], [], [], self.ready_timeout if timeout is None else timeout)
            msg = read_frame(self.rfd) if ready else None
            if not msg or not msg.get("ready"):
                self.kill()
                raise RuntimeError(f"worker failed to start: {self.stderr_tail() or 'no output'}")
            self.ready_info = msg
        return self.ready_info

    def send(self, obj: dict) -> None:
        write_frame(self.wfd, obj)

    def recv(self) -> dict | None:
        try:
            return read_frame(self.rfd)
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-n:].strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.kill()
            except OSError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.close()

    def close(self, grace: float = 2.0) -> None:
        """Close stdin (the worker exits on EOF), then make sure it is gone."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _Spawner:
    """One long-lived daemon thread that starts worker processes.

    bwrap's ``--die-with-parent`` (PR_SET_PDEATHSIG) fires when the *thread* that forked it ends, so
    workers must not be spawned from a caller's short-lived thread. A daemon thread also outlives
    the interpreter's thread shutdown, so the atexit hook below can still close workers gracefully.
    """

    def __init__(self):
        self._jobs: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._loop, name="merge-distill-spawner", daemon=True).start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def call(self, fn):
        future: Future = Future()
        self._jobs.put((fn, future))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)


_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    """No worker outlives the interpreter, whoever forgot to close what."""
    for pool in list(_LIVE_POOLS):
        pool.close()


class WorkerPool:
    """Dispatch requests over a set of FramedWorkers with a hard per-request deadline.

    A worker that misses a deadline is killed and replaced, costing only that request; so does a
    worker that dies. Workers are (re)started from one long-lived thread, because bwrap's
    ``--die-with-parent`` is tied to the *thread* that spawned it.
    """

    def __init__(self, spawn: Callable[[], FramedWorker], size: int):
        self._spawn_fn = spawn
        self.size = max(1, int(size))
        self._workers: list[FramedWorker] = []
        self._spawner: _Spawner | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._last_start_error = ""
        _LIVE_POOLS.add(self)

    # -- lifecycle
    def _spawn(self) -> FramedWorker:
        if self._spawner is None:
            self._spawner = _Spawner()
        return self._spawner.call(self._spawn_fn)

    def _ensure(self) -> None:
        if os.getpid() != self._pid:  # we were forked: the workers belong to the parent
            self._workers, self._spawner, self._pid = [], None, os.getpid()
        for dead in [w for w in self._workers if not w.alive()]:
            dead.kill()
            self._workers.remove(dead)
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for w in self._workers:
                    w.close(grace=0.5)
                if self._spawner is not None:
                    self._spawner.stop()
            self._workers, self._spawner = [], None

    # -- dispatch
    def map(self, requests: list[dict], deadline_s: Callable[[dict], float],
            lost: Callable[[dict, str, str], dict]) -> list[dict]:
        """Send each request to a worker; return the replies in order.

        ``deadline_s(req)`` bounds each request's round trip (from its dispatch to its reply);
        a reply carrying ``"_retire": true`` announces that its worker exits after it;
        ``lost(req, why, stderr)`` builds the reply for a request whose worker died (why="died"),
        missed the deadline (why="deadline") or could not start (why="start").
        """
        with self._lock:
            return self._map(requests, deadline_s, lost)

    def _map(self, requests, deadline_s, lost):
        self._ensure()
        results: list[dict | None] = [None] * len(requests)
        pending = deque(range(len(requests)))
        idle: deque[FramedWorker] = deque()
        starting: dict[int, FramedWorker] = {}  # rfd -> worker still importing; never blocks others
        busy: dict[int, tuple[FramedWorker, int, float]] = {}  # rfd -> (worker, index, deadline)
        start_failures = 0

        def track(worker: FramedWorker) -> None:
            if worker.ready_info is not None:
                idle.append(worker)
            else:
                starting[worker.rfd] = worker

        def replace(worker: FramedWorker) -> None:
            worker.kill()
            self._workers.remove(worker)
            if start_failures > 2 * self.size:
                return  # starting keeps failing: stop trying for this call
            try:
                fresh = self._spawn()
            except Exception:
                return
            self._workers.append(fresh)
            track(fresh)

        for worker in self._workers:
            track(worker)
        while pending or busy:
            while pending and idle:
                worker = idle.popleft()
                i = pending.popleft()
                try:
                    worker.send(requests[i])
                except OSError:  # died while idle: not this request's fault, try again
                    pending.appendleft(i)
                    replace(worker)
                    continue
                busy[worker.rfd] = (worker, i, time.monotonic() + deadline_s(requests[i]))
            if not busy and not starting:
                if pending:
                    why = self._last_start_error or "no worker could be started"
                    for i in pending:
                        results[i] = lost(requests[i], "start", why)
                    pending.clear()
                continue
            deadlines = [d for _, _, d in busy.values()] + [w.started_at + w.ready_timeout for w in starting.values()]
            timeout = max(0.0, min(deadlines) - time.monotonic())
            ready, _, _ = select.select(list(busy) + list(starting), [], [], timeout)
            for rfd in ready:
                if rfd in starting:
                    worker = starting.pop(rfd)
                    msg = worker.recv()
                    if msg and msg.get("ready"):
                        worker.ready_info = msg
                        idle.append(worker)
                    else:
                        start_failures += 1
                        self._last_start_error = worker.stderr_tail() or "worker exited during start-up"
                        replace(worker)
                    continue
                worker, i, _ = busy.pop(rfd)
                reply = worker.recv()
                if reply is None:
                    results[i] = lost(requests[i], "died", worker.stderr_tail())
                    replace(worker)
                elif reply.pop("_retire", False):  # the worker exits after this reply
                    results[i] = reply
                    replace(worker)
                else:
                    results[i] = reply
                    idle.append(worker)
            now = time.monotonic()
            for rfd, (worker, i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[rfd]
                    results[i] = lost(requests[i], "deadline", "")
                    replace(worker)
            for rfd, worker in list(starting.items()):
                if now >= worker.started_at + worker.ready_timeout:
                    del starting[rfd]
                    start_failures += 1
                    self._last_start_error = f"worker not ready after {worker.ready_timeout:.0f} s"
                    replace(worker)
        return results  # type: ignore[return-value]
