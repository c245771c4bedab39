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

Where bwrap is missing or fails its self-test, a sandbox that asks for bubblewrap (the default) runs
nothing: it raises :class:`IsolationUnavailable`, one line saying how to install bubblewrap and how to
opt out. The opt-out is ``"rlimits"`` isolation, only ever used when asked for (``--isolation rlimits``,
``isolation: rlimits`` in a recipe, ``Sandbox(isolation="rlimits")``): the same worker and child
protocol as plain processes (setsid, rlimits, uid 65534 when root, subreaper cleanup) but no
namespaces: the network and the file system stay visible to the extent the uid allows.
:func:`isolation_level` says what works here; :func:`require_isolation` checks a level before any
program runs.

Programs see only the standard library (no site-packages: nothing of a virtualenv or the
project is mounted). Other known limits: ``RLIMIT_NPROC`` counts every process of uid 65534 on
the host, so one fork bomb can starve threads in programs running beside it; as root the sandbox
has no user namespace, so a program may still create one of its own (it gains nothing outside);
under rlimits without root, programs run as the caller's uid.

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

from merge_distill.sandbox.policy import (
    LEVELS,
    STATUSES,
    IsolationUnavailable,
    RunResult,
    Sandbox,
    isolation_level,
    isolation_note,
    require_isolation,
)
from merge_distill.sandbox.pool import FramedWorker, WorkerPool, read_frame, write_frame

__all__ = ["LEVELS", "STATUSES", "FramedWorker", "IsolationUnavailable", "RunResult", "Sandbox", "WorkerPool",
           "isolation_level", "isolation_note", "read_frame", "require_isolation", "write_frame"]
