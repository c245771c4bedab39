#!/usr/bin/env bash
# From a fresh clone: set up (venv, CPU torch, the project, bubblewrap), then the default recipe: build the CPU
# zoo (cached), distill, evaluate, report in runs/math_code/. Run it again: it reuses the venv and the zoo, and
# resumes the run (a finished one is evaluated from its saved generations). Extra arguments go to `run`.
. "$(dirname "$0")/setup.sh"
merge-distill run recipes/math_code.yaml --resume "$@"
