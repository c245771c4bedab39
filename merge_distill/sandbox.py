"""Run untrusted, model-written Python programs in isolation, fast.

Design
------
A :class:`Sandbox` keeps a few long-lived *workers*. With bubblewrap available each worker is one
``bwrap`` process (new mount, pid, network, ipc and uts namespaces; read-only ``/usr`` and Python
install; a size-capped private tmpfs on ``/tmp``; nothing of ``$HOME``, ``/root`` or the project).
Each worker receives programs over a pipe and, for every program, ``fork()``\\s a child that

* starts a new session and process group, chdirs into a fresh private directory,
* sets ``RLIMIT_AS`` / ``CPU`` / ``NPROC`` / ``FSIZE`` / ``NOFILE`` / ``CORE`` and ``no_new_privs``,
* drops to uid/gid 65534 (when the worker is root; see below),
* has stdin on ``/dev/null`` and stdout/stderr on pipes the worker drains and caps,
* closes every other descriptor, including the worker's protocol channel,
* compiles and ``exec()``\\s the program,

and the worker kills everything left (``kill(-1, SIGKILL)`` inside the pid namespace, or the
descendants it reaped as a child subreaper without one) when the child exits or its wall-clock
deadline passes, then deletes the directory. One fork costs well under a millisecond, so a 2-core
machine runs several hundred small programs per second with full isolation.

Two bubblewrap layouts: when the caller is root, bwrap runs without a user namespace and keeps only
``CAP_SETUID/SETGID/KILL/CHOWN/DAC_OVERRIDE/FOWNER`` for the worker, and every program runs as the
real uid 65534: it cannot signal the worker, and ``RLIMIT_NPROC`` is enforced. Otherwise bwrap makes
a user namespace (one uid) and a program *can* kill its own worker; that is detected, the program is
reported ``killed`` and the worker restarted.

Where bwrap is missing or fails its self-test the sandbox falls back to ``"rlimits"`` isolation:
the same worker and child protocol as plain processes (setsid, rlimits, uid 65534 when root,
subreaper cleanup) but no namespaces: the network and the file system stay visible to the
extent the uid allows. :func:`isolation_level` says which is in force.

Programs see only the standard library (no site-packages: nothing of a virtualenv or the
project is mounted). Other known limits: ``RLIMIT_NPROC`` counts every process of uid 65534 on
the host, so one fork bomb can starve threads in programs running beside it; as root the sandbox
has no user namespace, so a program may still create one of its own (it gains nothing outside);
in the fallback without root, programs run as the caller's uid.

What counts as success
----------------------
A run is ``"ok"`` only when the program ran to its end: after ``exec()`` returns, the harness
writes a random per-run nonce to a private status pipe and exits 0. Exiting early in any way
(``os._exit(0)``, ``sys.exit(0)``, ``raise SystemExit``, a signal, closing or writing stdout,
printing "PASS") is not success. Deliberately adversarial code can still forge success by
introspecting its own interpreter (walking frames or ``gc`` objects to find the nonce, then writing
it to the status descriptor), and code that changes the meaning of the tests' own operations
(e.g. returning an object whose ``__eq__`` is always true) passes the tests it fools. Both are
reward-hacking behaviours to look for in samples; no in-process harness prevents them.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import struct
import sys
import time

# --------------------------------------------------------------------------------------------------
# Framing shared by host and workers: 4-byte big-endian length, then a UTF-8 JSON object.
# --------------------------------------------------------------------------------------------------

_HEADER = struct.Struct("!I")


def write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    data = _HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, need = [], n
    while need:
        chunk = os.read(fd, min(need, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict | None:
    """Read one frame; None on EOF (the other side is gone)."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0])
    if body is None:
        return None
    return json.loads(body.decode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------------------
# Worker side. Runs inside the sandbox as `python -I -S -c <this file's source> --sandbox-worker`;
# everything it uses is standard library.
# --------------------------------------------------------------------------------------------------

NOBODY = 65534
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

# Modules imported once in the worker so that programs using them start instantly after fork().
# Every preloaded page makes each fork() and exit dearer, so only small, commonly used modules
# (hashlib alone would add ~4 MB of OpenSSL).
_PRELOAD = (
    "math", "cmath", "re", "string", "collections", "itertools", "functools", "operator", "heapq",
    "bisect", "copy", "typing", "traceback", "linecache", "array", "ctypes", "resource",
)


_LIBC: list = []


def _prctl(option: int, arg: int) -> None:
    try:
        if not _LIBC:
            import ctypes

            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        _LIBC[0].prctl(option, arg, 0, 0, 0)
    except Exception:  # best effort: not every platform has prctl
        pass


def _set_rlimits(limits: dict) -> None:
    import resource

    table = {
        "as": resource.RLIMIT_AS,
        "cpu": resource.RLIMIT_CPU,
        "nproc": resource.RLIMIT_NPROC,
        "fsize": resource.RLIMIT_FSIZE,
        "nofile": resource.RLIMIT_NOFILE,
        "core": resource.RLIMIT_CORE,
    }
    for name, value in limits.items():
        soft, hard = value if isinstance(value, (list, tuple)) else (value, value)
        try:
            resource.setrlimit(table[name], (soft, hard))
        except (ValueError, OSError):
            # Never raise a hard limit we cannot; lower the soft one as far as allowed.
            cur_soft, cur_hard = resource.getrlimit(table[name])
            cap = cur_hard if cur_hard != resource.RLIM_INFINITY else soft
            resource.setrlimit(table[name], (min(soft, cap), cur_hard))


def _harness(source: str, nonce: str, status_fd: int, _write=os.write, _exit=os._exit) -> None:
    """Compile and run `source` as __main__; prove completion with the nonce. Never returns."""
    import builtins
    import linecache
    import traceback

    def report(line: str, code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            _write(status_fd, (line + "\n").encode())
        except BaseException:
            pass
        _exit(code)

    filename = "program.py"
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except BaseException as exc:  # SyntaxError, ValueError (NUL bytes), MemoryError, RecursionError
        traceback.print_exception(type(exc), exc, None, limit=0)
        report("SYNTAX " + type(exc).__name__, 1)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__", "__file__": filename, "__builtins__": builtins}
    try:
        exec(code, namespace)
    except MemoryError:
        report("MEMORY", 1)
    except BaseException as exc:  # SystemExit included: leaving early is not success
        try:  # the traceback without the harness's own frame
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next, limit=-8)
        except BaseException:
            pass
        report("EXC " + type(exc).__name__, 1)
    report("OK " + nonce, 0)


def _child(req: dict, cfg: dict, workdir: str, out_w: int, err_w: int, status_w: int, nonce: str):
    """In the forked child: isolate, then run the program. Never returns."""
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(status_w, 3)
        os.set_inheritable(3, False)
        os.closerange(4, 1 << 16)  # the worker's protocol channel and every other pipe end
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(workdir)
        os.umask(0o077)
        if cfg["drop_uid"]:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        timeout = float(req["timeout"])
        mem = int(req["memory_mb"]) * 1024 * 1024
        cpu = int(timeout) + 2
        _set_rlimits({
            "as": mem,
            "cpu": (cpu, cpu + 1),
            "nproc": cfg["max_procs"],
            "fsize": cfg["file_size_mb"] * 1024 * 1024,
            "nofile": cfg["max_files"],
            "core": 0,
        })
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                           "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
        sys.argv = ["program.py"]
    except BaseException as exc:
        try:
            os.write(3, f"SETUP {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(71)
    _harness(req["source"], nonce, 3)


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
            _child(req, cfg, workdir, out_w, err_w, st_w, nonce)
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
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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


# --------------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------------

import atexit  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

STATUSES = ("ok", "error", "timeout", "memory", "killed", "sandbox_error")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program.

    status: "ok" (ran to the end), "error" (uncaught exception or early exit; ``exception`` names
    it, ``phase == "compile"`` when the source did not compile), "timeout" (wall or CPU limit),
    "memory" (MemoryError under RLIMIT_AS), "killed" (died by a signal, or took its worker down),
    "sandbox_error" (the sandbox itself failed; not the program's fault).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    exception: str = ""
    phase: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------- worker processes with a framed pipe protocol


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


# ------------------------------------------------------------------------------ the sandbox


def _python_install() -> tuple[str, str]:
    """The real interpreter and the real prefix holding its standard library (venvs resolved)."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(prefix + os.sep):
        candidate = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        exe = candidate if os.path.exists(candidate) else exe
    return exe, prefix


_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/nsswitch.conf",
              "/etc/passwd", "/etc/group", "/etc/hosts")
_ROOT_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")


def _bwrap_argv(bwrap: str, disk_mb: int) -> list[str]:
    exe, prefix = _python_install()
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if os.geteuid() == 0:
        # No user namespace: the worker keeps a few capabilities, programs run as real uid 65534.
        argv += ["--cap-drop", "ALL"]
        for cap in _ROOT_CAPS:
            argv += ["--cap-add", cap]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "lib32", "libx32", "bin", "sbin"):
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        # Bind the install at its own path (its RUNPATH may be absolute). Its parents are made
        # here, empty and traversable, so uid 65534 can import from it and sees nothing else.
        parents = []
        parent = os.path.dirname(prefix)
        while parent not in ("/", ""):
            parents.append(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb * 1024 * 1024),
             "--tmpfs", "/tmp", "--dir", "/tmp/runs", "--chdir", "/tmp", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", exe]
    return argv


def _worker_source() -> str:
    with open(__file__, encoding="utf-8") as f:
        return f.read()


_LEVEL_CACHE: dict[str, str] = {}


class Sandbox:
    """A pool of warm, isolated workers that run untrusted Python programs.

    >>> with Sandbox() as sb:
    ...     [r.status for r in sb.run(["assert 1 + 1 == 2", "assert False"], timeout_s=2)]
    ['ok', 'error']

    ``isolation``: "auto" (bubblewrap when it works, else rlimits), "bubblewrap" (error if it does
    not work) or "rlimits". Limits that apply to every program: ``output_limit`` bytes kept of
    stdout and of stderr, ``max_procs`` processes/threads of uid 65534 (RLIMIT_NPROC),
    ``file_size_mb`` per written file, ``max_files`` open descriptors, ``disk_mb`` for the whole
    private /tmp of a worker (bubblewrap only). Per call: wall-clock ``timeout_s`` and ``memory_mb``
    of address space. Cheap to construct and picklable; workers start on first use.
    """

    def __init__(self, workers: int | None = None, *, isolation: str = "auto", output_limit: int = 64 * 1024,
                 max_procs: int = 64, file_size_mb: int = 16, max_files: int = 64, disk_mb: int = 256):
        if isolation not in ("auto", "bubblewrap", "rlimits"):
            raise ValueError(f"isolation must be auto, bubblewrap or rlimits, not {isolation!r}")
        self.workers = workers or min(os.cpu_count() or 1, 8)
        self.requested_isolation = isolation
        self.limits = dict(output_limit=output_limit, max_procs=max_procs, file_size_mb=file_size_mb,
                           max_files=max_files, disk_mb=disk_mb)
        self._pool: WorkerPool | None = None
        self._level: str | None = None
        self._host_tmp: str | None = None
        self._lock = threading.Lock()

    # pickling carries the configuration only
    def __getstate__(self):
        return {"workers": self.workers, "requested_isolation": self.requested_isolation, "limits": self.limits}

    def __setstate__(self, state):
        self.__init__(state["workers"], isolation=state["requested_isolation"], **state["limits"])

    @property
    def isolation(self) -> str:
        """The isolation level in force: "bubblewrap" or "rlimits"."""
        if self._level is None:
            if self.requested_isolation == "auto":
                self._level = isolation_level()
            elif self.requested_isolation == "bubblewrap" and isolation_level() != "bubblewrap":
                raise RuntimeError(f"bubblewrap isolation requested but unavailable: {_LEVEL_CACHE.get('why')}")
            else:
                self._level = self.requested_isolation
        return self._level

    def _worker_config(self, level: str) -> dict:
        root = os.geteuid() == 0
        if level == "bubblewrap":
            base = "/tmp/runs"
        else:
            if self._host_tmp is None:
                self._host_tmp = tempfile.mkdtemp(prefix="merge-distill-sandbox-")
                os.chmod(self._host_tmp, 0o711)  # uid 65534 may enter its own run dir, not list
                self._tmp_finalizer = weakref.finalize(self, shutil.rmtree, self._host_tmp, True)
            base = self._host_tmp
        return {
            "pid_namespace": level == "bubblewrap",
            "drop_uid": root,
            "workdir_base": base,
            "output_limit": self.limits["output_limit"],
            "max_procs": self.limits["max_procs"],
            "file_size_mb": self.limits["file_size_mb"],
            "max_files": self.limits["max_files"],
        }

    def _spawn_worker(self) -> FramedWorker:
        return _spawn_sandbox_worker(self.isolation, self._worker_config(self.isolation), self.limits["disk_mb"])

    def _ensure_pool(self) -> WorkerPool:
        if self._pool is None:
            self.isolation  # resolve (and probe) before the first spawn
            self._pool = WorkerPool(self._spawn_worker, self.workers)
        return self._pool

    def run(self, programs: list[str], timeout_s: float = 3.0, memory_mb: int = 1024) -> list[RunResult]:
        """Run each program (Python source) to completion, in parallel over the workers."""
        if not programs:
            return []
        with self._lock:
            pool = self._ensure_pool()
        requests = [{"source": p, "timeout": float(timeout_s), "memory_mb": int(memory_mb)} for p in programs]

        def lost(req: dict, why: str, stderr: str) -> dict:
            if why == "died":  # the program took its worker down (e.g. killed its parent)
                return {"status": "killed", "returncode": None, "stdout": "", "exception": "",
                        "phase": "", "stderr": "sandbox worker died while running the program",
                        "duration": req["timeout"]}
            if why == "deadline":
                return {"status": "timeout", "returncode": None, "stdout": "", "exception": "",
                        "phase": "", "stderr": "sandbox worker missed its deadline", "duration": req["timeout"]}
            return {"status": "sandbox_error", "returncode": None, "stdout": "", "exception": "",
                    "phase": "", "stderr": stderr[-2000:], "duration": 0.0}

        replies = pool.map(requests, lambda r: r["timeout"] + 10.0, lost)
        return [RunResult(**{k: reply.get(k, "") for k in RunResult.__dataclass_fields__}) for reply in replies]

    def close(self) -> None:
        """Stop the workers and remove every temporary file. Idempotent."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if self._host_tmp is not None:
                self._tmp_finalizer()  # removes the directory, once
                self._host_tmp = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _spawn_sandbox_worker(level: str, cfg: dict, disk_mb: int) -> FramedWorker:
    exe, _ = _python_install()
    tail = ["-I", "-S", "-c", _worker_source(), "--sandbox-worker", json.dumps(cfg)]
    if level == "bubblewrap":
        argv = _bwrap_argv(shutil.which("bwrap") or "bwrap", disk_mb) + tail
        env = {"PATH": "/usr/bin:/bin"}
    else:
        argv = [exe] + tail
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return FramedWorker(argv, env=env)


def isolation_level() -> str:
    """The strongest isolation that works here: "bubblewrap" or "rlimits" (probed once, cached).

    Bubblewrap must pass a self-test: a worker starts, and a program runs, comes back "ok", can
    import from the standard library and cannot see this file (the project).
    """
    if "level" in _LEVEL_CACHE:
        return _LEVEL_CACHE["level"]
    level, why = "rlimits", "bwrap not found"
    if sys.platform.startswith("linux") and shutil.which("bwrap"):
        probe = Sandbox(1, isolation="rlimits")
        probe._level = "bubblewrap"
        try:
            here = os.path.abspath(__file__)
            check = (f"import os, threading, xml.dom.minidom\nassert not os.path.exists({here!r})\n"
                     "print('sandbox-ok')")
            result = probe.run([check], timeout_s=10)[0]
            if result.status == "ok" and "sandbox-ok" in result.stdout:
                level, why = "bubblewrap", ""
            else:
                why = f"bwrap self-test failed: {result.status} {result.stderr[-500:]}"
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable
            why = f"bwrap self-test failed: {exc}"
        finally:
            probe.close()
    _LEVEL_CACHE.update(level=level, why=why)
    return level
