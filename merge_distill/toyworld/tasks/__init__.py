"""Synthetic task families for the toy world: small, deterministic, pure Python.

Three families, one per domain, each with a *systematic misconception* (a wrong procedure
that only changes the answer on some prompts) and *random errors* (plausible wrong
answers).  A pretraining corpus mixes correct, misconceived and randomly wrong responses
(:class:`NoiseMix`), so a base model pretrained on it is mediocre, and RL with a 0/1
grader reward has something to fix.

Each family lives in its own module, beside the code they share:

* :mod:`~merge_distill.toyworld.tasks.family` -- :class:`TaskFamily` (the base) and :class:`NoiseMix`;
* :mod:`~merge_distill.toyworld.tasks.arithmetic` -- ``math``, :class:`ArithmeticTasks`;
* :mod:`~merge_distill.toyworld.tasks.string_functions` -- ``code``, :class:`StringFunctionTasks`;
* :mod:`~merge_distill.toyworld.tasks.units` -- ``units``, :class:`UnitConversionTasks`;
* :mod:`~merge_distill.toyworld.tasks.splits` -- the registry :data:`FAMILIES`, :func:`make_family`,
  :func:`make_splits` (disjoint train/test samples) and :func:`pretraining_corpus`.

Each module's docstring describes its family (prompt and response format, misconception,
problem space) or, for ``splits``, how problems are identified and sampled.  Everything is
importable from this package.
"""

from merge_distill.toyworld.tasks.arithmetic import ArithmeticTasks
from merge_distill.toyworld.tasks.family import NoiseMix, TaskFamily
from merge_distill.toyworld.tasks.splits import (
    DEFAULT_N_TEST,
    FAMILIES,
    make_family,
    make_splits,
    pretraining_corpus,
)
from merge_distill.toyworld.tasks.string_functions import (
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    OP_KINDS,
    SLICING_KINDS,
    StringFunctionTasks,
    spec_apply,
    spec_code,
    spec_prompt,
)
from merge_distill.toyworld.tasks.units import (
    MAX_UNITS_PROMPT_CHARS,
    MAX_UNITS_RESPONSE_CHARS,
    UNIT_PAIRS,
    UNITS_N,
    UnitConversionTasks,
)

__all__ = [
    "DEFAULT_N_TEST",
    "FAMILIES",
    "MAX_PROMPT_CHARS",
    "MAX_RESPONSE_CHARS",
    "MAX_UNITS_PROMPT_CHARS",
    "MAX_UNITS_RESPONSE_CHARS",
    "OP_KINDS",
    "SLICING_KINDS",
    "UNITS_N",
    "UNIT_PAIRS",
    "ArithmeticTasks",
    "NoiseMix",
    "StringFunctionTasks",
    "TaskFamily",
    "UnitConversionTasks",
    "make_family",
    "make_splits",
    "pretraining_corpus",
    "spec_apply",
    "spec_code",
    "spec_prompt",
]
