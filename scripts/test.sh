#!/usr/bin/env bash
# The same set-up as scripts/quickstart.sh, then the whole test suite (what CI runs). Extra arguments go to
# pytest, e.g. `scripts/test.sh -m "not slow"` for the fast loop.
. "$(dirname "$0")/setup.sh"
python -m pytest -q "$@"
