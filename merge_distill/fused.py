"""Log-probs of given tokens through an output projection, in row chunks, with a recomputing backward.

    log p(y_i | h_i) = z_i[y_i] - logsumexp(z_i),    z_i = cap(h_i W^T + b) / T,    cap(x) = c tanh(x / c)

(the soft-cap c is optional: Gemma 2-style heads cap their logits before the sampler divides by T) is all a
policy-gradient update needs from the vocabulary, yet autograd on the plain computation keeps the whole
`[rows, vocab]` float32 logits (and their log-softmax, and their gradient) alive: 1.2 GB apiece for 2,048
response tokens at Qwen's 151,936-token vocabulary. `token_logprobs` walks the rows in chunks of at most
`chunk_rows` (about `CHUNK_ELEMENTS` logits) in both passes: the forward keeps only each row's log-sum-exp,
the backward recomputes each chunk's logits and turns them into

    dL/dx_i = g_i * (onehot(y_i) - softmax(z_i)) * cap'(x_i) / T,   dL/dh_i = dL/dx_i W,   dL/dW += dL/dx_i^T h_i

(x_i = h_i W^T + b, cap'(x) = 1 - tanh(x / c)^2, 1 without a cap), so memory beyond the inputs is one chunk of
logits (two in the backward with a cap: its slope beside the gradient), whatever the vocabulary and length (the
idea of Liger Kernel's fused linear cross-entropy). Values are those of the plain computation: the same
operations on the same rows, in the same dtype (under autocast the projection runs in the autocast dtype, as
`nn.Linear` would).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Logits per chunk: big enough for fast matmuls, small against [B, L, V]. Measured (benchmarks/fused_speed.py):
# on 2 CPU threads chunks past ~2^25 (128 MiB) gain nothing; on an H100, 2^27 (512 MiB) runs the L-shaped
# update ~15% faster than 2^25 and larger chunks gain little more.
CHUNK_ELEMENTS = 1 << 25
CHUNK_ELEMENTS_CUDA = 1 << 27


def chunk_rows_for(vocab: int, elements: int | None = None, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that one chunk holds about `elements` logits (default: by device type)."""
    if elements is None:
        cuda = device is not None and torch.device(device).type == "cuda"
        elements = CHUNK_ELEMENTS_CUDA if cuda else CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab))


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's where it is on, else the hidden states'."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, softcap: float | None, *,
            with_slope: bool = False) -> tuple[Tensor, Tensor | None]:
    """One chunk of logits as the sampler sees them, `cap(h W^T + b) / T` in float32, and, `with_slope`, the
    cap's derivative `1 - tanh(x / c)^2` for the backward (None without a cap). Runs without autograd, in place."""
    z = F.linear(h, w, b).float()
    slope = None
    if softcap is not None:
        squashed = z.div_(softcap).tanh_()
        if with_slope:
            slope = squashed.square().neg_().add_(1)
        z = squashed.mul_(softcap)
    return (z.div_(temperature) if temperature != 1.0 else z), slope


def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                   temperature: float = 1.0, softcap: float | None = None, chunk_rows: int | None = None) -> Tensor:
    """`[N]` float32 log-probs of `targets` `[N]` under `softmax(cap(hidden @ weight.T + bias) / temperature)`.

    `hidden` `[N, H]`, `weight` `[V, H]` (e.g. an `nn.Linear`'s, tied to the embedding or not), `bias` `[V]` or
    None; `softcap` c caps the logits to `c * tanh(x / c)` before the temperature divides them (None: no cap).
    Differentiable in hidden, weight and bias, holding at most one `[chunk_rows, V]` block of logits (two in
    the backward with a cap).
    """
    rows = chunk_rows or chunk_rows_for(weight.shape[0], device=weight.device)
    cdtype = compute_dtype(hidden)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(hidden, weight, bias, targets, temperature, softcap, rows, cdtype)[0]
    return _TokenLogprobs.apply(hidden, weight, bias, targets, temperature, softcap, rows, cdtype)


def _forward(hidden, weight, bias, targets, temperature, softcap, rows, cdtype):
    w = weight.to(cdtype)
    b = bias.to(cdtype) if bias is not None else None
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        z, _ = _logits(hidden[lo:hi].to(cdtype), w, b, temperature, softcap)
        lse[lo:hi] = torch.logsumexp(z, dim=-1)
        out[lo:hi] = z.gather(-1, targets[lo:hi, None]).squeeze(-1) - lse[lo:hi]
    return out, lse


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, rows, cdtype):
        with torch.autocast(hidden.device.type, enabled=False):
            out, lse = _forward(hidden, weight, bias, targets, temperature, softcap, rows, cdtype)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.softcap, ctx.rows, ctx.cdtype = temperature, softcap, rows, cdtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, softcap, rows, cdtype = ctx.temperature, ctx.softcap, ctx.rows, ctx.cdtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            g_all = grad_out.float()
            n = hidden.shape[0]
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].to(cdtype)
                g = g_all[lo:hi, None]
                dz, slope = _logits(h, w, b, temperature, softcap, with_slope=True)  # recomputed chunk
                dz.sub_(lse[lo:hi, None]).exp_().mul_(-g)      # -g * softmax
                dz.scatter_add_(-1, targets[lo:hi, None], g)   # + g * onehot(y)
                if slope is not None:
                    dz.mul_(slope)                             # through the cap
                if temperature != 1.0:
                    dz.div_(temperature)
                dz = dz.to(cdtype)
                if need_h:
                    grad_h[lo:hi] = dz @ w
                if need_w and cdtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                elif need_w:
                    grad_w += (dz.t() @ h).float()
                if need_b:
                    grad_b += dz.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None)
