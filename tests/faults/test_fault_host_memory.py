"""Host RAM beside a GPU, end to end: `memfit train` on the CPU with its guard watching a fake GPU (memfit.faults
`fake_gpu@MB`: the allocator's figure faked, RSS and available memory real) and a real leak of host memory
(`leak@MB`, tensors on the CPU): the host limit, not the device's, stops the run with a checkpoint (exit 3)."""

import json

from memfit.train.checkpoint import open_checkpoint

from .conftest import metrics, run, train_command

MB = 1024**2
GB = 1024**3


def test_host_rss_over_max_host_memory_stops_a_gpu_run_with_a_checkpoint(tiny_model_dir, tmp_path):
    out, host_limit_gb = tmp_path / "run", 0.8
    # 25 MB of host RAM more every step: the tiny model's process (about 0.5 GB) passes 0.8 GB in a dozen steps,
    # while the fake GPU holds a flat 100 MB under an automatic device limit of most of the machine's RAM.
    completed = run(train_command(tiny_model_dir, out, "--max-steps", "300", "--max-host-memory", str(host_limit_gb),
                                  "--memory-report-interval", "1000"),
                    fault="fake_gpu@100,leak@25")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 3, output[-3000:]
    assert "Host RAM limit: 0.80 GB process RSS (--max-host-memory)" in output
    assert "stopped by the memory guard" in output and "host RAM above its limit: process RSS" in output
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "guard_stop" and run_json["stop_limit"] == "host"
    assert run_json["stop_reason"].startswith("host RAM above its limit")
    assert run_json["host_limit"]["bytes"] == int(host_limit_gb * GB) and not run_json["host_limit"]["auto"]
    assert run_json["peak_host_rss_bytes"] > host_limit_gb * GB
    # The guard's device figure was the fake GPU's all along: the stop came from the host side.
    steps = metrics(out)
    assert {line["watched_bytes"] for line in steps} == {100 * MB}
    assert 3 <= len(steps) < 300
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    host_events = [e for e in events if e.get("event") == "GuardNotice" and e.get("limit") == "host"]
    assert len(host_events) == 1 and host_events[0]["kind"] == "limit"  # reported once
    checkpoint = open_checkpoint(out / "checkpoints" / f"step-{len(steps)}")
    assert checkpoint.step == len(steps) and checkpoint.meta["reason"] == "memory limit"
    assert "--resume" in output
    assert "host RAM, not the GPU's, ran short" in output and "higher --max-memory" not in output
