"""Loading models and tokenizers, and checking that a set of models can be mixed.

Every model is an ordinary Hugging Face causal LM folder (config + safetensors + tokenizer), so what
this project saves `AutoModelForCausalLM.from_pretrained` loads, and what users bring we load the same way.
A single `.gguf` file is converted once into such a folder (`gguf_folder`: dequantised, kept in the cache)
and loaded from there.

Under fsdp a model is built on the meta device on every rank, sharded, and filled from rank 0's one copy
(`load_sharded`): no other rank ever holds the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from merge_distill import distributed
from merge_distill.errors import UserError

def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() or p.is_file() and p.suffix == ".gguf"


# Bump when the conversion below changes what it writes: older converted folders are then made again.
GGUF_CONVERSION = 1


def gguf_folder(path: str | os.PathLike, *, what: str = "model", log=None) -> Path:
    """The model folder a `.gguf` file converts to: made once per file (path, size and mtime) and per version
    of transformers and gguf, under `$MERGE_DISTILL_CACHE/gguf/`, then reused.

    transformers reads the file's metadata (config, tokenizer, chat template) and dequantises its weights into
    float32 (for most architectures through the `gguf` package: F16, BF16, Q4_0 ... Q8_0, the K and IQ quants);
    the folder holds them as an ordinary model (config.json, model.safetensors, tokenizer files), without the
    quantizer transformers attaches to GGUF models (whose `save_pretrained` refuses). transformers parses the
    whole metadata on every read of a GGUF (5-10 s for SmolLM2-135M, its 49k-token vocabulary included), and a
    run reads each model several times (tokenizer, config, weights, per role): converted once, each later load
    is a plain safetensors load.
    """
    import hashlib
    import importlib.metadata
    import importlib.util
    import shutil
    import sys
    import tempfile

    import transformers

    from merge_distill.io import cache_root

    p = Path(path).resolve()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{what} '{path}': loading a .gguf file needs {' and '.join(missing)}: "
                        "pip install 'merge-distill[gguf]'")
    st = p.stat()
    stamp = (f"{p}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}|"
             f"gguf {importlib.metadata.version('gguf')}|{GGUF_CONVERSION}")
    out = cache_root() / "gguf" / f"{p.stem}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    if (out / "complete").is_file():
        return out
    (log or (lambda m: print(m, file=sys.stderr)))(f"converting {p.name} once (dequantised) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                         **_dequantized())
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:  # the weights are plain tensors now; drop GGUF's unserializable quantizer
                quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - an unsupported architecture or quantisation type: one line
            raise UserError(f"{what} '{path}': cannot convert the GGUF file ({type(e).__name__}: {e})") from e
        (tmp / "source.json").write_text(json.dumps({"gguf": str(p), "stamp": stamp}, indent=1) + "\n")
        (tmp / "complete").write_text("")
        try:
            os.rename(tmp, out)
        except OSError:  # another process converted it first (or a stale, incomplete folder is in the way)
            if not (out / "complete").is_file():
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dequantized() -> dict:
    """from_pretrained kwargs that unpack every GGUF weight (transformers >= 5.24 otherwise keeps a supported
    architecture's weights in GGUF blocks when its `kernels` package is installed: not trainable)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _source(path: str | os.PathLike, *, what: str = "model") -> str:
    """The from_pretrained location: a model folder, or the converted folder of a `.gguf` file."""
    p = Path(path)
    return str(gguf_folder(p, what=what)) if p.suffix == ".gguf" else str(p)


def load_tokenizer(path: str | os.PathLike, *, what: str = "model") -> PreTrainedTokenizerBase:
    check_model_dir(path, what=what)
    try:
        return AutoTokenizer.from_pretrained(_source(path, what=what))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - surfaced as a one-line user error
        raise UserError(f"{what} '{path}': cannot load its tokenizer ({type(e).__name__}: {e})") from e


def load_model(path: str | os.PathLike, *, what: str = "model", dtype: torch.dtype = torch.float32,
               trainable: bool = False) -> torch.nn.Module:
    check_model_dir(path, what=what)
    try:
        model = AutoModelForCausalLM.from_pretrained(_source(path, what=what), dtype=dtype)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} '{path}': cannot load as a causal LM ({type(e).__name__}: {e})") from e
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def empty_model(path: str | os.PathLike, *, what: str = "model", dtype: torch.dtype = torch.float32,
                trainable: bool = False) -> torch.nn.Module:
    """The model at `path` built from its config on the meta device: its shapes, no storage, nothing read but
    config.json. Tied weights are one parameter, as in a loaded model."""
    from transformers import AutoConfig

    check_model_dir(path, what=what)
    try:
        config = AutoConfig.from_pretrained(_source(path, what=what))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} '{path}': cannot build as a causal LM ({type(e).__name__}: {e})") from e
    model.tie_weights()
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_sharded(path: str | os.PathLike, shard, *, what: str = "model", dtype: torch.dtype = torch.float32,
                 trainable: bool = False, device: str | torch.device = "cpu", transform=None) -> torch.nn.Module:
    """`shard(model, what)` of the model at `path` (e.g. `parallel.shard_frozen`), loaded so that only rank 0
    ever holds it whole (every rank calls). Each rank builds it on the meta device (`empty_model`) and shards it;
    rank 0 alone reads the files, into host memory; the shards then get storage on `device` and their values from
    rank 0's copy (`parallel.load_full_weights`: broadcast tensor by tensor, each rank keeping its shard), and the
    buffers a state dict leaves out (rotary `inv_freq`) are rank 0's too. `transform(model)` (e.g. a LoRA
    adapter injected: `adapters.add_lora`) is applied to rank 0's copy and to every rank's meta model before it is
    sharded, so rank 0's values of its new weights reach every rank. Rank 0 checks the scorer on its whole
    copy (`scoring.check_reproduces_logits`), which the meta model cannot run, and every rank takes its verdict."""
    from merge_distill import parallel
    from merge_distill.parallel import collectives
    from merge_distill.scoring import _VERIFIED, _split, check_reproduces_logits

    main = distributed.is_main()
    whole, verdict, buffers = None, None, {}
    if main:  # a problem here is every rank's: the others wait for its verdict, then raise it too
        try:
            whole = load_model(path, what=what, dtype=dtype, trainable=trainable)
            whole = transform(whole) if transform else whole
            backbone, head = _split(whole)
            if backbone is not None:
                check_reproduces_logits(whole, backbone, head)
            buffers = parallel.non_persistent_buffers(whole)
        except UserError as e:
            verdict = str(e)
    verdict, buffers = collectives.broadcast((verdict, buffers) if main else None)
    if verdict is not None:
        raise UserError(verdict)
    model = empty_model(path, what=what, dtype=dtype, trainable=trainable)
    model = transform(model) if transform else model
    setattr(model, _VERIFIED, True)
    wrapped = shard(model, what)
    parallel.materialize(wrapped, device, buffers, model)
    parallel.load_full_weights(model, whole.state_dict() if main else None)
    return wrapped


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} '{path}' does not exist")
    if not is_model_dir(p):
        raise UserError(f"{what} '{path}' is not a model folder (no config.json) or a .gguf file")


