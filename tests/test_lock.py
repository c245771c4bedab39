"""The lock file: constraints.txt pins every package merge-distill and its extras (but vllm) install, at the
versions of the environment the tests run in, which scripts/setup.sh installs from it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> dict[str, str]:
    return dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))


def test_constraints_txt_is_this_environments_versions():
    """What scripts/constraints.py writes here is what constraints.txt holds: a package the project installs is
    not missing from the lock, and the tests ran on the locked versions. Fails where the venv was installed without
    `-c constraints.txt` or a package was upgraded since: reinstall with it, or write the lock again
    (`python scripts/constraints.py > constraints.txt`) once the suite passes."""
    written = subprocess.run([sys.executable, str(ROOT / "scripts" / "constraints.py")], capture_output=True,
                             text=True, check=True).stdout
    locked, here = pins((ROOT / "constraints.txt").read_text()), pins(written)
    assert {"transformers", "tokenizers", "numpy", "pytest"} <= set(locked) and "torch" not in locked
    assert {k: (locked.get(k), here.get(k)) for k in locked.keys() | here.keys() if locked.get(k) != here.get(k)} \
        == {}, "(constraints.txt, this venv)"
