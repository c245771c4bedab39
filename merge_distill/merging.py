"""Weight-space merging baselines over state dicts: linear, task arithmetic, TIES, DARE and ExPO.

These are the baselines G-OPD / ExOPD merging is compared against. Every method works tensor by tensor on
`dict[str, Tensor]` state dicts that share keys and shapes; `merge_models` applies one to Hugging Face
model folders and writes an HF folder. Semantics follow MergeKit's (arcee-ai/mergekit) generalized task
arithmetic, which is a peer tool here, not a dependency:

    task vector     tau_i = theta_i - theta_base
    weighted        d_i   = w_i * sparsify(tau_i)
    no consensus    merged = sum_i d_i                       (divided by sum_i w_i when `normalize`)
    TIES consensus  keep_i = [sign(d_i) == sign(sum_j d_j)]  (ties of the sum go to +)
                    merged = sum_i keep_i d_i                (divided by sum_i keep_i w_i when `normalize`)
    result          theta = theta_base + scale * merged

Where we differ from MergeKit: one `density` and one `scale` for all experts (MergeKit allows per-model
density and has no `scale`: fold it into the weights there); magnitude trimming keeps at least one entry
per tensor (MergeKit asserts instead); DARE masks come from a seeded `torch.Generator`; arithmetic runs in
float32 (float64 stays float64) and is cast back to the base's dtype; a shape mismatch is an error (MergeKit
takes a sub-matrix of embeddings or skips the tensor). Non-float tensors (integer buffers) are copied from
the base unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merge_distill.errors import UserError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------- checks
def check_state_dicts(base: StateDict, experts: Sequence[StateDict],
                      names: Sequence[str] | None = None, base_name: str = "base") -> None:
    """Every expert has exactly the base's tensor names and shapes, or a UserError naming the culprit."""
    names = list(names) if names is not None else [f"expert {i + 1}" for i in range(len(experts))]
    for name, sd in zip(names, experts):
        missing = [k for k in base if k not in sd]
        if missing:
            raise UserError(f"{name} lacks tensor '{missing[0]}' that {base_name} has "
                            f"({len(missing)} missing in all)")
        extra = [k for k in sd if k not in base]
        if extra:
            raise UserError(f"{name} has tensor '{extra[0]}' that {base_name} lacks ({len(extra)} extra in all)")
        for k, t in base.items():
            if sd[k].shape != t.shape:
                raise UserError(f"tensor '{k}' has shape {tuple(sd[k].shape)} in {name} but "
                                f"{tuple(t.shape)} in {base_name}")


def need_experts(experts: Sequence[StateDict]) -> None:
    if not experts:
        raise UserError("merging needs at least one expert model")


def check_density(density: float) -> float:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise UserError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_weights(weights: Sequence[float] | None, n: int, *, default: float) -> list[float]:
    """One finite weight per expert; None means `default` for each."""
    if weights is None:
        return [default] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise UserError(f"weights must be a list of {n} numbers, got {weights!r}")
    if len(weights) != n:
        raise UserError(f"weights has {len(weights)} entries but there are {n} experts")
    return [check_finite(f"weights[{i}]", w) for i, w in enumerate(weights)]


# ------------------------------------------------------------------------------------ per-tensor pieces
def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def magnitude_prune(tau: Tensor, density: float) -> Tensor:
    """TIES trimming: keep the top-k entries of |tau| (k = max(1, floor(density * numel))), zero the rest.

    Ties in magnitude are broken by position (stable sort), so the result is deterministic.
    """
    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    flat = tau.reshape(-1)
    keep = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(tau.shape)


