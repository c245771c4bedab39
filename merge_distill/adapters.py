"""LoRA through peft: a LoRA student, experts held as adapters, and one base in memory for all of them.

peft is the engine (its `LoraConfig`, `get_peft_model`, multi-adapter `load_adapter`/`set_adapter`,
`disable_adapter`, `merge_and_unload`); nothing here computes a LoRA product by hand.

- A LoRA student (`student: {path, lora}`): `add_lora` injects a fresh adapter ("default", B = 0, so the initial
  student is exactly its base) into the loaded base. The trainer works with the base model object, whose layers
  now carry the adapter; only the adapter's parameters require gradients.
- An adapter expert (`teacher: {base, adapter}`) is scored through an `AdapterHost`: one base model in memory
  with any number of adapters loaded by name; `using(adapter)` turns one on (or all off for the base itself:
  the pre-RL reference, or a LoRA student's initial model) for the duration of a block. When the base is the
  LoRA student's, the host is the student itself: one copy serves the student, every teacher and every
  reference.
- Where a whole model is needed (evaluation, weight-space merges), `model_folder` gives an adapter expert as an
  ordinary HF folder, merged once by `merge_and_unload` and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from merge_distill.errors import UserError
from merge_distill.recipe import AdapterModel, Lora, ModelRef

STUDENT_ADAPTER = "default"  # peft's name of the adapter `get_peft_model` creates: the LoRA student's
ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA students and adapter experts need peft: pip install 'merge-distill[peft]'") from None
    return peft


def lora_config(spec: Lora):
    """peft's `LoraConfig` for a causal LM from the recipe's `lora:` (the same names)."""
    return _peft().LoraConfig(task_type="CAUSAL_LM", bias="none", **spec.model_dump())


def add_lora(model: torch.nn.Module, spec: Lora, seed: int):
    """`model` (a loaded base) with a fresh LoRA adapter injected in place (peft's `get_peft_model`): the
    PeftModel. Its A matrices are drawn with `seed` (B starts at zero), so every rank and every resume of a run
    draws the same adapter; only the adapter's parameters require gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _peft().get_peft_model(model, lora_config(spec))


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter(ref: AdapterModel, *, what: str) -> None:
    """The adapter folder exists and is a peft adapter; its base is checked as any model (`models.check_model_dir`)."""
    from merge_distill.models import check_model_dir

    check_model_dir(ref.base, what=f"{what} base")
    if not is_adapter_dir(ref.adapter):
        problem = "does not exist" if not Path(ref.adapter).exists() else f"is not a peft adapter (no {ADAPTER_CONFIG})"
        raise UserError(f"{what} adapter '{ref.adapter}' {problem}")


class AdapterHost:
    """One base model in memory and the adapters loaded into it, each switched on for a block (`using`).

    `model` is the base model object (its layers carry the adapters once any is loaded); `peft` its PeftModel,
    None until the first adapter loads (a frozen host) or the LoRA student's (`trainable`: its adapter, the active
    one outside `using` blocks, whose parameters keep requiring gradients). Inside a block the model is in eval
    mode (no adapter dropout) and, when its weights are float32 but the frozen models' dtype is lower (the
    student's base), computes under autocast to that dtype, as a separately stored frozen model would."""

    def __init__(self, model: torch.nn.Module, peft=None, *, trainable: str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.model, self.peft, self.trainable, self.dtype = model, peft, trainable, dtype
        self.names: dict[str, str] = {}  # resolved adapter folder -> its name in the model

    def _load(self, adapter: str) -> str:
        key = str(Path(adapter).resolve())
        if key not in self.names:
            name = f"expert{len(self.names)}"
            try:
                if self.peft is None:
                    self.peft = _peft().PeftModel.from_pretrained(self.model, adapter, adapter_name=name,
                                                                  is_trainable=False)
                else:
                    self.peft.load_adapter(adapter, adapter_name=name, is_trainable=False)
            except Exception as e:  # noqa: BLE001 - a wrong base or a damaged folder: one line
                raise UserError(f"adapter '{adapter}': cannot load onto its base ({type(e).__name__}: {e})") from e
            self.names[key] = name
        return self.names[key]

    @contextlib.contextmanager
    def using(self, adapter: str | None):
        """The base with adapter `adapter` on (a folder; loaded on first use), or with every adapter off (None)."""
        was_training = self.model.training
        self.model.eval()
        weights = next(self.model.parameters()).dtype
        cast = (torch.autocast(device_type=next(self.model.parameters()).device.type, dtype=self.dtype)
                if weights == torch.float32 and self.dtype != torch.float32 else contextlib.nullcontext())
        try:
            with cast:
                if adapter is None:
                    with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                        yield self.model
                else:
                    name = self._load(adapter)
                    self.peft.set_adapter(name, inference_mode=True)
                    try:
                        yield self.model
                    finally:
                        if self.trainable is not None:  # the student's adapter trains again (the others stay frozen)
                            self.peft.set_adapter(self.trainable)
        finally:
            self.model.train(was_training)


def merged_model(ref: AdapterModel, *, what: str = "model", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The adapter merged into its base (`merge_and_unload`): an ordinary model, loaded whole."""
    from merge_distill.models import load_model

    check_adapter(ref, what=what)
    base = load_model(ref.base, what=f"{what} base", dtype=dtype)
    try:
        peft_model = _peft().PeftModel.from_pretrained(base, ref.adapter)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} adapter '{ref.adapter}': cannot load onto base '{ref.base}' "
                        f"({type(e).__name__}: {e})") from e
    return peft_model.merge_and_unload()


def _stamp(path: str) -> str:
    """A folder's identity for the merge cache: every file's name, size and mtime."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return json.dumps([str(p)] + [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size,
                                   f.stat().st_mtime_ns] for f in files])


