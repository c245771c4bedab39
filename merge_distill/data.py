"""Prompt sources, prompt rendering, and the per-domain batch mixer.

Each prompt keeps the index of its expert (its domain) from file to reward: only that expert's teacher
and reference ever score the student's answer to it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.io import read_records
from merge_distill.recipe import ReasoningGymSpec

PROMPT_FIELDS = ("prompt", "problem", "question")


@dataclass(frozen=True)
class Prompt:
    expert: int            # index of the expert (domain) in the recipe
    record: dict           # the task record (grader fields included)
    token_ids: tuple[int, ...]


def load_records(source, *, what: str) -> list[dict]:
    """Records from a data file (read by `merge_distill.io.read_records`: .jsonl, .jsonl.gz, .json as a
    JSON list, .parquet), a `reasoning-gym` task (`ReasoningGymSpec`), or a `datasets` spec (an object with
    .dataset/.split)."""
    if isinstance(source, ReasoningGymSpec):
        return reasoning_gym_records(source, what=what)
    if not isinstance(source, (str, Path)):
        return _load_dataset(source, what=what)
    return read_records(source, what=what)


def reasoning_gym_records(spec: ReasoningGymSpec, *, what: str) -> list[dict]:
    """`spec.size` problems of a reasoning-gym task, drawn with `spec.seed` (the same seed, the same problems):
    each a `prompt` (the task's question) and an `answer` (the task's own answer, the math grader's ground
    truth), with a `task_id` naming task, seed and index."""
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"{what}: reasoning_gym sources need the reasoning-gym package "
                        "(pip install 'merge-distill[reasoning-gym]')") from None
    try:
        dataset = reasoning_gym.create_dataset(spec.reasoning_gym, size=spec.size, seed=spec.seed, **spec.config)
        entries = list(dataset)
    except Exception as e:  # noqa: BLE001 - an unknown task or option, in the library's words
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what}: reasoning_gym task '{spec.reasoning_gym}': {message}") from None
    return [{"task_id": f"{spec.reasoning_gym}/{spec.seed}/{i}", "prompt": entry["question"],
             "answer": str(entry["answer"])} for i, entry in enumerate(entries)]


def _load_dataset(spec, *, what: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what}: dataset specs need the `datasets` package (pip install 'merge-distill[hf]')") from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what}: cannot load dataset '{spec.dataset}' split '{spec.split}' ({e})") from None
    rows = list(ds)
    if not rows:
        raise UserError(f"{what}: dataset '{spec.dataset}' split '{spec.split}' is empty")
    return rows


def user_message(record: dict, template: str | None, *, what: str) -> str:
    """The text of the user turn: the expert's template over the record, or its prompt/problem field."""
    if template is None or template == "{prompt}" and "prompt" not in record:
        for field in PROMPT_FIELDS:
            if isinstance(record.get(field), str):
                return record[field]
        raise UserError(f"{what}: record {record.get('task_id', '?')} has none of the fields {', '.join(PROMPT_FIELDS)}")
    try:
        return template.format(**record)
    except KeyError as e:
        raise UserError(f"{what}: prompt_template needs field {e} that record {record.get('task_id', '?')} lacks") from None


def render_prompt(tokenizer, message: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending where the assistant's answer starts."""
    if tokenizer.chat_template is None:
        return tokenizer(message, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": message})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class DomainMixer:
    """Deterministic batches mixing domains by weight, each domain cycling through its own prompts.

    Each expert's prompts are visited in a fresh shuffled order every epoch (seeded by seed, expert,
    epoch), so the whole state is a few integers: it is saved in checkpoints and a resumed run sees the
    same prompts an uninterrupted one would.
    """

    def __init__(self, pools: list[list[Prompt]], weights: list[float], seed: int):
        if len(pools) != len(weights):
            raise ValueError("one weight per pool")
        self.pools, self.seed = pools, seed
        total = sum(weights)
        self.shares = [w / total for w in weights]
        self.epoch = [0] * len(pools)
        self.position = [0] * len(pools)
        self.credit = [0.0] * len(pools)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, i: int, epoch: int) -> list[int]:
        key = (i, epoch)
        if key not in self._orders:
            order = list(range(len(self.pools[i])))
            random.Random(f"{self.seed}/{i}/{epoch}").shuffle(order)
            self._orders = {key: order}  # only the current epoch is needed
        return self._orders[key]

    def counts(self, n: int) -> list[int]:
        """Prompts per expert this step: n split by weight, with remainders carried to later steps."""
        credit = [c + n * s for c, s in zip(self.credit, self.shares)]
        counts = [int(c) for c in credit]
        by_remainder = sorted(range(len(credit)), key=lambda i: (credit[i] - counts[i], -i), reverse=True)
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        self.credit = [c - k for c, k in zip(credit, counts)]
        return counts

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        for i, k in enumerate(self.counts(n)):
            for _ in range(k):
                order = self._order(i, self.epoch[i])
                batch.append(self.pools[i][order[self.position[i]]])
                self.position[i] += 1
                if self.position[i] == len(order):
                    self.epoch[i], self.position[i] = self.epoch[i] + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": list(self.epoch), "position": list(self.position), "credit": list(self.credit)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.credit = list(state["epoch"]), list(state["position"]), list(state["credit"])
