"""What a GPU run's first step meets, rehearsed on this CPU: a process group shaped as on CUDA (NCCL has no CPU
backend), bf16 compute under FSDP2 on rows past 256 tokens (bf16 counts integers exactly only up to 256), and
every loop collective sent from one module."""

import ast
import json
from pathlib import Path

import pytest
import torch

import merge_distill
from merge_distill.distributed import group_backends
from merge_distill.parallel.layout import ModelLogprobs
from launch import torchrun
from on_ranks import EOS, LONG_LENGTHS, long_model, long_rollouts

ON_RANKS = str(Path(__file__).with_name("on_ranks.py"))


def test_the_group_has_a_host_backend_beside_the_accelerators():
    """torch 2.13: `Backend.backend_capability["nccl"] == ["cuda"]`: a group of NCCL alone refuses the loop's host
    tensors (counts, flags) and pickled objects. The group pairs each device type with its backend."""
    assert group_backends("cuda") == "cpu:gloo,cuda:nccl"
    assert group_backends("cpu") == "cpu:gloo"


def test_rehearsed_group_refuses_host_tensors_where_nccl_would_and_takes_them_with_gloo_beside(tmp_path):
    """The rehearsal is faithful: on this CPU, a group keyed `cuda:` alone fails a host all-reduce with NCCL's own
    error, and the run's group (built by `distributed.init` as on CUDA) carries every loop collective."""
    torchrun("group_rehearsal", str(tmp_path), script=ON_RANKS, timeout=300)
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["backend"] == "cpu:gloo,cuda:gloo"  # cuda:nccl, with gloo standing in
    assert "No backend type associated with device type cpu" in got["accelerator_only_error"]
    assert got["sum"] == 3 and got["max"] == 2 and got["any"] is True and got["chunks"] == [[[0], True], [[0], False]]
    assert got["gathered"] == [0, 1] and got["broadcast"] == "from rank 0"


# torch.distributed's collectives: sent only from merge_distill/parallel/collectives.py (and the process group's
# lifecycle in distributed.py), so that each goes over the group's host backend and every rank sends the same ones
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "scatter_object_list", "all_to_all", "barrier", "send", "recv",
               "monitored_barrier"}
ALLOWED = {"parallel/collectives.py", "distributed.py"}


def collective_calls(path: Path) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls of a collective in a module, as 'line: name'."""
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
               if a.name == "torch.distributed"} | {"dist"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases or owner == "torch.distributed":
                found.append(f"{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_loop_collectives_are_sent_from_one_module():
    root = Path(merge_distill.__file__).parent
    offenders = {str(p.relative_to(root)): calls for p in sorted(root.rglob("*.py"))
                 if str(p.relative_to(root)) not in ALLOWED and (calls := collective_calls(p))}
    assert offenders == {}
    assert collective_calls(root / "parallel" / "collectives.py")  # the check sees calls where they are


def test_fsdp_bf16_scores_every_token_of_rows_past_256_like_one_process_fp32(tmp_path):
    """2 fsdp ranks computing in bf16 score rows of 257-300 tokens: each row's length is counted exactly, its EOS
    (the last token) is scored, nothing after it is, and the log-probs are one fp32 process's within bf16
    rounding. Cast to bf16, a float mask of 257 ones sums to 256 (EOS unscored) and 259 to 260 (a pad scored)."""
    torchrun("bf16_long_rows", str(tmp_path), script=ON_RANKS, timeout=300)
    parts = json.loads((tmp_path / "result.json").read_text())
    rows = [r for part in parts for r in part["rows"]]
    assert sorted(rows) == list(range(len(LONG_LENGTHS))) and len(parts) == 2 and all(p["rows"] for p in parts)
    rollouts = long_rollouts()
    with torch.no_grad():
        expected = ModelLogprobs(long_model())(rollouts, 1.0)  # one process, float32
    for key in ("logprobs", "logprobs_float_mask"):  # a bool mask, and a float one as an engine may build it
        got = torch.zeros(len(LONG_LENGTHS), max(LONG_LENGTHS))
        for part in parts:
            assert part["lengths"] == [LONG_LENGTHS[r] for r in part["rows"]]
            got[part["rows"]] = torch.tensor(part[key])
        for r, n in enumerate(LONG_LENGTHS):
            assert rollouts.response_ids[r, n - 1] == EOS
            assert bool((got[r, :n] != 0).all()), f"{key}, row {r}: a real token (EOS at {n - 1}) unscored"
            assert bool((got[r, n:] == 0).all()), f"{key}, row {r}: a pad after EOS scored"
        torch.testing.assert_close(got, expected, rtol=0, atol=0.1)  # bf16 logits of ~4 nats: rounding ~0.03
        assert float((got - expected).abs().max()) > 1e-4  # computed in bf16 indeed, not in fp32


def test_fsdp_with_shards_on_the_host_takes_the_step_of_shards_beside_the_compute(tmp_path):
    """`placement.offload_optimizer`: host shards, host gradients, AdamW on the host. Clipping reduces the norm over
    the ranks' host shards (over the group's host backend, which a group of NCCL alone lacks) and the optimizer
    state gathers from the host: one step equals the same step without offload."""
    torchrun("offload_step", str(tmp_path), script=ON_RANKS, timeout=300)
    got = json.loads((tmp_path / "result.json").read_text())
    plain, offload = got["plain"], got["offload"]
    assert offload["device"] == "cpu" and plain["norm"] > 0.05, plain["norm"]  # clipped
    assert offload["norm"] == pytest.approx(plain["norm"], rel=1e-5)
    for key in ("weights", "exp_avg"):
        assert offload[key].keys() == plain[key].keys()
        for name in plain[key]:
            torch.testing.assert_close(torch.tensor(offload[key][name]), torch.tensor(plain[key][name]),
                                       rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{key} {n}: {m}")
