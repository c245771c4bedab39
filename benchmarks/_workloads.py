"""Shared pieces of the benchmarks: workloads, synthetic tokenizers, random-init models and prompts.

A workload's models are tiny Qwen3-config causal LMs, randomly initialised (deterministic by seed) and saved
as ordinary HF folders, so every runner (merge-distill, TRL, the plain-PyTorch floor) loads the very same
weights, tokenizer and prompts. Token ids are synthetic: the tokenizer is a word-level vocabulary
`t0 t1 ...` plus the chat markers, exactly `vocab` ids, so prompts render through a chat template (TRL's
collators need text) and round-trip to the same ids.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"]
WORDS = ["user", "assistant", "system"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Workload:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    batch: int
    new_tokens: int
    prompt_min: int = 16      # words of user text per prompt (the chat template adds 5 tokens)
    prompt_max: int = 48
    seed: int = 0
    # A spread of lengths: each prompt's response has a length drawn from a lognormal (median `median_new`,
    # sigma `sigma`) clipped to [min_new, new_tokens], forced per row (`forced_lengths`); None = every row runs
    # to new_tokens unless it samples EOS (random models rarely do)
    median_new: int | None = None
    sigma: float = 1.0
    min_new: int = 16


WORKLOADS = {
    "S": Workload("S", vocab=260, hidden=128, layers=3, heads=4, batch=32, new_tokens=16),
    "L": Workload("L", vocab=151_936, hidden=256, layers=3, heads=4, batch=16, new_tokens=128),
    # responses of 16..1,024 tokens, lognormal around 160 (the spread of real rollouts); a 16k vocabulary keeps
    # TRL's full-vocabulary logits of [batch, 1,077, vocab] within this machine's memory
    "V": Workload("V", vocab=16_384, hidden=256, layers=3, heads=4, batch=16, new_tokens=1024, median_new=160),
}


def lognormal_lengths(rows: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    """`rows` lengths from a lognormal (median, sigma), rounded and clipped to [lo, hi]."""
    import math

    rng = random.Random(seed)
    return [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(rows)]


def response_lengths(w: Workload) -> list[int]:
    """The forced response length (tokens, EOS included) of each prompt of `prompt_texts(w)`, or [] (none)."""
    if w.median_new is None:
        return []
    return lognormal_lengths(w.batch, w.median_new, w.sigma, w.min_new, w.new_tokens, w.seed + 1)


def prompt_key(ids) -> tuple[int, ...]:
    """A prompt's identity from its token ids, whoever rendered it: its word tokens (`t0`, `t1`, ...) in order;
    pads, chat markers and role words dropped."""
    first_word = len(SPECIALS) + len(WORDS)
    return tuple(int(i) for i in ids if int(i) >= first_word)


class ForcedEOS:
    """Per-row response lengths forced on a sampler that has no per-row caps: row b's EOS is impossible before
    its `length[b]`-th response token and certain at it. `at(t)` edits log-probs or logits (rows x vocab) for
    response position t (0-based) in place."""

    def __init__(self, length: list[int], eos: int):
        import torch

        self.last, self.eos = torch.tensor(length) - 1, eos

    def at(self, t: int, scores):
        end = (self.last == t).to(scores.device)
        scores[:, self.eos] = float("-inf")
        scores[end] = float("-inf")
        scores[end, self.eos] = 0.0
        return scores


def forced_logits(model, length: list[int], eos: int):
    """`merge_distill.sampling`'s padded sampler source for `model`, with `ForcedEOS(length, eos)` applied."""
    from merge_distill.sampling import LogitsSource, ModelLogits

    class Forced(LogitsSource):
        def __init__(self):
            self.inner, self.forced = ModelLogits(model), ForcedEOS(length, eos)

        def start(self, batch_size: int):
            self.t = 0
            return self.inner.start(batch_size)

        def next_logprobs(self, state, *args):
            lp = self.forced.at(self.t, self.inner.next_logprobs(state, *args))
            self.t += 1
            return lp

    return Forced()


def make_tokenizer(vocab: int):
    """A word-level fast tokenizer with exactly `vocab` ids: specials, role words, then `t0`, `t1`, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    for i in range(vocab - len(table)):
        table[f"t{i}"] = len(table)
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>", bos_token=None,
                                   additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def prompt_texts(w: Workload, n: int | None = None) -> list[str]:
    """`n` (default: one batch) user messages of random words, lengths uniform in [prompt_min, prompt_max]."""
    rng = random.Random(w.seed)
    words = w.vocab - len(SPECIALS) - len(WORDS)
    return [" ".join(f"t{rng.randrange(words)}" for _ in range(rng.randint(w.prompt_min, w.prompt_max)))
            for _ in range(n or w.batch)]


def build(w: Workload, root: Path) -> Path:
    """Save student/ and teacher/ (HF folders with the tokenizer) and prompts.jsonl under root/w.name."""
    import torch

    from merge_distill.models import save_model
    from merge_distill.toyworld.models import tiny_qwen3

    out = root / w.name
    if (out / "done.json").exists() and json.loads((out / "done.json").read_text()) == asdict(w):
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(w.vocab)
    for name, seed in (("student", w.seed), ("teacher", w.seed + 1)):
        model = tiny_qwen3(w.vocab, hidden=w.hidden, layers=w.layers, heads=w.heads, seed=seed,
                           max_positions=max(1024, w.prompt_max + 5 + w.new_tokens),
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        save_model(model.to(torch.float32), tok, out / name)
    lengths = response_lengths(w) or [None] * w.batch
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, **({"length": n} if n else {})}) + "\n"
                                               for p, n in zip(prompt_texts(w), lengths)))
    (out / "done.json").write_text(json.dumps(asdict(w)))
    return out


# ------------------------------------------------------------------------------------------ memory


def _status_mib(field: str) -> float:
    import re

    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_rss_added(fn) -> tuple[float, float]:
    """(MiB of peak RSS over the RSS before, seconds) of fn(): the high-water mark is reset first
    (`/proc/self/clear_refs`), so the figure is this call's peak over what was already resident."""
    import gc
    import time

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return _status_mib("VmHWM") - before, seconds


