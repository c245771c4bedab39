"""Write the lock file: `python scripts/constraints.py > constraints.txt`, run with the Python of a venv the
test suite passed in. One `name==version` line for every distribution installing merge-distill with its extras
(but vllm, whose environment keeps its own pins: scripts/setup_vllm.sh) pulls in, as that venv has it; torch,
which scripts/setup.sh installs first from its own pinned line, and merge-distill itself are left out."""

import platform
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "hf", "gguf", "trackers", "benchmarks", "reasoning-gym")
LEFT_OUT = {"merge-distill", "torch"}


def installed_closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """name -> installed version of `root[extras]` and everything it requires, transitively (requirements whose
    markers do not hold here, and ones not installed, are skipped)."""
    found: dict[str, str] = {}
    wanted: dict[str, set[str]] = {}
    todo = [(root, set(extras))]
    while todo:
        name, extras_of = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and extras_of <= wanted[key]:
            continue
        found[key] = dist.version
        wanted.setdefault(key, set()).update(extras_of)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras_of or {""}):
                continue
            todo.append((req.name, set(req.extras)))
    return found


def main() -> None:
    pins = {k: v for k, v in installed_closure("merge-distill", EXTRAS).items() if k not in LEFT_OUT}
    print(f"# pip constraints: the versions the test suite passed on (Python {platform.python_version()}, "
          f"{platform.machine()}). Written by scripts/constraints.py; used by scripts/setup.sh")
    print(f"# (pip install -c constraints.txt ...). merge-distill[{','.join(EXTRAS)}] and what it requires, but torch.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    sys.exit(main())
