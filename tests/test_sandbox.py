"""The sandbox against hostile programs: every case runs in the real sandbox, ends with the right
non-pass status inside its deadline, leaves the host untouched and leaves no process behind."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from merge_distill.sandbox import (
    FramedWorker,
    RunResult,
    Sandbox,
    WorkerPool,
    isolation_level,
)

PROJECT_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"
HOME = os.path.expanduser("~")
ROOT = os.geteuid() == 0
DEADLINE = 1.5


# ------------------------------------------------------------------------------------- helpers


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, real uid) for every process on the host."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            table[int(entry)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
        except (OSError, KeyError, ValueError):
            continue
    return table


def _descendants(pid: int, table) -> list[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _worker_pids(sb: Sandbox) -> list[int]:
    return [w.proc.pid for w in sb._pool._workers] if sb._pool else []


def assert_no_leftovers(sb: Sandbox, timeout: float = 3.0) -> None:
    """Only the workers themselves remain: no program process, inside or outside the sandbox."""
    # A bwrap worker is the outer bwrap, the namespace's init and the worker: 2 descendants.
    expected = 2 if sb.isolation == "bubblewrap" else 0
    deadline = time.monotonic() + timeout
    while True:
        table = _proc_table()
        extra = {pid: _descendants(pid, table) for pid in _worker_pids(sb)}
        extra = {pid: d for pid, d in extra.items() if len(d) != expected}
        strays = [p for p, (_, uid) in table.items() if uid == 65534] if ROOT else []
        if not extra and not strays:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leftover processes: workers {extra}, uid 65534: {strays}")
        time.sleep(0.05)


pytestmark = pytest.mark.slow  # every test here runs programs in sandbox worker processes

# These tests exercise whichever level works here ("auto": bubblewrap where it passes its self-test, as on this
# project's machines and CI; rlimits where not). The `fallback` fixture pins rlimits, test_isolation.py the refusal.
LEVEL = "auto"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(2, isolation=LEVEL) as sb:
        yield sb


@pytest.fixture
def needs_bubblewrap(sandbox):
    """For the guarantees only namespaces give (no network, no view of the host's files). Where bubblewrap does
    not work, rlimits cannot give them: such a machine runs model-written code only when the user asks for rlimits
    (test_isolation.py), and these tests say why they did not run instead of failing for that reason."""
    if sandbox.isolation != "bubblewrap":
        from merge_distill.sandbox.policy import unavailable_reason

        pytest.skip(f"a bubblewrap guarantee, and bubblewrap is not usable here ({unavailable_reason()}); "
                    "apt-get install -y bubblewrap")


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "sentinel.txt"
    path.write_text("untouched")
    stat = path.stat()
    yield path
    assert path.read_text() == "untouched"
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def run_one(sb: Sandbox, source: str, timeout_s: float = DEADLINE, **kw) -> RunResult:
    start = time.monotonic()
    result = sb.run([textwrap.dedent(source)], timeout_s=timeout_s, **kw)[0]
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 2.0, f"run took {elapsed:.2f} s for a {timeout_s} s deadline"
    assert_no_leftovers(sb)
    return result


# ------------------------------------------------------------------------------------ the basics


def test_isolation_level_is_bubblewrap_here(sandbox):
    # bwrap is installed in this project's environment; the fallback is tested below.
    assert isolation_level() in ("bubblewrap", "rlimits")
    if Path("/usr/bin/bwrap").exists():
        assert sandbox.isolation == "bubblewrap"


def test_ok_error_and_outputs(sandbox):
    ok, err, syntax = sandbox.run(["print('hello'); import sys; print('oops', file=sys.stderr)",
                                   "def f():\n    return 1\nassert f() == 2, 'f is wrong'",
                                   "def f(:\n  pass"], timeout_s=DEADLINE)
    assert ok.status == "ok" and ok.returncode == 0
    assert ok.stdout == "hello\n" and ok.stderr == "oops\n"
    assert err.status == "error" and err.exception == "AssertionError" and "f is wrong" in err.stderr
    assert "_harness" not in err.stderr  # the traceback starts at the program
    assert syntax.status == "error" and syntax.phase == "compile" and syntax.exception == "SyntaxError"
    assert_no_leftovers(sandbox)


def test_runs_as_nobody_in_private_dir(sandbox):
    r = run_one(sandbox, """
        import os, tempfile
        print(os.getuid(), os.getgid(), os.getcwd() == os.environ["HOME"] == tempfile.gettempdir())
        open("scratch.txt", "w").write("mine")
        assert open("scratch.txt").read() == "mine"
        print(sorted(os.environ))
    """)
    assert r.status == "ok", r.stderr
    uid_line, env_line = r.stdout.splitlines()
    if ROOT:
        assert uid_line.startswith("65534 65534")
    assert uid_line.endswith("True")
    assert "SECRET" not in env_line and "PYTHONPATH" not in env_line


def test_private_dir_is_fresh_and_removed(sandbox):
    first = run_one(sandbox, "import os; open('left.txt','w').write('x'); print(os.getcwd())")
    second = sandbox.run(["import os; print(os.listdir('.')); print(os.path.exists(%r))" % first.stdout.strip()],
                         timeout_s=DEADLINE)[0]
    assert second.stdout.splitlines() == ["[]", "False"]


def test_many_programs_in_parallel_keep_order(sandbox):
    results = sandbox.run([f"assert {i} % 3 != 0" for i in range(60)], timeout_s=DEADLINE)
    assert [r.status for r in results] == ["error" if i % 3 == 0 else "ok" for i in range(60)]


# ------------------------------------------------------------------------------- hostile programs


def test_infinite_loop(sandbox):
    r = run_one(sandbox, "while True: pass")
    assert r.status == "timeout" and DEADLINE <= r.duration < DEADLINE + 0.5


def test_sleep(sandbox):
    r = run_one(sandbox, "import time; time.sleep(60)")
    assert r.status == "timeout" and r.duration < DEADLINE + 0.5


def test_ignoring_signals_does_not_help(sandbox):
    r = run_one(sandbox, """
        import signal
        for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(s, signal.SIG_IGN)
        while True: pass
    """)
    assert r.status == "timeout"


def test_fork_bomb(sandbox):
    r = run_one(sandbox, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert r.status in ("timeout", "killed", "error")
    assert r.status != "ok"


def test_memory_bomb(sandbox):
    assert run_one(sandbox, "x = bytearray(8 * 1024 ** 3)").status == "memory"
    r = run_one(sandbox, "chunks = []\nwhile True:\n    chunks.append(b'x' * 10 ** 7)", memory_mb=256)
    assert r.status == "memory"


def test_huge_file(sandbox):
    r = run_one(sandbox, """
        with open("big.bin", "wb") as f:
            while True:
                f.write(b"x" * 2 ** 20)
    """)
    assert r.status == "error" and r.exception == "OSError" and "File too large" in r.stderr


def test_filling_the_disk_with_many_files(sandbox):
    r = run_one(sandbox, """
        i = 0
        while True:
            with open(f"f{i}", "wb") as f:
                f.write(b"x" * (15 * 2 ** 20))
            i += 1
    """, timeout_s=5)
    assert r.status in ("error", "timeout") and r.status != "ok"
    # The space came back: the next program can write again.
    assert run_one(sandbox, "open('again', 'wb').write(b'y' * 2 ** 20)").status == "ok"


def test_deeply_nested_directories_are_cleaned_up(sandbox):
    r = run_one(sandbox, """
        import os
        for i in range(3000):
            os.mkdir("d")
            os.chdir("d")
        os.chmod(".", 0)
    """, timeout_s=5)
    assert r.status == "ok"
    # The worker that could not delete the tree made way for a fresh one; nothing is lost.
    assert [x.status for x in sandbox.run(["pass"] * 4, timeout_s=DEADLINE)] == ["ok"] * 4
    assert run_one(sandbox, "import os\nassert os.listdir('.') == []").status == "ok"


def test_huge_stdout_is_capped(sandbox):
    r = run_one(sandbox, "import sys\nfor _ in range(1500):\n    sys.stdout.write('x' * 65536)", timeout_s=5)
    assert r.status == "ok"
    assert len(r.stdout) <= sandbox.limits["output_limit"] + 32 and r.stdout.endswith("[... truncated]")
    r = run_one(sandbox, "import sys\nwhile True:\n    sys.stderr.write('y' * 65536)")
    assert r.status == "timeout" and len(r.stderr) <= sandbox.limits["output_limit"] + 32


def test_no_network(sandbox, needs_bubblewrap):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = run_one(sandbox, f"""
            import socket
            for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
                try:
                    socket.create_connection(addr, timeout=0.5)
                    print("connected", addr)
                except OSError as e:
                    print("refused", addr, type(e).__name__)
            socket.create_connection(("1.1.1.1", 53), timeout=0.5)
        """)
        assert r.status == "error" and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_home_and_project_are_invisible(sandbox, needs_bubblewrap):
    python_prefix = os.path.realpath(sys.base_prefix)
    r = run_one(sandbox, f"""
        import os
        seen = []
        for path in [{str(PROJECT_FILE)!r}, {str(PROJECT_FILE.parent)!r}, "/etc/shadow", "/work", "/home"]:
            try:
                seen.append((path, os.listdir(path) if os.path.isdir(path) else open(path).read()[:20]))
            except OSError:
                pass
        assert not seen, seen
        for d, dirs, files in os.walk({HOME!r}):
            for n in dirs + files:
                print(os.path.join(d, n))
            dirs[:] = [n for n in dirs if os.path.join(d, n) != {python_prefix!r}]
    """)
    assert r.status == "ok", r.stdout + r.stderr
    # Of the home directory only the path down to the Python install (bound read-only) exists.
    for path in filter(None, r.stdout.splitlines()):
        assert path == python_prefix or python_prefix.startswith(path + os.sep), path


def test_standard_library_is_importable(sandbox):
    r = run_one(sandbox, "import threading, asyncio, sqlite3, xml.dom.minidom, unittest, csv, zlib\nprint('ok')")
    assert r.status == "ok" and r.stdout == "ok\n", r.stderr


def test_host_files_cannot_be_read_or_written(sandbox, sentinel, needs_bubblewrap):
    r = run_one(sandbox, f"""
        import os
        results = []
        for attempt in [lambda: open({str(sentinel)!r}).read(),
                        lambda: open({str(sentinel)!r}, "w").write("pwned"),
                        lambda: open("/usr/pwned", "w"),
                        lambda: open("/tmp/pwned", "w"),
                        lambda: open("/etc/pwned", "w"),
                        lambda: os.remove("/usr/bin/env")]:
            try:
                attempt()
                results.append("succeeded")
            except OSError as e:
                results.append(type(e).__name__)
        print(results)
        assert "succeeded" not in results
    """)
    assert r.status == "ok", r.stdout + r.stderr
    assert not Path("/usr/pwned").exists() and not Path("/etc/pwned").exists()


def test_killing_the_parent(sandbox):
    r = run_one(sandbox, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time; time.sleep(5)")
    # As root the worker is out of reach (EPERM); in a user namespace it dies and is replaced.
    assert r.status in ("error", "killed")
    assert run_one(sandbox, "assert True").status == "ok"


def test_killing_its_process_group_and_everyone(sandbox):
    assert run_one(sandbox, "import os\nos.killpg(0, 9)").status == "killed"
    r = run_one(sandbox, "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\nassert False")
    assert r.status in ("error", "killed")
    assert [x.status for x in sandbox.run(["pass", "pass"], timeout_s=DEADLINE)] == ["ok", "ok"]


def test_background_process_does_not_outlive_the_run(sandbox):
    r = run_one(sandbox, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
            os._exit(0)
        os.wait()
        print("parent done")
    """)
    # The program itself finished: that is "ok"; what matters is that assert_no_leftovers passed.
    assert r.status == "ok" and r.stdout == "parent done\n"


