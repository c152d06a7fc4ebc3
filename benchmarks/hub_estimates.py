"""The README's "Which model fits?" outputs: `memfit estimate` of Hub ids, fetched from a loopback Hub.

tests/hub_server.py serves the published config.json of Qwen/Qwen3-8B (as tests/test_hub.py holds it) and of
mistralai/Mixtral-8x7B-v0.1 (memfit's built-in copy of it) on 127.0.0.1; the real huggingface_hub client fetches
them through HF_ENDPOINT into a scratch HF cache, as it would from the Hub.

    python benchmarks/hub_estimates.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ["--model", "Qwen/Qwen3-8B", "--method", "qlora", "--device", "cuda", "--memory-gb", "24"],
    ["--model", "mistralai/Mixtral-8x7B-v0.1", "--method", "qlora", "--device", "cuda", "--memory-gb", "80"],
    ["--model", "mistralai/Mixtral-8x7B-v0.1", "--method", "qlora", "--device", "cuda", "--memory-gb", "141"],
]


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer
    from test_hub import QWEN3_8B

    from memfit.models.registry import get_architecture

    server = HubServer()
    server.add("Qwen/Qwen3-8B", {"config.json": QWEN3_8B})
    server.add("mistralai/Mixtral-8x7B-v0.1", {"config.json": get_architecture("mixtral-8x7b").to_hf_config().to_dict()})
    server.start()
    try:
        with tempfile.TemporaryDirectory() as hub_cache, tempfile.TemporaryDirectory() as memfit_cache:
            env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
            env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=hub_cache, MEMFIT_CACHE=memfit_cache, COLUMNS="110")
            for args in COMMANDS:
                print("$ memfit estimate " + " ".join(args), flush=True)
                result = subprocess.run([sys.executable, "-m", "memfit", "estimate", *args], capture_output=True,
                                        text=True, env=env)
                print(result.stdout + result.stderr, flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
