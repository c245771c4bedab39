#!/usr/bin/env bash
# The same set-up as scripts/quickstart.sh, then the whole test suite (what CI runs). Extra arguments go to
# pytest, e.g. `scripts/test.sh -m "not slow"` for the fast loop. `scripts/test.sh --vllm` instead makes (once) the
# vLLM environment (`scripts/setup.sh --vllm`: .venv-vllm, or MERGE_DISTILL_VLLM_VENV) and runs the tests marked
# `vllm` there, a real vLLM engine on this machine's CPU; elsewhere those tests skip.
if [ "${1:-}" = --vllm ]; then
  shift
  . "$(dirname "$0")/setup.sh" --vllm
  python -m pytest -q -m vllm "$@"
else
  . "$(dirname "$0")/setup.sh"
  python -m pytest -q "$@"
fi
