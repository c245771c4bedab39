"""The sandbox policy: isolation levels, the bubblewrap command line, :class:`Sandbox`, :class:`RunResult`.

What runs inside is :mod:`merge_distill.sandbox.worker` (with :mod:`~merge_distill.sandbox.child` and
:mod:`~merge_distill.sandbox.framing`); the processes are managed by
:mod:`merge_distill.sandbox.pool`. The design is described in :mod:`merge_distill.sandbox`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass

from merge_distill.errors import UserError
from merge_distill.sandbox import child as _child
from merge_distill.sandbox import framing as _framing
from merge_distill.sandbox import worker as _worker
from merge_distill.sandbox.pool import FramedWorker, WorkerPool

STATUSES = ("ok", "error", "timeout", "memory", "killed", "sandbox_error")
LEVELS = ("bubblewrap", "rlimits")  # the isolation levels a user may ask for (see `require_isolation`)
INSTALL_HINT = "apt-get install -y bubblewrap"
OPT_OUT_HINT = "--isolation rlimits (in a recipe: isolation: rlimits)"


class IsolationUnavailable(UserError):
    """Bubblewrap isolation was asked for (the default) but does not work here. One line: why, how to install
    bubblewrap, and how to opt out."""


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
    """The program shipped to every worker: the worker module run as ``__main__``.

    Nothing of merge_distill is importable inside the sandbox, so the program first installs the
    worker's two standard-library-only imports in ``sys.modules`` under their own names, from their
    files read as they are.
    """

    def read(module) -> str:
        with open(module.__file__, encoding="utf-8") as f:
            return f.read()

    imports = [(module.__name__, read(module)) for module in (_framing, _child)]
    return ("import sys, types\n"
            f"for _name, _source in {imports!r}:\n"
            f"    _module = sys.modules[_name] = types.ModuleType(_name)\n"
            f"    exec(compile(_source, _name, 'exec'), _module.__dict__)\n"
            f"exec(compile({read(_worker)!r}, {_worker.__name__!r}, 'exec'))\n")


_LEVEL_CACHE: dict[str, str] = {}
_NOT_FOUND = "bwrap not found"


class Sandbox:
    """A pool of warm, isolated workers that run untrusted Python programs.

    >>> with Sandbox() as sb:
    ...     [r.status for r in sb.run(["assert 1 + 1 == 2", "assert False"], timeout_s=2)]
    ['ok', 'error']

    ``isolation``: "bubblewrap" (the default: :class:`IsolationUnavailable` when it does not work here),
    "rlimits" (no namespaces; asked for explicitly) or "auto" (bubblewrap when it works, else rlimits: for
    callers that report the level they got, such as the sandbox's own tests and benchmark). Limits that
    apply to every program: ``output_limit`` bytes kept of stdout and of stderr, ``max_procs`` processes/threads of uid 65534 (RLIMIT_NPROC),
    ``file_size_mb`` per written file, ``max_files`` open descriptors, ``disk_mb`` for the whole
    private /tmp of a worker (bubblewrap only). Per call: wall-clock ``timeout_s`` and ``memory_mb``
    of address space. Cheap to construct and picklable; workers start on first use.
    """

    def __init__(self, workers: int | None = None, *, isolation: str = "bubblewrap", output_limit: int = 64 * 1024,
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
            else:
                self._level = require_isolation(self.requested_isolation)
        return self._level

    def _worker_config(self, level: str) -> dict:
        root = os.geteuid() == 0
        if level == "bubblewrap":
            base = "/tmp/runs"
        else:
            if self._host_tmp is None:
                self._host_tmp = tempfile.mkdtemp(prefix="merge-distill-sandbox-")
                os.chmod(self._host_tmp, 0o711)  # uid 65534 may enter its own run dir, not list
                self._tmp_finalizer = weakref.finalize(self, _remove_tree, self._host_tmp)
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


def _remove_tree(path: str) -> None:
    """Remove an rlimits sandbox's host directory, whatever its programs left there (a worker that could not
    clean up after a program retires, leaving it, e.g. directories nested deeper than Python's recursion limit)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["/bin/rm", "-rf", "--", path], check=False, capture_output=True)


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
    level, why = "rlimits", _NOT_FOUND
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
                why = f"bwrap self-test failed: {result.status} {_last_line(result.stderr)}".rstrip()
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable
            why = f"bwrap self-test failed: {_last_line(str(exc)) or type(exc).__name__}"
        finally:
            probe.close()
    _LEVEL_CACHE.update(level=level, why=why)
    return level


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def unavailable_reason() -> str:
    """Why bubblewrap is not usable here ("" when it is); probes like :func:`isolation_level`."""
    isolation_level()
    return _LEVEL_CACHE.get("why", "")


def require_isolation(level: str, opt_out: str = OPT_OUT_HINT) -> str:
    """`level` ("bubblewrap" or "rlimits") when model-written code may run under it here.

    Asking for bubblewrap where it is missing or fails its self-test raises :class:`IsolationUnavailable`,
    one line that says why, how to install it and how to opt out (`opt_out` names the switch); rlimits
    is always available, and is only ever used when asked for.
    """
    if level not in LEVELS:
        raise ValueError(f"isolation must be {' or '.join(LEVELS)}, not {level!r}")
    if level == "bubblewrap" and isolation_level() != "bubblewrap":
        why = unavailable_reason()
        fix = (f"install it ({INSTALL_HINT})" if why == _NOT_FOUND else
               f"make it work (it needs unprivileged user namespaces unless run as root; {INSTALL_HINT} installs it)")
        raise IsolationUnavailable(
            f"model-written code runs only inside bubblewrap, which is not usable here ({why}): "
            f"{fix}, or opt out with {opt_out} to run code under rlimits alone "
            "(no namespaces: programs can read what this user can and reach the network)")
    return level


def isolation_note(level: str) -> str:
    """The line printed under a table with code results: the isolation the code ran under."""
    if level == "rlimits":
        return ("isolation: rlimits (asked for: no namespaces, programs could read this user's files and reach "
                "the network)")
    return f"isolation: {level}"