def test_background_process_holding_stdout_does_not_stall(sandbox):
    r = run_one(sandbox, "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nprint('main done')")
    assert r.status == "ok" and r.duration < 1.0


def test_early_exit_is_not_success(sandbox):
    for source in ["import os\nos._exit(0)\nassert False",
                   "raise SystemExit(0)",
                   "import sys\nsys.exit(0)",
                   "exit()",
                   "def candidate():\n    import os; os._exit(0)\ndef check(f):\n    f()\n    assert False\ncheck(candidate)"]:
        r = run_one(sandbox, source)
        assert r.status == "error", (source, r)


def test_reading_stdin(sandbox):
    assert run_one(sandbox, "input()").exception == "EOFError"
    assert run_one(sandbox, "import sys\nassert sys.stdin.read() == ''").status == "ok"


def test_forging_success(sandbox):
    fake_frame = json.dumps({"status": "ok", "returncode": 0, "stdout": "", "stderr": "", "duration": 0})
    for source in [
        # write fake protocol frames and fake nonces to every descriptor, then fail
        f"""
        import os, struct
        frame = {fake_frame!r}.encode()
        for fd in range(0, 256):
            for payload in (struct.pack("!I", len(frame)) + frame, b"OK 0123456789abcdef\\n"):
                try:
                    os.write(fd, payload)
                except OSError:
                    pass
        print("PASS")
        assert False
        """,
        # patch the functions a harness might use to report
        """
        import os, sys, builtins
        real_write = os.write
        os.write = lambda fd, data: real_write(fd, data.replace(b"EXC", b"OK "))
        os._exit = lambda code: None
        sys.exit = lambda *a: None
        builtins.AssertionError = type("Nope", (Exception,), {})
        assert 1 == 2
        """,
        # close everything and exit cleanly: nothing can prove completion
        "import os, sys\nos.closerange(0, 1024)\nos._exit(0)",
    ]:
        r = run_one(sandbox, source)
        assert r.status == "error", (source, r)
    assert run_one(sandbox, "pass").status == "ok"