def random_drop(tau: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability `density` (mask m ~ Bernoulli(density)), rescale by 1/density.

    E[m * tau / density] = tau. The mask is `rand(shape, generator) < density`.
    """
    if density >= 1:
        return tau
    mask = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return tau * mask.to(tau.dtype) / density


def elect_sign(weighted_deltas: Tensor) -> Tensor:
    """TIES sign election over the stacked `[n_experts, ...]` weighted deltas: sign of their sum, 0 -> +1."""
    return torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(weighted_deltas.dtype)


def combine(deltas: Sequence[Tensor], weights: Sequence[float], *, consensus: bool,
            normalize: bool) -> Tensor:
    """Mix (already sparsified) task vectors of one tensor.

    d_i = w_i * delta_i. Without consensus: sum_i d_i, over sum_i w_i when `normalize` (sum ~0 -> 1).
    With TIES consensus: keep_i = sign(d_i) == elect_sign(d) (zeros never agree), merged =
    sum_i keep_i d_i, over sum_i keep_i w_i when `normalize` (the disjoint mean; 0 -> 1).
    """
    d = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=d.dtype).reshape(-1, *([1] * (d.dim() - 1)))
    wd = d * w
    if consensus:
        keep = (torch.sign(wd) == elect_sign(wd)).to(d.dtype)
        mixed = (wd * keep).sum(dim=0)
        divisor = (w * keep).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = wd.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed


# ----------------------------------------------------------------------------------------- the methods
def task_vectors(experts: Sequence[StateDict], base: StateDict) -> list[StateDict]:
    """tau_i = theta_i - theta_base for every float tensor (in the working dtype, float32 or float64)."""
    need_experts(experts)
    check_state_dicts(base, experts)
    return [{k: e[k].to(_work_dtype(t)) - t.to(_work_dtype(t)) for k, t in base.items()
             if t.is_floating_point()} for e in experts]


def _task_arithmetic_family(base: StateDict, experts: Sequence[StateDict], *, scale: float,
                            weights: Sequence[float] | None, normalize: bool, consensus: bool,
                            sparsify: Callable[[Tensor], Tensor]) -> StateDict:
    """theta_base + scale * combine([sparsify(tau_i)], w) per float tensor; non-float copied from base."""
    need_experts(experts)
    check_state_dicts(base, experts)
    scale = check_finite("scale", scale)
    w = check_weights(weights, len(experts), default=1.0)
    out: StateDict = {}
    for k, t in base.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        dt = _work_dtype(t)
        b = t.to(dt)
        deltas = [sparsify(e[k].to(dt) - b) for e in experts]
        out[k] = (b + scale * combine(deltas, w, consensus=consensus, normalize=normalize)).to(t.dtype)
    return out


def task_arithmetic(base: StateDict, experts: Sequence[StateDict], scale: float = 1.0,
                    weights: Sequence[float] | None = None, *, normalize: bool = False) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023): theta = theta_base + scale * sum_i w_i tau_i (w_i = 1 default).

    `normalize` divides the sum by sum_i w_i (MergeKit's `normalize`, off by default as there).
    """
    return _task_arithmetic_family(base, experts, scale=scale, weights=weights, normalize=normalize,
                                   consensus=False, sparsify=lambda tau: tau)


def ties(base: StateDict, experts: Sequence[StateDict], density: float = 0.2, scale: float = 1.0,
         weights: Sequence[float] | None = None, *, normalize: bool = True) -> StateDict:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    tau_i' = magnitude_prune(tau_i, density) (per tensor); d_i = w_i tau_i'; gamma = sign(sum_i d_i);
    merged = sum_i [sign(d_i) = gamma] d_i / sum_i [sign(d_i) = gamma] w_i  (with unit weights: the mean
    over the agreeing nonzero entries); theta = theta_base + scale * merged. `normalize=False` drops the
    division (MergeKit's `normalize`, on by default for TIES as there).
    """
    density = check_density(density)
    return _task_arithmetic_family(base, experts, scale=scale, weights=weights, normalize=normalize,
                                   consensus=True, sparsify=lambda tau: magnitude_prune(tau, density))


def dare(base: StateDict, experts: Sequence[StateDict], density: float = 0.5, scale: float = 1.0,
         weights: Sequence[float] | None = None, seed: int = 0, ties_sign: bool = False, *,
         normalize: bool = False) -> StateDict:
    """DARE (Yu et al. 2023): drop-and-rescale each task vector, then task arithmetic (or TIES signs).

    tau_i' = m_i * tau_i / density with m_i ~ Bernoulli(density) elementwise, then
    theta = theta_base + scale * sum_i w_i tau_i' (MergeKit's `dare_linear`), or with `ties_sign` the
    sum over entries agreeing with the elected sign (MergeKit's `dare_ties`; a sum, not a mean, unless
    `normalize`). Masks are drawn from one torch.Generator seeded with `seed`, tensor by tensor in the
    base's key order, expert by expert, so a merge is reproducible. density = 1 is task arithmetic.
    """
    density = check_density(density)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    return _task_arithmetic_family(base, experts, scale=scale, weights=weights, normalize=normalize,
                                   consensus=bool(ties_sign),
                                   sparsify=lambda tau: random_drop(tau, density, gen))


def linear(experts: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted average sum_i w_i theta_i / sum_i w_i (uniform by default; MergeKit's `linear`, normalized).

    Non-float tensors are copied from the first expert.
    """
    need_experts(experts)
    first, rest = experts[0], list(experts[1:])
    check_state_dicts(first, rest, names=[f"expert {i + 2}" for i in range(len(rest))], base_name="expert 1")
    w = check_weights(weights, len(experts), default=1.0)
    if abs(sum(w)) < 1e-8:
        raise UserError(f"weights {w} sum to zero; a weighted average needs a nonzero sum")
    out: StateDict = {}
    for k, t in first.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        dt = _work_dtype(t)
        out[k] = (sum(wi * e[k].to(dt) for wi, e in zip(w, experts)) / sum(w)).to(t.dtype)
    return out


def expo(student_init: StateDict, experts: Sequence[StateDict], alpha: float,
         weights: Sequence[float] | None = None) -> StateDict:
    """ExPO weight extrapolation: avg = linear(experts, weights); theta = avg + alpha * (avg - theta_init).

    alpha = 0 is the plain average; alpha > 0 extrapolates away from the student's initial weights.
    Non-float tensors are copied from `student_init`.
    """
    need_experts(experts)
    check_state_dicts(student_init, experts)
    alpha = check_finite("alpha", alpha)
    avg = linear(experts, weights)
    out: StateDict = {}
    for k, t in student_init.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        dt = _work_dtype(t)
        a = avg[k].to(dt)
        out[k] = (a + alpha * (a - t.to(dt))).to(t.dtype)
    return out


# ------------------------------------------------------------------------------------------- HF folders
# method -> (the function, its parameters beyond the state dicts, the required ones)
METHODS: dict[str, tuple[Callable[..., StateDict], tuple[str, ...], tuple[str, ...]]] = {
    "linear": (linear, ("weights",), ()),
    "task_arithmetic": (task_arithmetic, ("scale", "weights", "normalize"), ()),
    "ties": (ties, ("density", "scale", "weights", "normalize"), ()),
    "dare": (dare, ("density", "scale", "weights", "seed", "ties_sign", "normalize"), ()),
    "expo": (expo, ("alpha", "weights"), ("alpha",)),
}


def validate_merge_params(method: str, params: dict, n_experts: int) -> None:
    """Check a method's name and parameters before any model is loaded (one-line UserErrors)."""
    if method not in METHODS:
        raise UserError(f"unknown merge method '{method}' (choose from {', '.join(METHODS)})")
    _, allowed, required = METHODS[method]
    for p in params:
        if p not in allowed:
            raise UserError(f"merge method '{method}' has no parameter '{p}' (it takes {', '.join(allowed)})")
    for p in required:
        if p not in params:
            raise UserError(f"merge method '{method}' needs parameter '{p}'")
    if n_experts < 1:
        raise UserError("merging needs at least one expert model")
    if "density" in params:
        check_density(params["density"])
    for p in ("scale", "alpha"):
        if p in params:
            check_finite(p, params[p])
    if "weights" in params:
        check_weights(params["weights"], n_experts, default=1.0)
    if "seed" in params and (isinstance(params["seed"], bool) or not isinstance(params["seed"], int)):
        raise UserError(f"seed must be an integer, got {params['seed']!r}")
    for p in ("normalize", "ties_sign"):
        if p in params and not isinstance(params[p], bool):
            raise UserError(f"{p} must be true or false, got {params[p]!r}")


def _checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The float dtype a folder's config declares (`dtype` or `torch_dtype`), float32 if none."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _untied_state_dict(model: torch.nn.Module) -> tuple[StateDict, set[str]]:
    """The state dict without the later names of tensors that share storage (tied embeddings), and those names."""
    seen: set[tuple] = set()
    sd: StateDict = {}
    aliases: set[str] = set()
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases.add(k)
            continue
        if key is not None:
            seen.add(key)
        sd[k] = t
    return sd, aliases


def merge_models(method: str, base_path: str | os.PathLike, expert_paths: Sequence[str | os.PathLike],
                 out_path: str | os.PathLike, **params) -> Path:
    """Merge HF model folders with `method` and write the result as an HF folder at `out_path`.

    `base_path` is the base model (task arithmetic, TIES, DARE), the student's initial weights (ExPO), or
    only the template for `linear`; in every case its model class, config and tokenizer are what is saved,
    and its non-float tensors are kept (for `linear`, expert 1's). Models load in the base's checkpoint dtype and save in it. Tied
    tensors (e.g. lm_head tied to the embeddings) are merged once. `params` are the method's keyword
    arguments (see METHODS); they are checked before any model is loaded.
    """
    from merge_distill.models import load_model, load_tokenizer, save_model

    expert_paths = list(expert_paths)
    validate_merge_params(method, params, len(expert_paths))
    fn = METHODS[method][0]
    dtype = _checkpoint_dtype(base_path)
    base_model = load_model(base_path, what="base model", dtype=dtype)
    tokenizer = load_tokenizer(base_path, what="base model")
    base_sd, aliases = _untied_state_dict(base_model)
    expert_sds = []
    for i, p in enumerate(expert_paths):
        model = load_model(p, what=f"expert {i + 1}", dtype=dtype)
        expert_sds.append({k: v for k, v in model.state_dict().items() if k not in aliases})
        del model
    check_state_dicts(base_sd, expert_sds, names=[f"expert '{p}'" for p in expert_paths],
                      base_name=f"base model '{base_path}'")
    if method == "linear":
        merged = fn(expert_sds, **params)
    else:
        merged = fn(base_sd, expert_sds, **params)
    result = base_model.load_state_dict(merged, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - aliases:
        raise UserError(f"the merged weights do not fit base model '{base_path}' "
                        f"(missing {sorted(set(result.missing_keys) - aliases)[:3]}, "
                        f"unexpected {list(result.unexpected_keys)[:3]})")
    save_model(base_model, tokenizer, out_path)
    return Path(out_path)


# ------------------------------------------------------------------ the weight-space baselines as recipe methods
# A recipe's `method: expo` or `method: merge` runs one of these instead of training: the experts' (teachers')
# weights combined relative to the student's, written to `<output_dir>/final`.
#   expo   ExPO (Zheng et al. 2024, weight extrapolation): theta = avg + alpha * (avg - theta_student), avg the
#          experts' mean (`merge.alpha`)
#   merge  MergeKit's techniques above with task vectors tau_i = theta_i - theta_student (`merge.technique`,
#          `merge.scale`, `merge.density`, `merge.seed`)


def _teachers(recipe) -> list[str]:
    """Each expert's teacher as a whole-model folder: an adapter expert merged into its base first
    (`adapters.model_folder`, peft's `merge_and_unload`), so task vectors are whole-weight differences as in MergeKit."""
    from merge_distill.adapters import model_folder

    return [model_folder(e.teacher, what=f"experts.{i}.teacher ({e.name})") for i, e in enumerate(recipe.experts)]


def _expo(recipe, out: Path) -> Path:
    return merge_models("expo", recipe.student.path, _teachers(recipe), out, alpha=recipe.merge.alpha)


def _merge(recipe, out: Path) -> Path:
    m = recipe.merge
    params = {"scale": m.scale} if m.technique != "linear" else {}
    if m.technique in ("ties", "dare") and m.density is not None:
        params["density"] = m.density
    if m.technique == "dare":
        params["seed"] = m.seed
    return merge_models(m.technique, recipe.student.path, _teachers(recipe), out, **params)


COMBINERS: dict[str, Callable] = {"expo": _expo, "merge": _merge}


def write_merge(recipe) -> Path:
    """Write the recipe's weight-space merge (`method` one of COMBINERS) to `<output_dir>/final`; its path."""
    return Path(COMBINERS[recipe.method.name](recipe, Path(recipe.output_dir) / "final"))
