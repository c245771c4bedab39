"""What changes with the transformers version (the project runs on 5.16 to the newest; the vLLM environment has
5.19): only the paged sampler, which drives transformers 5.24's continuous-batching internals, is refused before
them, in one line naming the version."""

import sys

import pytest
import transformers
from transformers.generation.continuous_batching import ContinuousBatchingManager

from merge_distill.engines import PagedSampler, TransformersSampler, frozen_sampler, make_sampler
from merge_distill.errors import UserError
from merge_distill.toyworld.models import tiny_qwen3
from merge_distill.recipe import Recipe


def _recipe(rollout: str) -> Recipe:
    return Recipe.model_validate({"student": "s", "experts": [{"name": "math", "teacher": "t", "prompts": "p"}],
                                  "output_dir": "out", "backend": {"rollout": rollout}})


def test_paged_is_refused_in_one_line_where_its_internals_are_missing(monkeypatch):
    """transformers 5.19's `_run_generation_loop(self)` (5.24's takes `use_inference_mode`), put in place here on
    newer versions: `backend.rollout: paged` (and the paged frozen sampler) is a UserError naming the version, and
    the padded sampler is unchanged."""
    model = tiny_qwen3(16, hidden=16, layers=1, heads=2)
    monkeypatch.setattr(ContinuousBatchingManager, "_run_generation_loop", lambda self: None)
    monkeypatch.delitem(sys.modules, "merge_distill.paged", raising=False)
    message = (rf"^backend.rollout paged needs transformers' continuous batching as in transformers 5.24; this is "
               rf"transformers {transformers.__version__} \(transformers has no ContinuousBatchingManager"
               rf"._run_generation_loop\(use_inference_mode\)\)$")
    with pytest.raises(UserError, match=message):
        make_sampler(_recipe("paged"), model)
    with pytest.raises(UserError, match=message):
        frozen_sampler(_recipe("paged"), model)
    assert type(make_sampler(_recipe("transformers"), model)) is TransformersSampler


def test_paged_is_built_where_its_internals_are_there():
    pytest.importorskip("merge_distill.paged", exc_type=ImportError)
    assert isinstance(make_sampler(_recipe("paged"), tiny_qwen3(16, hidden=16, layers=1, heads=2)), PagedSampler)
