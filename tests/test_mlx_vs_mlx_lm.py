"""benchmarks/mlx_vs_mlx_lm.py's `--same-rows` mode runs on CPU: each contender's own step on the same rows, so its
code cannot rot between the runs that publish its table."""

from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_same_rows_runs_both_contenders_steps_and_mlx_lm_really_trains(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import mlx_vs_mlx_lm as bench

    monkeypatch.setitem(bench.SETTINGS, "batch_size", 2)
    monkeypatch.setitem(bench.SETTINGS, "seq_len", 64)
    found = bench.same_rows(tmp_path, tiny_model_dir, steps=2, grad_checkpointing=True, repeats=1, no_cache=True)
    for name in ("memfit", "mlx_lm"):
        (peaks,) = found[name]
        assert len(peaks) == 2 and all(peak > 0 for peak in peaks), (name, peaks)
    # mlx-lm's own train() ran to its end: it saves its adapters there.
    assert (tmp_path / "same-mlx_lm-0.safetensors").stat().st_size > 0
    summary = {"preset": "tiny", "layers": None, "steps": 2, "settings": bench.SETTINGS, "grad_checkpointing": True,
               "no_cache": True}
    table = bench.same_rows_markdown(found, summary, "CMD")
    rows = table.split("|---|---|---|---|\n")[1].splitlines()
    assert len(rows) == 2 and f"{max(found['mlx_lm'][0]):,}" in rows[1]
    assert "mx.set_cache_limit(0)" in table


def test_memfit_glibc_contender_runs_memfit_with_glibcs_malloc(tmp_path, monkeypatch):
    """The contender that measures what memfit's allocator policy costs really runs under MEMFIT_MALLOC=none (the
    trainer says so in its events), and the default contender under memfit's own policy (no such notice)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("MEMFIT_MALLOC", raising=False)
    import mlx_vs_mlx_lm as bench

    monkeypatch.setitem(bench.SETTINGS, "batch_size", 2)
    monkeypatch.setitem(bench.SETTINGS, "seq_len", 64)
    model, data, _ = bench.prepare(tmp_path, "tiny", None, 64)
    notices = {}
    for name, env in (("memfit", None), ("memfit_glibc", {"MEMFIT_MALLOC": "none"})):
        found = bench.run_memfit(model, data, tmp_path / name, steps=1, grad_checkpointing=True, env=env)
        assert "error" not in found, found
        notices[name] = (tmp_path / name / "events.jsonl").read_text()
    assert "glibc as it comes" in notices["memfit_glibc"]
    assert "glibc as it comes" not in notices["memfit"]
