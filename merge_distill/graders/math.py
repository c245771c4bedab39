"""Math grader: extract the final answer from model text, compare it with the reference.

Extraction (:func:`extract_answer`), first that applies:

1. the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` too),
2. the last "answer is X" / "Answer: X" / "final answer = X" (to the end of its line),
3. the last number in the text.

Comparison, cheapest first:

1. in-process: the normalised strings are equal -> pass; both are plain integers and differ ->
   fail; both are exact rationals (``3``, ``0.5``, ``1/2``, ``\\frac{1}{2}``) and equal -> pass;
2. otherwise math-verify (``parse`` + ``verify``) in a pool of worker processes, each item under a
   hard wall-clock deadline. math-verify's own timeouts use SIGALRM, which only works in a main
   thread and cannot interrupt long C-level work (a giant power tower, say), so a worker that
   misses the deadline is killed and replaced: the item is "timeout", the others in the batch
   are graded by the remaining workers meanwhile.

Verdicts: "pass", "fail" (including "no answer found"), "timeout", "sandbox_error" (a verifier
worker failed for a reason other than time).
"""

from __future__ import annotations

import os
import re
import sys
from fractions import Fraction

from merge_distill.errors import UserError
from merge_distill.graders.base import GraderBase, Verdict
from merge_distill.sandbox.pool import FramedWorker, WorkerPool

# ---------------------------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"(?i)\b(?:final\s+answer|answer)\s*(?:is\b|:|=)\s*[:=]?\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")


def _braced(text: str, open_at: int) -> str | None:
    """Content of the balanced {...} whose '{' is at `open_at`; None if it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # \{ and \} are literal braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1: i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOX.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced(text, rest)
            if content is not None:
                return content.strip()
        elif rest > match.end():  # "\boxed 5": one token
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def _clean_tail(answer: str) -> str:
    answer = answer.strip().strip("*").strip()
    if answer.startswith("$") and answer.count("$") >= 2:
        answer = answer[1: answer.index("$", 1)] if answer[1:2] != "$" else answer.strip("$")
    return answer.rstrip(" .").strip("$ ").strip()


def extract_answer(text: str) -> str | None:
    """The final answer in a model's text, or None if there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        answer = _clean_tail(said[-1])
        boxed = _last_boxed(answer)
        if answer:
            return boxed if boxed is not None else answer
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(" ", "")
    return None


# ------------------------------------------------------------------------------- normalisation

_DROP = re.compile(r"\\left|\\right|\\[,;:! ]|\\displaystyle|\s+")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
_INT = re.compile(r"^[+-]?\d+$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+$")


