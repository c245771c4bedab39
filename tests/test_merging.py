"""Weight-space merging baselines against hand-computed values, and merge_models end to end on tiny HF models."""

import pytest
import torch

from merge_distill import merging as M
from merge_distill.errors import UserError


def sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) if not isinstance(v, torch.Tensor) else v
            for k, v in tensors.items()}


def close(a, b, atol=1e-6):
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol)


# A worked 1-D TIES example. base = 1 everywhere; task vectors (density 0.6 keeps 3 of 5 per expert):
#   tau1 = [ 3,  -1,  2, 0.5, -4] -> trimmed [ 3,   0,  2, 0, -4]
#   tau2 = [-2,  -3,  1, 0.1,  5] -> trimmed [-2,  -3,  0, 0,  5]
#   tau3 = [1.5,  2, -6, 0.2,  1] -> trimmed [1.5,  2, -6, 0,  0]
#   sums   [2.5, -1, -4,   0,  1] -> elected [ +,   -,  -, +,  +]
#   disjoint mean [(3+1.5)/2, -3, -6, 0 (nobody agrees), 5] = [2.25, -3, -6, 0, 5]
TAUS = [[3.0, -1.0, 2.0, 0.5, -4.0], [-2.0, -3.0, 1.0, 0.1, 5.0], [1.5, 2.0, -6.0, 0.2, 1.0]]
BASE = sd(w=[1.0] * 5)
EXPERTS = [sd(w=[1.0 + x for x in tau]) for tau in TAUS]


def test_task_vectors_and_task_arithmetic():
    base = sd(a=[1.0, 2.0], n=torch.tensor([7, 8]))
    experts = [sd(a=[2.0, 0.0], n=torch.tensor([0, 0])), sd(a=[0.0, 5.0], n=torch.tensor([1, 1]))]
    taus = M.task_vectors(experts, base)
    assert close(taus[0]["a"], [1.0, -2.0]) and close(taus[1]["a"], [-1.0, 3.0])
    assert "n" not in taus[0]  # integer buffers have no task vector
    # base + 0.5 * (1 * [1, -2] + 2 * [-1, 3]) = [1, 2] + 0.5 * [-1, 4]
    out = M.task_arithmetic(base, experts, scale=0.5, weights=[1.0, 2.0])
    assert close(out["a"], [0.5, 4.0])
    assert torch.equal(out["n"], base["n"])  # copied from the base unchanged
    # default weights are 1: base + sum of task vectors
    assert close(M.task_arithmetic(base, experts)["a"], [1.0, 3.0])
    # normalize divides by the weight sum (MergeKit's option)
    assert close(M.task_arithmetic(base, experts, weights=[1.0, 3.0], normalize=True)["a"],
                 [1.0 + (1 - 3) / 4, 2.0 + (-2 + 9) / 4])


def test_magnitude_prune_keeps_top_density_fraction():
    tau = torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0])
    assert close(M.magnitude_prune(tau, 0.6), [3.0, 0.0, 2.0, 0.0, -4.0])
    assert close(M.magnitude_prune(tau, 0.2), [0.0, 0.0, 0.0, 0.0, -4.0])
    assert close(M.magnitude_prune(tau, 0.01), [0.0, 0.0, 0.0, 0.0, -4.0])  # at least one entry survives
    assert torch.equal(M.magnitude_prune(tau, 1.0), tau)
    # per tensor, any shape: 2 of 4 kept
    m = torch.tensor([[0.1, -5.0], [4.0, 0.2]])
    assert close(M.magnitude_prune(m, 0.5), [[0.0, -5.0], [4.0, 0.0]])


def test_ties_worked_example():
    out = M.ties(BASE, EXPERTS, density=0.6)
    assert close(out["w"], [1 + 2.25, 1 - 3.0, 1 - 6.0, 1.0, 1 + 5.0])
    out = M.ties(BASE, EXPERTS, density=0.6, scale=0.5)
    assert close(out["w"], [1 + 1.125, 1 - 1.5, 1 - 3.0, 1.0, 1 + 2.5])
    # without normalize: the sum of the agreeing entries
    out = M.ties(BASE, EXPERTS, density=0.6, normalize=False)
    assert close(out["w"], [1 + 4.5, 1 - 3.0, 1 - 6.0, 1.0, 1 + 5.0])


