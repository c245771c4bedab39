"""The CPU expert zoo: a base model pretrained on noisy solutions, and RL experts made from it.

Stages, each cached as a folder written atomically (a folder that exists is complete):

    data/            train/test task records per domain (disjoint by problem)
    base/            tiny Qwen3 pretrained (SFT) on a corpus where a share of the answers is wrong
    <domain>_expert/ GRPO from base with the domain grader's 0/1 reward
    <domain>_adapter/ the same GRPO through a LoRA adapter of base (r `adapter_r`, alpha `adapter_alpha`): a peft
                     adapter folder (the run's final/adapter, its base recorded as base/), built when a recipe
                     asks (`teacher: {base: zoo:base, adapter: zoo:math_adapter}`); base/ is shared, not copied
    large_base/, large_math_expert/, small_base/, mid_base/   strong-to-weak members (built when a recipe asks)
    large_math_expert@N/  the large expert's GRPO after N of its steps (a quarter, half, three quarters): the
                          teacher's RL strength, saved by the same run that builds large_math_expert

Deterministic given (preset, seed). `zoo:NAME` paths in recipes resolve into this folder, and the members they
name are built on first use (`merge_distill.toyworld.extension`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.io import atomic_dir, atomic_write_json, cache_root, write_jsonl
from merge_distill.provenance import provenance


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 3
    heads: int = 4


@dataclass(frozen=True)
class ZooPreset:
    domains: tuple[str, ...] = ("math", "code")
    n_train: int = 20000
    n_test: int = 1000
    size: ModelSize = ModelSize()
    misconception: float = 0.35
    random_error: float = 0.25
    check_rate: float = 0.0   # NoiseMix check marks (the `hack` preset): a length the RL expert learns to exploit
    check_gain: float = 1.0
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    grpo_steps: int = 80
    grpo_prompts: int = 32
    grpo_rollouts: int = 8
    grpo_lr: float = 2e-5
    # adapter experts (`<domain>_adapter`): the same GRPO (prompts, rollouts, reward) training a LoRA adapter of
    # base on every linear layer but the head. A LoRA wants a larger step than the whole model's: 50x grpo_lr, chosen
    # on the math GRPO's training reward (seed 0, steps 31-40: 3e-4 0.70, 1e-3 0.81, 3e-3 0.79; from 0.56 at step 1)
    adapter_r: int = 8
    adapter_alpha: float = 16.0
    adapter_lr: float = 1e-3
    adapter_steps: int = 80
    max_new_tokens: dict = field(default_factory=lambda: {"math": 40, "code": 48, "units": 40})
    # strong-to-weak members
    large_size: ModelSize = ModelSize(hidden=160, layers=4, heads=4)
    small_size: ModelSize = ModelSize(hidden=64, layers=2, heads=4)   # 0.12M parameters
    mid_size: ModelSize = ModelSize(hidden=96, layers=3, heads=4)     # 0.36M (base: 0.62M; large: 1.27M)


PRESETS: dict[str, ZooPreset] = {
    "default": ZooPreset(),
    # the default with a stronger misconception: the base's greedy answer is wrong on those prompts
    "hard": ZooPreset(misconception=0.45, random_error=0.2),
    # a third domain (unit conversions, graded by the example plugin in examples/merge-distill-units)
    "three": ZooPreset(domains=("math", "code", "units")),
    # reward hacking you can see: each step of a math response may follow "~" check marks; in the corpus an
    # unmarked step is always wrong (the misconception or a random error; the misconception is right where no
    # carry or borrow bites) and each mark makes that step's error rarer (x0.3), so the RL expert's lever is
    # to emit marks, as many as its 34-token budget allows; extrapolation can push past it (answers cut off)
    "hack": ZooPreset(domains=("math",), misconception=0.5, random_error=0.5, check_rate=0.5, check_gain=0.3,
                      max_new_tokens={"math": 34}),
    # seconds, for tests and install checks; one head of 32 dimensions, the smallest vLLM's CPU attention runs
    "smoke": ZooPreset(n_train=600, n_test=64, size=ModelSize(hidden=32, layers=1, heads=1), pretrain_steps=60,
                       pretrain_batch=32, pretrain_lr=5e-3, grpo_steps=3, grpo_prompts=8, grpo_rollouts=4,
                       grpo_lr=1e-4, adapter_r=4, adapter_alpha=8.0, adapter_lr=1e-3, adapter_steps=2,
                       large_size=ModelSize(hidden=48, layers=1, heads=2),
                       small_size=ModelSize(hidden=16, layers=1, heads=2),
                       mid_size=ModelSize(hidden=24, layers=1, heads=2)),
}
BASE_STAGES = ("data", "base")


def zoo_dir(preset: str, seed: int, directory: str | None = None) -> Path:
    return Path(directory) if directory else cache_root() / "zoo" / f"{preset}-seed{seed}"


def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise UserError(f"zoo.preset '{name}' is unknown (known: {', '.join(PRESETS)})")
    return PRESETS[name]


class Zoo:
    def __init__(self, preset: str = "default", seed: int = 0, directory: str | None = None, progress=None,
                 log=print, isolation: str = "bubblewrap"):
        self.name, self.preset, self.seed = preset, get_preset(preset), seed
        self.dir = zoo_dir(preset, seed, directory)
        self.progress, self.log = progress, log
        self.isolation = isolation  # of the code its GRPO experts' graders run (the recipe key `isolation`)

    # -------------------------------------------------------------------------------- public API
    def path(self, member: str) -> Path:
        return self.dir / member

    def ensure(self, members: list[str] | None = None) -> Path:
        """Build whatever the named members need (default: data, base and every domain expert), in a folder whose
        members were built by this preset (`check_built_by_preset`)."""
        self.check_built_by_preset()
        for m in self._wanted(members):
            self._build(m)
        return self.dir

    def check_built_by_preset(self) -> None:
        """A one-line error where the folder's zoo.json records another configuration of this preset (one changed
        since the folder was built, e.g. the smoke zoo's heads): its members would silently mix with new ones.
        Keys the record predates are not compared."""
        info = self.dir / "zoo.json"
        if not info.is_file():
            return
        built = json.loads(info.read_text()).get("config", {})
        now = json.loads(json.dumps(asdict(self.preset)))
        changed = [k for k in now if k in built and built[k] != now[k]]
        if changed:
            raise UserError(f"zoo '{self.name}' in {self.dir} was built by another version of the preset ("
                            + ", ".join(f"{k}: {built[k]} then, {now[k]} now" for k in changed)
                            + "); remove that folder to rebuild it, or set zoo.dir to another")

    def _wanted(self, members: list[str] | None) -> list[str]:
        return [m.split("/")[0] for m in members or ["data", "base", *[f"{d}_expert" for d in self.preset.domains]]]

    def graders_to_build(self, members: list[str] | None = None) -> set[str]:
        """The graders that building the named members (as `ensure`) would run: each unbuilt expert is a GRPO
        run rewarded by its domain's grader."""
        experts = {m.split("@")[0] for m in self._wanted(members)}  # `X@N` is saved by X's build
        return {self._domain_of(m) for m in experts if self._domain_of(m) and not self.path(m).exists()}

    @staticmethod
    def _domain_of(member: str) -> str | None:
        """The domain whose GRPO builds `member` (`math_expert`, `large_math_expert`, `math_adapter`), or None."""
        for suffix in ("_expert", "_adapter"):
            if member.endswith(suffix):
                return member.removeprefix("large_").removesuffix(suffix)
        return None

    # ---------------------------------------------------------------------------------- stages
    def _build(self, member: str) -> None:
        if self.path(member).exists():
            return
        builders = {"data": self._data, "base": lambda: self._base("base", self.preset.size),
                    "large_base": lambda: self._base("large_base", self.preset.large_size),
                    "small_base": lambda: self._base("small_base", self.preset.small_size),
                    "mid_base": lambda: self._base("mid_base", self.preset.mid_size)}
        for d in self.preset.domains:
            builders[f"{d}_expert"] = lambda d=d: self._expert(d, "base")
            builders[f"large_{d}_expert"] = lambda d=d: self._expert(d, "large_base")
            builders[f"{d}_adapter"] = lambda d=d: self._expert(d, "base", adapter=True)
        if "@" in member and member.split("@")[0] in builders:  # saved by its expert's build
            self._build(member.split("@")[0])
            if not self.path(member).exists():
                saved = sorted(p.name for p in self.dir.glob(member.split("@")[0] + "@*"))
                raise UserError(f"zoo '{self.name}' has no member '{member}' (its build saved: "
                                f"{', '.join(saved) or 'none; it predates intermediate checkpoints'})")
            return
        if member not in builders:
            raise UserError(f"zoo '{self.name}' has no member '{member}' (members: {', '.join(builders)})")
        for dependency in self._dependencies(member):  # built (and timed) first, on their own
            self._build(dependency)
        t0 = time.perf_counter()
        builders[member]()
        self._record(member, time.perf_counter() - t0)

    @staticmethod
    def _dependencies(member: str) -> list[str]:
        if member == "data":
            return []
        if member.endswith(("_expert", "_adapter")):
            return ["large_base" if member.startswith("large_") else "base"]
        return ["data"]

    def _record(self, member: str, seconds: float) -> None:
        """zoo.json: the preset's `config` (what `check_built_by_preset` compares) and, per member, its build time
        and the software and processor that built it (`provenance`: another CPU builds other weights)."""
        info_path = self.dir / "zoo.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {
            "preset": self.name, "seed": self.seed, "config": asdict(self.preset), "stages": {}}
        info["stages"][member] = {"seconds": round(seconds, 1), "provenance": provenance()}
        atomic_write_json(info_path, info)
        self.log(f"zoo: built {member} in {seconds:.1f} s")

    def _data(self) -> None:
        from merge_distill.toyworld.tasks import make_splits

        with atomic_dir(self.path("data")) as tmp:
            for d in self.preset.domains:
                train, test = make_splits(d, self.preset.n_train, self.preset.n_test, self.seed)
                write_jsonl(tmp / f"{d}_train.jsonl", train)
                write_jsonl(tmp / f"{d}_test.jsonl", test)

    def _base(self, name: str, size: ModelSize) -> None:
        import torch

        from merge_distill.models import save_model
        from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3
        from merge_distill.toyworld.pretrain import supervised_train
        from merge_distill.toyworld.tasks import NoiseMix, pretraining_corpus

        self._build("data")
        p = self.preset
        tokenizer = byte_tokenizer()
        model = tiny_qwen3(len(tokenizer), hidden=size.hidden, layers=size.layers, heads=size.heads,
                           seed=self.seed, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        mix = NoiseMix(misconception=p.misconception, random_error=p.random_error, check_rate=p.check_rate,
                       check_gain=p.check_gain)
        corpus = pretraining_corpus(list(p.domains), p.n_train, self.seed, mix, n_test=p.n_test)
        task = self.progress.add_task(f"zoo: pretrain {name}", total=p.pretrain_steps) if self.progress else None

        def on_step(step, loss):
            if self.progress:
                self.progress.update(task, completed=step, description=f"zoo: pretrain {name} loss {loss:.3f}")

        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            supervised_train(model, tokenizer, corpus, steps=p.pretrain_steps, batch_size=p.pretrain_batch,
                             lr=p.pretrain_lr, seed=self.seed, on_step=on_step)
        save_model(model, tokenizer, self.path(name))

    def _expert(self, domain: str, base: str, adapter: bool = False) -> None:
        """GRPO of `base` on the domain's train prompts with its grader's 0/1 reward: the whole model
        (`<domain>_expert`, `large_<domain>_expert`), or with `adapter` a LoRA adapter of it (`<domain>_adapter`: the
        member is the run's final/adapter folder). The member keeps the run's metrics as grpo_metrics.jsonl."""
        from merge_distill.checkpoint import checkpoint_dirs, export_checkpoint
        from merge_distill.build import train_recipe
        from merge_distill.recipe import Expert, Lora, Optim, Recipe, Rollout, Schedule, StudentModel
        from merge_distill.validate import check_recipe

        self._build(base)
        p = self.preset
        name = f"{domain}_adapter" if adapter else f"{domain}_expert" if base == "base" else f"large_{domain}_expert"
        run_dir = self.dir / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        # the large expert keeps its run's quarter checkpoints: the same teacher at weaker RL strengths
        every = p.grpo_steps // 4 if base == "large_base" and p.grpo_steps >= 4 else 0
        lora = Lora(r=p.adapter_r, lora_alpha=p.adapter_alpha) if adapter else None
        steps = p.adapter_steps if adapter else p.grpo_steps
        recipe = check_recipe(Recipe(
            method="grpo", student=StudentModel(path=str(self.path(base)), lora=lora), output_dir=str(run_dir),
            seed=self.seed, experts=[Expert(name=domain, prompts=str(self.path("data") / f"{domain}_train.jsonl"))],
            rollout=Rollout(prompts_per_step=p.grpo_prompts, rollouts_per_prompt=p.grpo_rollouts,
                            max_new_tokens=p.max_new_tokens[domain]),
            optim=Optim(lr=p.adapter_lr if adapter else p.grpo_lr, grad_clip=1.0),
            schedule=Schedule(steps=steps, checkpoint_every=every, keep_checkpoints=4),
            isolation=self.isolation))
        final = train_recipe(recipe, progress=self.progress)
        for step, folder in checkpoint_dirs(run_dir):
            if step < steps:  # (the last is the member itself)
                export_checkpoint(folder, self.path(base), self.path(f"{name}@{step}"))
        with atomic_dir(self.path(name)) as tmp:
            shutil.copytree(final / "adapter" if adapter else final, tmp, dirs_exist_ok=True)
            shutil.copy(run_dir / "metrics.jsonl", tmp / "grpo_metrics.jsonl")
        shutil.rmtree(run_dir, ignore_errors=True)