def normalize(answer: str) -> str:
    """A canonical spelling for exact comparison; conservative so equal means equal."""
    s = str(answer).strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = _TEXT.sub(r"\1", s)
    s = _DROP.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _INT.match(s):
        s = str(int(s)) if len(s) < 4000 else s
    return s


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, a/b or \\frac{a}{b}; None otherwise."""
    m = _FRAC.match(s)
    if m:
        sign, num, den = m.groups()
        value = Fraction(int(num), int(den)) if int(den) else None
        return -value if (value is not None and sign) else value
    if len(s) > 100 or not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def fast_compare(pred: str, gold: str) -> bool | None:
    """True/False when decidable without math-verify, else None."""
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return True
    if _INT.match(p) and _INT.match(g):
        return False
    fp, fg = _as_fraction(p), _as_fraction(g)
    if fp is not None and fg is not None and fp == fg:
        return True
    return None


# ------------------------------------------------------------------- the math-verify worker pool


def _parse_any(text: str, timeout: int):
    """math-verify parse of a bare answer: as \\boxed{}, then $...$, then raw."""
    from math_verify import parse

    for candidate in (f"\\boxed{{{text}}}", f"${text}$", text):
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


def _verify_worker_main() -> None:  # pragma: no cover - runs in a worker process
    """Serve {"pred", "gold", "timeout"} -> {"equal", "detail"} over framed stdin/stdout."""
    import logging
    import resource
    import time
    import warnings
    from functools import lru_cache

    from merge_distill.sandbox.pool import read_frame, write_frame

    rfd, wfd = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(2, 1)  # anything printed by a library lands on stderr, never in the protocol
    limit = int(os.environ.get("MERGE_DISTILL_VERIFY_MEMORY_MB", "4096")) * 1024 * 1024
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    from math_verify import verify

    gold_cache = lru_cache(maxsize=4096)(_parse_any)
    write_frame(wfd, {"ready": True, "pid": os.getpid()})
    while (req := read_frame(rfd)) is not None:
        t = int(req.get("timeout", 5))
        started = time.monotonic()

        def out_of_time() -> bool:  # math-verify reports its own timeouts as "no parse"/False
            return time.monotonic() - started >= t - 0.05

        try:
            gold = gold_cache(req["gold"], t)
            pred = _parse_any(req["pred"], t)
            if not gold or not pred:
                if out_of_time():
                    reply = {"timeout": True, "detail": "parsing timed out"}
                else:
                    which = "reference answer" if not gold else "answer"
                    reply = {"equal": False, "detail": f"{which} did not parse"}
            else:
                started = time.monotonic()
                equal = bool(verify(gold, pred, timeout_seconds=t))
                if not equal and out_of_time():
                    reply = {"timeout": True, "detail": "comparison timed out"}
                else:
                    reply = {"equal": equal, "detail": ""}
        except MemoryError:
            reply = {"equal": False, "detail": "verifier ran out of memory"}
        except Exception as exc:  # noqa: BLE001 - a bad expression is a failed comparison
            reply = {"equal": False, "detail": f"verifier error: {type(exc).__name__}"}
        write_frame(wfd, reply)


def _project_root() -> str:
    import merge_distill

    return os.path.dirname(os.path.dirname(os.path.abspath(merge_distill.__file__)))


def _spawn_verifier() -> FramedWorker:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_project_root(), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-c", "from merge_distill.graders.math import _verify_worker_main as m; m()"]
    return FramedWorker(argv, env=env, ready_timeout=120.0)


# ----------------------------------------------------------------------------------- the grader


class MathGrader(GraderBase):
    """Grade final answers against ``record["answer"]``.

    Options: ``timeout_s`` hard wall-clock limit per math-verify comparison (default 5 s),
    ``workers`` math-verify processes (default min(2, CPUs)); they start on the first comparison
    the fast path cannot decide and are reused; ``close()`` stops them.
    """

    name = "math"

    def __init__(self, timeout_s: float = 5.0, workers: int | None = None):
        if timeout_s <= 0:
            raise UserError(f"math grader: timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.workers = workers or min(2, os.cpu_count() or 1)
        self._pool: WorkerPool | None = None

    def __getstate__(self):
        return {"timeout_s": self.timeout_s, "workers": self.workers}

    def __setstate__(self, state):
        self.__init__(**state)

    def check_record(self, record: dict) -> None:
        answer = record.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise UserError(f"math task {record.get('task_id')!r}: missing 'answer'")

    def grade_many(self, records: list[dict], completions: list[str]) -> list[Verdict]:
        self._check_lengths(records, completions)
        verdicts: list[Verdict | None] = [None] * len(records)
        slow: list[tuple[int, str, str]] = []
        for i, (record, completion) in enumerate(zip(records, completions)):
            self.check_record(record)
            gold = str(record["answer"])
            pred = extract_answer(completion or "")
            if pred is None:
                verdicts[i] = Verdict.of("fail", "no answer found")
                continue
            decided = fast_compare(pred, gold)
            if decided is None:
                slow.append((i, pred, gold))
            else:
                verdicts[i] = Verdict.of("pass" if decided else "fail", f"answer {pred!r}")
        if slow:
            for (i, pred, _), reply in zip(slow, self._verify(slow)):
                verdicts[i] = self._verdict(pred, reply)
        return verdicts  # type: ignore[return-value]

    def _verify(self, items: list[tuple[int, str, str]]) -> list[dict]:
        if self._pool is None:
            self._pool = WorkerPool(_spawn_verifier, self.workers)
        inner = max(1, int(self.timeout_s // 2))
        requests = [{"pred": pred, "gold": gold, "timeout": inner} for _, pred, gold in items]

        def lost(req: dict, why: str, stderr: str) -> dict:
            if why == "deadline":
                return {"verdict": "timeout", "detail": f"comparison exceeded {self.timeout_s:g} s"}
            if why == "died":
                return {"verdict": "fail", "detail": "verifier crashed on this answer"}
            return {"verdict": "sandbox_error", "detail": f"verifier did not start: {stderr}"}

        return self._pool.map(requests, lambda _: self.timeout_s, lost)

    @staticmethod
    def _verdict(pred: str, reply: dict) -> Verdict:
        if "verdict" in reply:
            return Verdict.of(reply["verdict"], reply["detail"])
        if reply.get("timeout"):
            return Verdict.of("timeout", f"answer {pred!r}; {reply['detail']}")
        detail = f"answer {pred!r}" + (f"; {reply['detail']}" if reply.get("detail") else "")
        return Verdict.of("pass" if reply["equal"] else "fail", detail)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"MathGrader(timeout_s={self.timeout_s}, workers={self.workers})"