def test_ties_weights_enter_the_election_and_the_mean():
    # d = w * trimmed: [6,0,4,0,-8], [-2,-3,0,0,5], [1.5,2,-6,0,0]; sums [5.5,-1,-2,0,-3]
    # -> signs [+,-,-,+,-]; weighted disjoint mean: [(6+1.5)/(2+1), -3/1, -6/1, 0, -8/2]
    out = M.ties(BASE, EXPERTS, density=0.6, weights=[2.0, 1.0, 1.0])
    assert close(out["w"], [1 + 2.5, 1 - 3.0, 1 - 6.0, 1.0, 1 - 4.0])


def test_ties_full_density_no_conflict_is_the_mean_task_vector():
    base = sd(w=[0.0, 0.0])
    experts = [sd(w=[1.0, 2.0]), sd(w=[3.0, 4.0])]
    assert close(M.ties(base, experts, density=1.0)["w"], [2.0, 3.0])


def test_dare_density_one_is_task_arithmetic():
    out = M.dare(BASE, EXPERTS, density=1.0, scale=0.7, weights=[1.0, 0.5, 2.0], seed=5)
    ref = M.task_arithmetic(BASE, EXPERTS, scale=0.7, weights=[1.0, 0.5, 2.0])
    assert close(out["w"], ref["w"])
    # with TIES signs and density 1: sums [2.5,-1,-4,0.8,2] -> sum of agreeing entries
    out = M.dare(BASE, EXPERTS, density=1.0, ties_sign=True)
    assert close(out["w"], [1 + 4.5, 1 - 4.0, 1 - 6.0, 1 + 0.8, 1 + 6.0])


def test_dare_mask_and_rescale_with_a_fixed_generator():
    tau = torch.arange(1.0, 401.0)
    dropped = M.random_drop(tau, 0.25, torch.Generator().manual_seed(3))
    kept = dropped != 0
    # survivors are rescaled by 1/density, the rest are zero
    assert torch.allclose(dropped[kept], tau[kept] / 0.25)
    assert 0.15 < kept.float().mean().item() < 0.35
    # the same seed draws the same mask; another seed another
    again = M.random_drop(tau, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, M.random_drop(tau, 0.25, torch.Generator().manual_seed(4)))
    # dare() with one expert is base + scale * the dropped task vector, drawn from Generator(seed)
    base, expert = sd(w=torch.zeros(400)), sd(w=tau)
    out = M.dare(base, [expert], density=0.25, scale=2.0, seed=3)
    assert torch.allclose(out["w"], 2.0 * dropped)
    assert torch.equal(out["w"], M.dare(base, [expert], density=0.25, scale=2.0, seed=3)["w"])


def test_dare_expectation_is_task_arithmetic():
    weights = [1.0, 0.5, 2.0]
    ref = M.task_arithmetic(BASE, EXPERTS, weights=weights)["w"]
    n = 3000
    mean = sum(M.dare(BASE, EXPERTS, density=0.5, weights=weights, seed=s)["w"] for s in range(n)) / n
    # std of one draw per entry <= sqrt(sum_i (w_i tau_i)^2) ~ 12.5; of the mean ~ 0.23
    assert torch.allclose(mean, ref, atol=1.0), (mean, ref)


def test_linear_and_expo():
    experts = [sd(a=[1.0, 2.0]), sd(a=[3.0, 6.0])]
    assert close(M.linear(experts)["a"], [2.0, 4.0])
    assert close(M.linear(experts, weights=[1.0, 3.0])["a"], [2.5, 5.0])
    init = sd(a=[0.0, 1.0])
    experts = [sd(a=[2.0, 3.0]), sd(a=[4.0, 1.0])]
    # avg [3, 2]; avg + 0.5 * (avg - init) = [4.5, 2.5]
    assert close(M.expo(init, experts, alpha=0.5)["a"], [4.5, 2.5])
    # weighted avg [2.5, 2.5]; + 0.5 * [2.5, 1.5]
    assert close(M.expo(init, experts, alpha=0.5, weights=[3.0, 1.0])["a"], [3.75, 3.25])
    assert close(M.expo(init, experts, alpha=0.0)["a"], M.linear(experts)["a"])