@dataclass(frozen=True)
class ModelInfo:
    """What the compatibility check compares, read without loading weights."""

    path: str
    vocab: dict[str, int]
    vocab_size: int  # rows of the embedding matrix
    chat_template: str | None


def model_info(path: str | os.PathLike, *, what: str = "model") -> ModelInfo:
    tok = load_tokenizer(path, what=what)
    with open(Path(_source(path, what=what)) / "config.json") as f:
        config = json.load(f)
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return ModelInfo(str(path), tok.get_vocab(), int(vocab_size or len(tok)), tok.chat_template)


def check_compatible(infos: dict[str, ModelInfo], *, allow_chat_template_mismatch: bool = False) -> None:
    """Student, teachers and references must agree token for token, or the rewards score the wrong tokens.

    `infos` maps a role name ("student", "teacher of math", ...) to its ModelInfo.
    """
    (first_role, first), *rest = infos.items()
    for role, info in rest:
        if info.vocab != first.vocab:
            diff = len(set(info.vocab.items()) ^ set(first.vocab.items()))
            raise UserError(
                f"{role} '{info.path}' has a different vocabulary from {first_role} '{first.path}' "
                f"({len(info.vocab)} vs {len(first.vocab)} tokens, {diff} token-id pairs differ)")
        if info.vocab_size != first.vocab_size:
            raise UserError(
                f"{role} '{info.path}' has vocab_size {info.vocab_size}, {first_role} '{first.path}' has "
                f"{first.vocab_size}")
        if info.chat_template != first.chat_template and not allow_chat_template_mismatch:
            raise UserError(
                f"{role} '{info.path}' has a different chat template from {first_role} '{first.path}' "
                "(set allow_chat_template_mismatch: true in the recipe to accept this)")


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save an HF model folder atomically: written beside, then renamed into place."""
    from merge_distill.io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
