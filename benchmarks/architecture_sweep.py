"""Every causal-LM architecture transformers ships, estimated: which ones memfit estimates and what the rest say.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, the config class's defaults (for most, the published
base model's shapes) are written to a config.json, and a fresh process estimates one LoRA step on it (CUDA, bf16,
batch 1 x 512: `estimate_memory`, what `memfit estimate` computes first, without its batch search). A row is
"estimated" when that gives a breakdown, "exit 2" with the one line memfit prints for it (as the CLI does), or
"traceback" when it crashed, which is a bug.

    python benchmarks/architecture_sweep.py [--only TYPE,...] [--timeout 300] [--write]

--write also keeps the rows in docs/architecture_sweep.json; with --only, the listed types' rows replace theirs
there (a re-run after a fix), and the table is written from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024**3
ROWS_FILE = Path(__file__).resolve().parents[1] / "docs" / "architecture_sweep.json"
CHILD = """
import json, sys
from memfit.libraries import hide_bitsandbytes_from_peft, quiet
quiet()
hide_bitsandbytes_from_peft()
from memfit.config import TrainConfig
from memfit.errors import MemfitError, error_line
from memfit.estimate.memory import Hardware, estimate_memory
from memfit.models import resolve_model
try:
    resolved = resolve_model(sys.argv[1])
    estimate = estimate_memory(resolved.config, TrainConfig(method="lora", dtype="bf16", seq_len=512),
                               Hardware("cuda", 80 * 1024**3))
except MemfitError as error:
    sys.stderr.write(f"memfit: error: {error_line(error)}\\n")
    sys.exit(2)
print(json.dumps({"params": estimate.params, "total_bytes": estimate.total_bytes,
                  "num_experts": estimate.num_experts}))
"""


def sweep(types: list[str], timeout: float) -> list[dict]:
    from transformers import AutoConfig

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, MEMFIT_CACHE=str(Path(scratch) / "cache"), COLUMNS="200")
        for model_type in types:
            row = {"model_type": model_type}
            model_dir = Path(scratch) / model_type
            try:
                config = AutoConfig.for_model(model_type)
                model_dir.mkdir()
                config.save_pretrained(model_dir)
            except Exception as error:  # noqa: BLE001 - a config class that cannot be built with its defaults
                rows.append({**row, "outcome": "no default config", "detail": f"{type(error).__name__}: {error}"[:160]})
                print(rows[-1], flush=True)
                continue
            started = time.time()
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir)], capture_output=True, text=True,
                                      timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                rows.append({**row, "outcome": "timeout", "detail": f"over {timeout:.0f} s", "seconds": timeout})
                print(rows[-1], flush=True)
                continue
            row["seconds"] = round(time.time() - started, 1)
            if done.returncode == 0:
                data = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(outcome="estimated", params=data["params"], total_gb=data["total_bytes"] / GB,
                           experts=data.get("num_experts"))
            elif "Traceback" in done.stderr:
                row.update(outcome="traceback", detail=done.stderr.strip().splitlines()[-1][:160])
            else:
                row.update(outcome=f"exit {done.returncode}", detail=" ".join(done.stderr.split())[:200])
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    import transformers

    estimated = [row for row in rows if row["outcome"] == "estimated"]
    crashed = [row for row in rows if row["outcome"] in ("traceback", "timeout")]
    lines = [f"### Every causal-LM architecture in transformers {transformers.__version__}: {len(estimated)} of "
             f"{len(rows)} estimated, {len(crashed)} crashed or timed out", "",
             f"Measured with `{command}`: each model type's default config, one LoRA step estimated (CUDA, bf16, "
             "batch 1 × 512) in a fresh process (2 CPU cores, shared with other work).", "",
             "| model type | outcome | params | total GB (LoRA, bf16, batch 1 × 512) | s | detail |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        params = f"{row['params'] / 1e9:.2f}B" if "params" in row else ""
        total = f"{row['total_gb']:.1f}" if "total_gb" in row else ""
        detail = row.get("detail", "") + (f"{row['experts']} experts" if row.get("experts") else "")
        lines.append(f"| {row['model_type']} | {row['outcome']} | {params} | {total} | {row.get('seconds', '')} | "
                     f"{detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = sweep(types, args.timeout)
    kept = ROWS_FILE.exists() and args.only and args.write
    if kept:  # the other types' rows from the last full run
        by_type = {row["model_type"]: row for row in json.loads(ROWS_FILE.read_text())}
        by_type.update({row["model_type"]: row for row in rows})
        rows = [by_type[name] for name in sorted(by_type)]
    body = markdown(rows, "python benchmarks/architecture_sweep.py --write"
                    + (f" (then --only for the types fixed since: {args.only})" if kept else ""))
    print(body)
    if args.write:
        ROWS_FILE.write_text(json.dumps(rows, indent=1) + "\n")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from estimate_accuracy import write_section

        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "architecture-sweep", body)
    sys.exit(1 if any(row["outcome"] in ("traceback", "timeout") for row in rows) else 0)


if __name__ == "__main__":
    main()
