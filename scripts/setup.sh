# Set-up shared by scripts/quickstart.sh and scripts/test.sh (sourced, not run; `scripts/setup.sh --vllm` makes
# the vLLM environment, scripts/setup_vllm.sh). Idempotent: the venv is made
# once and reinstalled only when pyproject.toml or constraints.txt changes; bubblewrap is installed through apt
# when this user can. Every package gets the version of constraints.txt, the versions the test suite passed on
# (written by scripts/constraints.py), so two installs from one commit are the same.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v bwrap >/dev/null 2>&1; then  # the code sandbox's isolation (Debian/Ubuntu: package bubblewrap)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || true
  fi
  command -v bwrap >/dev/null 2>&1 || echo "setup: bubblewrap is missing and could not be installed here; as root:" \
    "apt-get install -y bubblewrap (code grading refuses to run without it unless you pass --isolation rlimits)" >&2
fi

if [ "${1:-}" = --vllm ]; then  # the second environment: vLLM's CPU build and the transformers it allows
  . scripts/setup_vllm.sh
  return 0 2>/dev/null || exit 0
fi

venv="${MERGE_DISTILL_VENV:-.venv}"
stamp="$venv/.merge-distill-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c constraints.txt torch==2.13.0  # the CPU build first: a bare `torch` can pull a CUDA one
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
. "$venv/bin/activate"
