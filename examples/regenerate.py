"""Write examples/NAME.estimate.json for every examples/NAME.yaml: what `memfit estimate -c` prints for it.

    python examples/regenerate.py        (or: make examples)

tests/test_examples.py runs the estimate again and compares, so an example whose keys no longer parse, or whose
numbers the estimator changed, fails the tests until this is run again (and the diff reviewed).

The estimate runs with --no-calibrate: a probe profile on this machine would scale it. CUDA and MPS estimates sized
with memory_gb are the same on every machine. A CPU estimate's runtime holds one figure read from this machine (the
shared-library pages a process maps, memfit.estimate.memory.cpu_file_pages_bytes): it is recorded beside the output,
and the test pins it to the recorded value.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent


def estimate_command(config: Path) -> list[str]:
    return ["estimate", "-c", str(config), "--json", "--no-calibrate"]


def run_estimate(config: Path) -> dict:
    from memfit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(estimate_command(config))
    if code:
        raise SystemExit(f"memfit estimate -c {config} exited {code}")
    return json.loads(out.getvalue())


def main() -> int:
    from memfit.estimate import memory

    # Read where the estimate reads it (the CLI and the model code imported), then held: every CPU example uses
    # the same figure, and the file records exactly that one.
    measure, held = memory.cpu_file_pages_bytes, []

    def file_pages() -> int:
        if not held:
            held.append(measure())
        return held[0]

    memory.cpu_file_pages_bytes = file_pages
    configs = sorted(EXAMPLES.glob("*.yaml"))
    for config in configs:
        output = run_estimate(config)
        record = {
            "command": f"memfit {' '.join(estimate_command(Path('examples') / config.name))}",
            "measured_here": {"cpu_file_pages_bytes": file_pages()} if output["device"] == "cpu" else {},
            "output": output,
        }
        target = config.with_suffix(".estimate.json")
        target.write_text(json.dumps(record, indent=2) + "\n")
        verdict = "fits" if output["fits"] else "does not fit"
        print(f"{target.relative_to(EXAMPLES.parent)}: {output['total_bytes'] / 1024**3:.2f} GB per device, "
              f"{verdict}, largest batch {output['max_batch_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
