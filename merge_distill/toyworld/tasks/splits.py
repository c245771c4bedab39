"""The family registry, train/test splits and the noisy pretraining corpus.

Problem identity and splits: a problem is identified by its operands (math), its
spec (code) or its (from unit, to unit, value) (units); records are a pure function of
the identity (the code tests' input strings are seeded by the spec).  :func:`make_splits`
draws a simple random sample (without replacement, uniform over the family's problem
space) for test first, then for train from what is left, so train and test are disjoint
and identically distributed.  The test draw does not depend on ``n_train``, and test(n)
is a prefix of test(m) for n <= m: a train split made with ``n_test=m`` never contains a
problem of a test split made with the same seed and ``n_test <= m``.  If the space is
too small, ``n_train`` is capped at what is left (see :meth:`TaskFamily.space_size`).
"""

from __future__ import annotations

import inspect
import random
from typing import Any

from merge_distill.errors import UserError
from merge_distill.toyworld.tasks.arithmetic import ArithmeticTasks
from merge_distill.toyworld.tasks.family import NoiseMix, TaskFamily
from merge_distill.toyworld.tasks.string_functions import StringFunctionTasks
from merge_distill.toyworld.tasks.units import UnitConversionTasks

FAMILIES: dict[str, type[TaskFamily]] = {
    "math": ArithmeticTasks,
    "code": StringFunctionTasks,
    "units": UnitConversionTasks,
}

DEFAULT_N_TEST = 2000


def make_family(domain: str, **family_options: Any) -> TaskFamily:
    if domain not in FAMILIES:
        raise UserError(f"unknown toy domain {domain!r} (known: {', '.join(FAMILIES)})")
    cls = FAMILIES[domain]
    allowed = _family_option_names(cls)
    unknown = set(family_options) - allowed
    if unknown:
        raise UserError(f"toy domain {domain!r}: unknown option(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    return cls(**family_options)


def _family_option_names(cls: type[TaskFamily]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _draw_keys(family: TaskFamily, rng: random.Random, n_test: int, n_train: int) -> tuple[list, list]:
    """(test keys, train keys): a uniform random sample without replacement, test first."""
    keys = family._all_keys()
    if keys is not None:  # small space: a seeded random permutation of the whole space
        if n_test > len(keys):
            raise UserError(f"toy domain {family.domain!r}: n_test={n_test} exceeds its {len(keys)} problems")
        rng.shuffle(keys)
        return keys[:n_test], keys[n_test : n_test + n_train]
    seen: set = set()
    out: list[list] = [[], []]
    for which, n in ((0, n_test), (1, n_train)):
        budget = 50 * n + 1000
        while len(out[which]) < n and budget > 0:
            budget -= 1
            key = family._sample_key(rng)
            if key not in seen:
                seen.add(key)
                out[which].append(key)
        if which == 0 and len(out[0]) < n_test:  # pragma: no cover - only for tiny spaces
            raise UserError(f"toy domain {family.domain!r}: could not draw {n_test} distinct test problems")
    return out[0], out[1]


def make_splits(
    domain: str, n_train: int, n_test: int, seed: int, **family_options: Any
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, test) record lists for ``domain``, deterministic given ``seed``.

    Test is a uniform random sample of ``n_test`` problems of the family's space (it does
    not depend on ``n_train``, and a smaller ``n_test`` gives a prefix of a larger one);
    train is a uniform random sample of ``n_train`` of the *remaining* problems, so no
    test problem (by identity: operands / spec) appears in train.  When the space is too
    small, train is capped at the ``space_size - n_test`` problems left (e.g. math:
    12195 problems, so n_test=2000 leaves at most 10195 train; code (max_ops=2): 4155,
    leaving 2155); ``n_test`` larger than the space is an error.  ``task_id``\\ s are
    ``"<domain>/<split>/<index:06d>"``.  ``family_options`` go to the family
    (math: ``hard``; code: ``max_ops``; units: none)."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"make_splits: n_train and n_test must be >= 0 (got {n_train}, {n_test})")
    family = make_family(domain, **family_options)
    rng = random.Random(f"toyworld-splits:{domain}:{seed}")
    test_keys, train_keys = _draw_keys(family, rng, n_test, n_train)

    def records(keys: list, split: str) -> list[dict]:
        width = max(6, len(str(max(len(keys) - 1, 0))))
        return [{"task_id": f"{domain}/{split}/{i:0{width}d}", **family._record(k)} for i, k in enumerate(keys)]

    return records(train_keys, "train"), records(test_keys, "test")


def pretraining_corpus(
    domains: list[str],
    n_per_domain: int,
    seed: int,
    mix: NoiseMix,
    *,
    n_test: int = DEFAULT_N_TEST,
    **family_options: Any,
) -> list[tuple[str, str]]:
    """Shuffled (prompt, noisy response) pairs, ``n_per_domain`` per domain, from TRAIN
    problems only: ``make_splits(domain, n_per_domain, n_test, seed)``'s train split, so
    no problem of a test split made with the same seed and any ``n_test`` up to this one
    (default 2000) leaks.  If train has fewer problems than ``n_per_domain`` it is cycled
    (each occurrence gets an independent noisy response).  ``family_options`` go to the
    families that accept them (``hard`` -> math, ``max_ops`` -> code); an option no
    requested family accepts is an error."""
    if n_per_domain < 0:
        raise UserError(f"pretraining_corpus: n_per_domain must be >= 0 (got {n_per_domain})")
    for d in domains:
        if d not in FAMILIES:
            raise UserError(f"unknown toy domain {d!r} (known: {', '.join(FAMILIES)})")
    accepted = set().union(*(_family_option_names(FAMILIES[d]) for d in domains)) if domains else set()
    unknown = set(family_options) - accepted
    if unknown:
        raise UserError(f"pretraining_corpus: option(s) {sorted(unknown)} accepted by none of {list(domains)}")
    pairs: list[tuple[str, str]] = []
    for domain in domains:
        opts = {k: v for k, v in family_options.items() if k in _family_option_names(FAMILIES[domain])}
        family = make_family(domain, **opts)
        train, _ = make_splits(domain, n_per_domain, n_test, seed, **opts)
        if not train:
            if n_per_domain:
                raise UserError(f"pretraining_corpus: no train problems left for {domain!r} (n_test={n_test})")
            continue
        rng = random.Random(f"toyworld-corpus:{domain}:{seed}")
        for i in range(n_per_domain):
            record = train[i % len(train)]
            pairs.append((record["prompt"], family.noisy_response(record, rng, mix)))
    random.Random(f"toyworld-corpus-shuffle:{seed}").shuffle(pairs)
    return pairs
