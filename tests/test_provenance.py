"""Provenance: the software versions and the processor recorded beside what they made (zoo.json, report.json, the
model card), read from /proc/cpuinfo and the installed packages without changing anything a run computes."""

import json
import platform
from pathlib import Path

import torch
import transformers

from merge_distill.provenance import cpu_info, provenance
from merge_distill.toyworld.zoo import Zoo

# /proc/cpuinfo as an AVX2 machine (the AMD EPYC), an AVX-512 one and an ARM one print it (abridged)
AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
processor\t: 1
model name\t: another model on a second socket
flags\t\t: fpu sse avx avx2 avx512f
"""
AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512vl avx512_bf16 amx_tile
"""
OLD_X86 = "model name\t: Intel(R) Core(TM)2 Duo\nflags\t\t: fpu sse sse2 ssse3\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n"


def test_cpu_info_reads_the_first_model_name_and_the_widest_vector_extension():
    assert cpu_info(AVX2) == {"model": "AMD EPYC 7B13 64-Core Processor", "instruction_set": "AVX2"}
    assert cpu_info(AVX512) == {"model": "Intel(R) Xeon(R) Platinum 8480+", "instruction_set": "AVX-512"}
    assert cpu_info(OLD_X86) == {"model": "Intel(R) Core(TM)2 Duo", "instruction_set": None}
    assert cpu_info(ARM) == {"model": None, "instruction_set": None}


def test_provenance_names_this_machines_software_and_processor():
    record = provenance()
    assert record["python"] == platform.python_version()
    assert (record["torch"], record["transformers"]) == (torch.__version__, transformers.__version__)
    assert record["merge_distill"] == "0.1.0"
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        assert (record["cpu"], record["cpu_instruction_set"]) == tuple(cpu_info(cpuinfo.read_text()).values())
    assert record["cpu"]


def test_provenance_changes_nothing_a_run_computes():
    """No random draw and no thread setting: a zoo built with it recorded gets the same weights as before."""
    torch.manual_seed(7)
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    provenance()
    assert torch.equal(torch.random.get_rng_state(), rng) and torch.get_num_threads() == threads


def test_zoo_json_records_each_members_provenance_and_the_folder_stays_accepted(tmp_path):
    """Each built member's record holds the provenance; `check_built_by_preset` compares `config` alone, so the
    new key neither refuses a folder that has it nor one built before it existed."""
    zoo = Zoo("smoke", directory=str(tmp_path), log=lambda *_: None)
    zoo._record("data", 1.234)
    info = json.loads((tmp_path / "zoo.json").read_text())
    assert info["stages"]["data"] == {"seconds": 1.2, "provenance": provenance()}
    assert info["config"]["size"]["hidden"] == zoo.preset.size.hidden
    zoo.check_built_by_preset()  # does not raise
    info["stages"] = {"data": {"seconds": 1.2}}  # as a folder built before provenance was recorded
    (tmp_path / "zoo.json").write_text(json.dumps(info))
    Zoo("smoke", directory=str(tmp_path)).check_built_by_preset()