# --------------------------------------------------------------------------------------------- floor


def floor_step(student, passes, optimizer, prompt_ids, prompt_mask, new_tokens: int, generator, *,
               chunked: bool) -> dict:
    """One step's unavoidable passes in plain PyTorch; returns their times (s).

    KV-cached sampling (one forward per token, softmax, an inverse-CDF draw; no EOS handling), one forward of each
    frozen model over its rows (`passes`: [(model, rows or None)]), one student forward/backward and AdamW.
    `chunked=False` takes log-probs the plain way (the model's logits at response positions, log_softmax,
    gather); `chunked=True` projects hidden states with `merge_distill.fused.token_logprobs` (the same matmuls,
    a chunk of logits at a time).
    """
    import time

    import torch
    from transformers import DynamicCache

    from merge_distill.fused import token_logprobs
    from merge_distill.sampling import ModelLogits, positions

    def logprobs(model, ids, mask, pos, response):
        n = response.shape[1]
        if not chunked:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=n + 1).logits[:, :-1]
            return logits.float().log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -n - 1:-1]
        head = model.get_output_embeddings()
        lp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, response.reshape(-1))
        return lp.reshape(response.shape)

    t0 = time.perf_counter()
    kw = ModelLogits(student).cache_kw
    batch = prompt_ids.shape[0]
    ones = torch.ones(batch, 1, dtype=prompt_mask.dtype)
    student.eval()
    with torch.no_grad():
        cache = DynamicCache()
        pos = positions(prompt_mask)
        out = student(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                      logits_to_keep=1, **{kw: cache})
        mask, next_pos, tokens = prompt_mask, pos[:, -1:] + 1, []
        for t in range(new_tokens):
            # inverse-CDF draw (torch.multinomial is ~10x slower at a 152k vocabulary on CPU)
            cdf = torch.softmax(out.logits[:, -1].float(), -1).cumsum(-1)
            u = torch.rand(batch, 1, generator=generator) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
            tokens.append(tok)
            if t == new_tokens - 1:
                break
            mask = torch.cat([mask, ones], 1)
            out = student(input_ids=tok, attention_mask=mask, position_ids=next_pos, use_cache=True,
                          logits_to_keep=1, **{kw: cache})
            next_pos = next_pos + 1
        response = torch.cat(tokens, 1)
        ids = torch.cat([prompt_ids, response], 1)
        full_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)
        full_pos = positions(full_mask)
        t1 = time.perf_counter()
        frozen = torch.zeros(response.shape)
        for model, rows in passes:
            r = slice(None) if rows is None else torch.as_tensor(rows)
            frozen[r] += logprobs(model, ids[r], full_mask[r], full_pos[r], response[r])
    t2 = time.perf_counter()
    student.train()
    s_lp = logprobs(student, ids, full_mask, full_pos, response)
    loss = -((frozen - s_lp.detach()) * s_lp).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t3 = time.perf_counter()
    return {"sample": t1 - t0, "score": t2 - t1, "update": t3 - t2, "step": t3 - t0}


def time_floor(model_dir: Path, passes, prompts: list[list[int]], new_tokens: int, pairs: int, ours_step,
               *, pad_token_id: int, student: str = "student") -> dict:
    """Time the floor (plain and chunked) alternately with `ours_step()` (returns its step seconds), in this
    process. `passes`: [(model folder name under model_dir, rows or None)], loaded fresh; the student too
    (folder `student`)."""
    import torch

    from merge_distill.models import load_model
    from merge_distill.sampling import left_pad

    student = load_model(model_dir / student, trainable=True)
    models = {name: load_model(model_dir / name) for name, _ in passes}
    frozen = [(models[name], rows) for name, rows in passes]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    gen = torch.Generator().manual_seed(0)
    result = {"ours_s": [], "plain": [], "chunked": []}
    for kind in ("plain", "chunked"):  # warm-up
        floor_step(student, frozen, optimizer, prompt_ids, prompt_mask, new_tokens, gen, chunked=kind == "chunked")
    for _ in range(pairs):
        for kind in ("plain", "chunked"):
            result[kind].append(floor_step(student, frozen, optimizer, prompt_ids, prompt_mask, new_tokens, gen,
                                           chunked=kind == "chunked"))
        result["ours_s"].append(ours_step())
    return result
