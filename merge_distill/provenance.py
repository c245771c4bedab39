"""Where a result was made: the software versions and the processor, recorded beside what they produced (the zoo's
`zoo.json`, a run's `report.json` and `run.json`, the model card).

The same code, seed and library versions give other weights on another CPU: the kernels torch picks for the
processor's vector instructions (AVX2 or AVX-512) and the number of threads change the order of floating-point
sums, and a training run amplifies the last bits. So a figure is only reproducible exactly on a processor with the
same instruction set, at the same thread count; `provenance()` says which one made it.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# the x86 vector extensions that change which kernels torch runs, widest first: (name, the cpuinfo flag)
VECTOR_EXTENSIONS = (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"))
PACKAGES = ("merge-distill", "torch", "transformers")


def provenance() -> dict:
    """The Python, merge-distill, torch and transformers versions, the CPU's model and widest vector extension,
    the kernels torch dispatches to on it, its intra-op threads, and the CUDA device (None without one). Reads
    state only: no random draw, no thread setting, nothing the run computes changes."""
    import torch

    cpu = cpu_info(CPUINFO.read_text() if CPUINFO.is_file() else "")
    return {
        "python": platform.python_version(),
        **{name.replace("-", "_"): package_version(name) for name in PACKAGES},
        "cpu": cpu["model"] or platform.processor() or platform.machine(),
        "cpu_instruction_set": cpu["instruction_set"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None where it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_info(cpuinfo: str) -> dict:
    """The processor's `model` (the first `model name` of /proc/cpuinfo's text; None where it has none, as on many
    ARM machines) and its widest x86 vector extension (`instruction_set`: AVX-512, AVX2, AVX, or None) from the
    first `flags` line."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    widest = next((name for name, flag in VECTOR_EXTENSIONS if flag in flags), None)
    return {"model": fields.get("model name") or None, "instruction_set": widest}

