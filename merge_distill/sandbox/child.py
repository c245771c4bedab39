"""The forked child of a sandbox worker: isolate, then run one program to its end.

Standard library only: it runs inside the sandbox, shipped with :mod:`merge_distill.sandbox.worker`,
which forks the child and calls :func:`run_child`. The design, and what counts as success, are
described in :mod:`merge_distill.sandbox`.
"""

from __future__ import annotations

import os
import signal
import sys

NOBODY = 65534
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


_LIBC: list = []


def prctl(option: int, arg: int) -> None:
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


def run_child(req: dict, cfg: dict, workdir: str, out_w: int, err_w: int, status_w: int, nonce: str):
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
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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

