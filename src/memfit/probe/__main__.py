"""A probe trial's child process: `python -m memfit.probe SPEC_JSON RUN_DIR` (started by memfit.probe.trial)."""

import sys

from memfit.probe.trial import child_main

sys.exit(child_main(sys.argv[1], sys.argv[2]))
