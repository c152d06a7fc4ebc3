import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    """A test session's memfit cache. Its traces (`estimate/`: what a model's layers hold, keyed by the config, the
    settings and the library versions, written atomically) are shared by the xdist workers of one run, so a model
    that tests on both workers estimate is traced once; the rest (probe profiles, journals) stays the worker's own."""
    cache = tmp_path_factory.getbasetemp() / "memfit-cache"
    cache.mkdir(exist_ok=True)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is <this run's dir>/popen-gwN
        shared = tmp_path_factory.getbasetemp().parent / "shared-estimate-cache"
        shared.mkdir(exist_ok=True)
        if not (cache / "estimate").exists():
            (cache / "estimate").symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture(autouse=True)
def _private_cache(_session_cache, monkeypatch):
    """memfit's cache (probe profiles and journals, the demo model) in a test-session dir, never the user's: a
    profile there would calibrate the estimator under test."""
    monkeypatch.setenv("MEMFIT_CACHE", str(_session_cache))


@pytest.fixture(autouse=True)
def _no_faults(monkeypatch):
    """No injected fault (memfit.faults) leaks into a test, or out of one: the variable, its cache, leaked memory."""
    from memfit import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    faults._faults.cache_clear()
    yield
    faults._faults.cache_clear()
    faults._leaked.clear()


@pytest.fixture
def recommend_calls(monkeypatch):
    """torch's recommend table replaced by a recorder of (config, hardware, methods): what a command asks of it,
    without its ~15 traces (minutes on a loaded machine; test_cli runs it for real)."""
    calls = []

    def record(config, hardware, methods=("full", "lora", "qlora")):
        calls.append((config, hardware, methods))
        return {"device": hardware.device, "memory_bytes": hardware.memory_bytes, "precision": "bf16",
                "seq_len": config.seq_len, "batch_size": config.batch_size,
                "grad_checkpointing": config.grad_checkpointing, "methods": list(methods), "models": [],
                "largest": {method: None for method in methods}}

    monkeypatch.setattr("memfit.estimate.recommend.recommend", record)
    return calls


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from memfit.models import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smol_model_dir(tmp_path_factory):
    """smollm2-135m's real shapes (49k vocab, 576 hidden, GQA 9/3), cut to 4 layers to run fast on 2 cores."""
    from memfit.models import init_model

    return init_model("smollm2-135m", tmp_path_factory.mktemp("models") / "smol4", num_layers=4)


@pytest.fixture(scope="session")
def qwen_bf16_model_dir(tmp_path_factory):
    """qwen2.5-0.5b's shapes (a 136M-parameter embedding), 2 layers, stored in bf16 as published checkpoints are:
    fp32 training converts it on load."""
    from memfit.models import init_model

    return init_model("qwen2.5-0.5b", tmp_path_factory.mktemp("models") / "qwen2-bf16", num_layers=2, dtype="bf16")