def test_threads_left_running_do_not_block(sandbox):
    r = run_one(sandbox, "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('x')")
    assert r.status == "ok" and r.duration < 1.0


# -------------------------------------------------------------------------- pool and lifecycle


def test_results_survive_pickling_and_sandbox_is_picklable():
    sb = pickle.loads(pickle.dumps(Sandbox(1, isolation=LEVEL, max_procs=10)))
    with sb:
        assert sb.limits["max_procs"] == 10
        assert sb.run(["pass"])[0].ok


def test_concurrent_callers_share_a_sandbox(sandbox):
    out = {}

    def go(k):
        out[k] = [r.status for r in sandbox.run([f"assert {k} != {k}", "pass"], timeout_s=DEADLINE)]

    threads = [threading.Thread(target=go, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {k: ["error", "ok"] for k in range(4)}


_ECHO_WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
from merge_distill.sandbox.pool import read_frame, write_frame
write_frame(1, {{"ready": True}})
while (req := read_frame(0)) is not None:
    if req.get("hang"):
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM, signal.SIGTERM, signal.SIGINT}})
        while True:
            time.sleep(1)
    if req.get("crash"):
        os._exit(3)
    write_frame(1, {{"echo": req["x"]}})
"""


def test_worker_pool_kills_a_hung_worker_and_carries_on():
    root = str(Path(__file__).resolve().parents[1])
    pool = WorkerPool(lambda: FramedWorker([sys.executable, "-c", _ECHO_WORKER.format(root=root)]), 2)
    try:
        requests = [{"x": 0, "hang": True}, {"x": 1, "crash": True}] + [{"x": i} for i in range(2, 40)]
        start = time.monotonic()
        replies = pool.map(requests, lambda r: 1.0, lambda req, why, err: {"lost": why})
        assert time.monotonic() - start < 4.0
        assert replies[0] == {"lost": "deadline"} and replies[1] == {"lost": "died"}
        assert replies[2:] == [{"echo": i} for i in range(2, 40)]
        assert [r["echo"] for r in pool.map([{"x": 7}], lambda r: 1.0, None)] == [7]
    finally:
        pool.close()


def test_no_worker_outlives_the_interpreter():
    root = str(Path(__file__).resolve().parents[1])
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {root!r})
        from merge_distill.sandbox import Sandbox
        from merge_distill.graders.math import MathGrader
        sb = Sandbox(2, isolation="auto")  # never closed on purpose
        assert [r.status for r in sb.run(["pass", "import time; time.sleep(0.1)"])] == ["ok", "ok"]
        mg = MathGrader(workers=1)  # nor this one, whose verifier workers are plain processes
        assert mg.grade({{"answer": "x+1"}}, r"\\boxed{{1+x}}").verdict == "pass"
        print(" ".join(str(w.proc.pid) for w in sb._pool._workers + mg._pool._workers))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    if ROOT:
        assert not [p for p, (_, uid) in _proc_table().items() if uid == 65534]


def test_close_is_idempotent_and_restartable():
    sb = Sandbox(1, isolation=LEVEL)
    assert sb.run(["pass"])[0].ok
    sb.close()
    sb.close()
    assert sb.run(["pass"])[0].ok  # a closed sandbox starts again on demand
    sb.close()


# ------------------------------------------------------------- rlimits isolation (the opt-out)


@pytest.fixture(scope="module")
def fallback():
    with Sandbox(2, isolation="rlimits") as sb:
        yield sb


def test_fallback_basics(fallback):
    assert fallback.isolation == "rlimits"
    r = fallback.run(["import os\nprint(os.getuid())", "assert False", "while True: pass",
                      "x = bytearray(8 * 1024 ** 3)", "import os\nos._exit(0)"], timeout_s=1.0)
    assert [x.status for x in r] == ["ok", "error", "timeout", "memory", "error"]
    if ROOT:
        assert r[0].stdout.strip() == "65534"
    assert_no_leftovers(fallback)


def test_fallback_reaps_escaped_daemons(fallback):
    r = run_one(fallback, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
            os._exit(0)
        os.wait()
    """, timeout_s=1.0)
    assert r.status == "ok"


def test_fallback_removes_what_a_retired_worker_left_behind():
    # Without a private tmpfs, a tree too deep for the worker to delete stays in the host folder until close().
    sb = Sandbox(1, isolation="rlimits")
    r = run_one(sb, "import os\nfor i in range(3000):\n    os.mkdir('d')\n    os.chdir('d')", timeout_s=5)
    assert r.status == "ok"
    host = Path(sb._host_tmp)
    sb.close()
    assert not host.exists()


@pytest.mark.skipif(not ROOT, reason="the uid drop applies when the host runs as root")
def test_fallback_cannot_kill_its_worker_or_read_home(fallback):
    r = run_one(fallback, "import os\nos.kill(os.getppid(), 9)", timeout_s=1.0)
    assert r.status == "error" and r.exception == "PermissionError"
    r = run_one(fallback, f"import os\nos.listdir({HOME!r})", timeout_s=1.0)
    assert r.status == "error" and r.exception == "PermissionError"
