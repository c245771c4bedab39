"""The sandbox worker: the program shipped into bubblewrap (or run as a plain process).

Standard library only, as are the two modules it imports, :mod:`merge_distill.sandbox.framing`
and :mod:`merge_distill.sandbox.child`: the host starts it as
``python -I -S -c <program> --sandbox-worker <config json>``, where nothing of merge_distill or of
site-packages can be imported, so the program carries the three files' source (see
``merge_distill.sandbox.policy._worker_source``). The worker reads requests, forks a child per
program (:func:`merge_distill.sandbox.child.run_child`), watches it to its end or deadline, kills
whatever it left and removes its directory, and replies with the verdict.

The design, and what counts as success, are described in :mod:`merge_distill.sandbox`.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import time

from merge_distill.sandbox.child import NOBODY, PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl, run_child
from merge_distill.sandbox.framing import read_frame, write_frame

# Modules imported once in the worker so that programs using them start instantly after fork().
# Every preloaded page makes each fork() and exit dearer, so only small, commonly used modules
# (hashlib alone would add ~4 MB of OpenSSL).
_PRELOAD = (
    "math", "cmath", "re", "string", "collections", "itertools", "functools", "operator", "heapq",
    "bisect", "copy", "typing", "traceback", "linecache", "array", "ctypes", "resource",
)


def _proc_children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain anything; ppid follows the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _kill_everything_else(cfg: dict) -> None:
    """Kill whatever the last program left running."""
    if cfg["pid_namespace"]:
        # Inside our own pid namespace everything except init (1) and us belongs to the program.
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    else:
        # We are a child subreaper: escaped descendants were re-parented to us. Kill, reap, repeat.
        me = os.getpid()
        for _ in range(100):
            children = _proc_children(me)
            if not children:
                break
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            _reap()
    _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _rmtree(path: str) -> None:
    """Remove a run directory whatever the program did to it (modes, symlinks, depth)."""
    try:
        entries = list(os.scandir(path))
    except PermissionError:
        os.chmod(path, 0o700)
        entries = list(os.scandir(path))
    except OSError:
        entries = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                _rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except (OSError, RecursionError):  # pathological nesting: the caller retires the worker
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class _Capture:
    """Drain a pipe, keeping at most `limit` bytes."""

    def __init__(self, limit: int):
        self.limit, self.data, self.truncated = limit, bytearray(), False

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        s = self.data.decode("utf-8", "replace")
        return s + "\n[... truncated]" if self.truncated else s


def _run_one(req: dict, cfg: dict) -> dict:
    start = time.monotonic()
    while True:
        _RUN_COUNTER[0] += 1
        workdir = os.path.join(cfg["workdir_base"], f"run-{os.getpid()}-{_RUN_COUNTER[0]}")
        try:
            os.mkdir(workdir, 0o700)
            break
        except FileExistsError:
            continue
    if cfg["drop_uid"]:
        os.chown(workdir, NOBODY, NOBODY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    st_r, st_w = os.pipe()
    nonce = os.urandom(16).hex()
    # Park the worker's objects in the permanent generation: a collection in the child would
    # otherwise touch (copy-on-write) every one of them. O(1), so done before each fork.
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            run_child(req, cfg, workdir, out_w, err_w, st_w, nonce)
        finally:
            os._exit(72)
    for fd in (out_w, err_w, st_w):
        os.close(fd)

    limit = cfg["output_limit"]
    captures = {out_r: _Capture(limit), err_r: _Capture(limit), st_r: _Capture(4096)}
    deadline = start + float(req["timeout"])
    poller = select.poll()
    for fd in captures:
        poller.register(fd, select.POLLIN)
    try:
        exit_fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exit_fd = None
    else:
        poller.register(exit_fd, select.POLLIN)
    poller.register(_REQUEST_FD[0], select.POLLIN)  # readable now means the host went away

    status = None
    timed_out = host_gone = False
    open_pipes = set(captures)
    while True:
        if exit_fd is None:  # no pidfd (old kernel): poll for the exit every 2 ms
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = wait_status
                break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        wait_ms = remaining * 1000 if exit_fd is not None else min(remaining * 1000, 2)
        events = poller.poll(max(1, int(wait_ms)))
        exited = False
        for fd, _ in events:
            if fd == exit_fd:
                exited = True
            elif fd == _REQUEST_FD[0]:
                host_gone = True
            elif fd in open_pipes:
                chunk = os.read(fd, 65536)
                if chunk:
                    captures[fd].feed(chunk)
                else:
                    poller.unregister(fd)
                    open_pipes.discard(fd)
        if exited or host_gone:
            break

    # Whatever happened, nothing of this program outlives this point.
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if timed_out or host_gone:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if status is None:
        _, status = os.waitpid(pid, 0)
    duration = time.monotonic() - start
    _kill_everything_else(cfg)
    if exit_fd is not None:
        os.close(exit_fd)
    # All writers are dead now: drain what is left in the pipes.
    for fd in list(open_pipes):
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 65536):
                captures[fd].feed(chunk)
        except BlockingIOError:
            pass
    for fd in captures:
        os.close(fd)
    _rmtree(workdir)
    if os.path.lexists(workdir):
        _RETIRE[0] = True  # could not clean up: finish this reply, then make way for a fresh worker
    if host_gone:
        raise SystemExit(0)

    report = captures[st_r].data.decode("utf-8", "replace").splitlines()
    last = report[-1] if report else ""
    result = {
        "returncode": None,
        "stdout": captures[out_r].text(),
        "stderr": captures[err_r].text(),
        "duration": duration,
        "exception": "",
        "phase": "",
    }
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        result["returncode"] = -sig
        if timed_out or sig == signal.SIGXCPU:
            result["status"] = "timeout"
        else:
            result["status"] = "killed"
            result["exception"] = signal.Signals(sig).name if sig in signal.valid_signals() else ""
        return result
    code = os.WEXITSTATUS(status)
    result["returncode"] = code
    if timed_out:
        result["status"] = "timeout"
    elif code == 0 and last == "OK " + nonce:
        result["status"] = "ok"
    elif last == "MEMORY":
        result["status"], result["exception"] = "memory", "MemoryError"
    elif last.startswith("SYNTAX "):
        result["status"], result["exception"], result["phase"] = "error", last[7:], "compile"
    elif last.startswith("EXC "):
        result["status"], result["exception"] = "error", last[4:]
        if result["exception"] == "MemoryError":
            result["status"] = "memory"
    elif last.startswith("SETUP "):
        result["status"], result["exception"] = "sandbox_error", last[6:]
    else:
        result["status"] = "error"
        result["exception"] = "EarlyExit"
        result["stderr"] += f"\n[exited with status {code} before the program finished]"
    return result


_REQUEST_FD = [0]
_RUN_COUNTER = [0]
_RETIRE = [False]


def _worker_main(cfg: dict) -> None:
    # Move the protocol channel off fds 0/1 so nothing printed by accident can corrupt it.
    rfd, wfd = os.dup(0), os.dup(1)
    _REQUEST_FD[0] = rfd
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    if not cfg["pid_namespace"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in _PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    write_frame(wfd, {"ready": True, "pid": os.getpid(), "uid": os.getuid(), "version": sys.version})
    while True:
        req = read_frame(rfd)
        if req is None:
            return
        try:
            res = _run_one(req, cfg)
        except SystemExit:
            return
        except BaseException as exc:  # a bug here must not look like a program verdict
            res = {"status": "sandbox_error", "returncode": None, "stdout": "", "exception": "",
                   "phase": "", "stderr": f"sandbox worker error: {type(exc).__name__}: {exc}",
                   "duration": 0.0}
        if _RETIRE[0]:
            res["_retire"] = True  # tells the pool to replace us; we exit after this reply
        write_frame(wfd, res)
        if _RETIRE[0]:
            return


if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox-worker"]:
    _worker_main(json.loads(sys.argv[2]))
    sys.exit(0)