def test_dtypes_and_integer_buffers_are_kept():
    base = {"w": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor([5, 6])}
    experts = [{"w": torch.full((3,), 2.0, dtype=torch.bfloat16), "n": torch.tensor([0, 0])}]
    for out in (M.ties(base, experts, density=1.0), M.dare(base, experts), M.task_arithmetic(base, experts),
                M.expo(base, experts, alpha=1.0)):
        assert out["w"].dtype == torch.bfloat16
        assert torch.equal(out["n"], base["n"])


def test_user_errors():
    base = sd(a=[1.0, 2.0])
    with pytest.raises(UserError, match=r"tensor 'a' has shape \(3,\) in expert 2"):
        M.task_arithmetic(base, [sd(a=[1.0, 2.0]), sd(a=[1.0, 2.0, 3.0])])
    with pytest.raises(UserError, match="expert 1 lacks tensor 'a'"):
        M.ties(base, [sd(b=[1.0, 2.0])])
    with pytest.raises(UserError, match="has tensor 'b'"):
        M.ties(base, [sd(a=[1.0, 2.0], b=[1.0])])
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(UserError, match="density"):
            M.ties(base, [base], density=bad)
        with pytest.raises(UserError, match="density"):
            M.dare(base, [base], density=bad)
    with pytest.raises(UserError, match="weights has 1 entries but there are 2 experts"):
        M.task_arithmetic(base, [base, base], weights=[1.0])
    with pytest.raises(UserError, match="sum to zero"):
        M.linear([base, base], weights=[1.0, -1.0])
    with pytest.raises(UserError, match="scale"):
        M.task_arithmetic(base, [base], scale=float("inf"))
    with pytest.raises(UserError, match="at least one expert"):
        M.task_arithmetic(base, [])
    with pytest.raises(UserError, match="unknown merge method 'slerp'"):
        M.validate_merge_params("slerp", {}, 2)
    with pytest.raises(UserError, match="no parameter 'alpha'"):
        M.validate_merge_params("ties", {"alpha": 1.0}, 2)
    with pytest.raises(UserError, match="needs parameter 'alpha'"):
        M.validate_merge_params("expo", {}, 2)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3

    root = tmp_path_factory.mktemp("merge")
    tok = byte_tokenizer()
    paths = []
    for i, name in enumerate(("base", "math", "code")):
        model = tiny_qwen3(len(tok), hidden=16, layers=1, heads=2, seed=i)
        save_model(model, tok, root / name)
        paths.append(root / name)
    return root, paths


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scale": 0.5, "weights": [1.0, 2.0]}),
    ("ties", {"density": 0.3}),
    ("dare", {"density": 0.5, "seed": 1, "ties_sign": True}),
    ("expo", {"alpha": 0.5}),
    ("linear", {}),
])
def test_merge_models_end_to_end(tiny_models, method, params):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, (base, math_, code) = tiny_models
    out = M.merge_models(method, base, [math_, code], root / f"out_{method}", **params)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p)).state_dict()  # noqa: E731
    b, e1, e2 = load(base), load(math_), load(code)
    # the untied tensors (lm_head is tied to the embeddings) as the pure function merges them
    b = {k: v for k, v in b.items() if k != "lm_head.weight"}
    e1 = {k: v for k, v in e1.items() if k in b}
    e2 = {k: v for k, v in e2.items() if k in b}
    expected = M.linear([e1, e2], **params) if method == "linear" else getattr(M, method)(b, [e1, e2], **params)
    got = merged.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(merged(ids).logits).all()


def test_merge_models_checks_params_before_loading(tmp_path):
    with pytest.raises(UserError, match="density"):
        M.merge_models("ties", tmp_path / "nope", [tmp_path / "nope"], tmp_path / "out", density=2.0)
    with pytest.raises(UserError, match="does not exist"):
        M.merge_models("ties", tmp_path / "nope", [tmp_path / "nope"], tmp_path / "out", density=0.5)