def model_folder(ref: ModelRef, *, what: str = "model") -> str:
    """An ordinary HF model folder for `ref`: a path as it is; an adapter model merged into its base once
    (`merged_model`) and kept under `$MERGE_DISTILL_CACHE/merged/` (keyed by both folders' files)."""
    if isinstance(ref, str):
        return ref
    from merge_distill.io import atomic_dir, cache_root
    from merge_distill.models import load_tokenizer

    check_adapter(ref, what=what)
    digest = hashlib.sha256((_stamp(ref.base) + _stamp(ref.adapter)).encode()).hexdigest()[:16]
    out = cache_root() / "merged" / f"{Path(ref.adapter).name}-{digest}"
    if not (out / "config.json").is_file():
        model = merged_model(ref, what=what)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(ref.base, what=f"{what} base").save_pretrained(tmp)
            (Path(tmp) / "merged_from.json").write_text(json.dumps(ref.model_dump(), indent=1) + "\n")
    return str(out)


def save_adapter_and_merged(weights: dict[str, torch.Tensor], tied: set[str], config, spec: Lora, base: str,
                            tokenizer, folder: Path, *, dtype: torch.dtype, generation_config=None) -> None:
    """A LoRA student's final folder from its full weights (`weights`: the base model's state dict with the
    adapter's layers in it, as `parallel.full_tensors` yields it, less the `tied` names): the merged model
    (`merge_and_unload`: an ordinary HF folder) at `folder`, the adapter alone (peft's own folder, its base
    recorded as `base`) at `folder/adapter`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    twin = add_lora(twin, spec, seed=0)  # shapes only: the weights come from `weights`
    inner = twin.get_base_model()
    # the merge adds into the wrapped layers' weights: copies of those, never the live student's own tensors
    weights = {k: v.clone() if ".base_layer." in k else v for k, v in weights.items()}
    missing = inner.load_state_dict(weights, assign=True, strict=False).missing_keys
    assert set(missing) <= tied, f"no weights for {sorted(set(missing) - tied)}"
    inner.tie_weights()
    twin.peft_config[STUDENT_ADAPTER].base_model_name_or_path = base
    twin.save_pretrained(folder / "adapter", safe_serialization=True)
    merged = twin.merge_and_unload().to(dtype)
    if generation_config is not None:
        merged.generation_config = generation_config
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
