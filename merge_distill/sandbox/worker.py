"""The sandbox worker: the one program shipped into bubblewrap (or run as a plain process).

Standard library only, and one file: the host starts it as
``python -I -S -c <this file's source> --sandbox-worker <config json>`` (see
``merge_distill.sandbox.policy._worker_source``), where nothing of merge_distill or of
site-packages can be imported. The host imports this module too, for the framing
(:func:`write_frame`, :func:`read_frame`); being standard library only, that is harmless.

The design, and what counts as success, are described in :mod:`merge_distill.sandbox`.
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
