import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """memfit's cache (probe profiles and journals, the demo model) in a test-session dir, never the user's: a
    profile there would calibrate the estimator under test."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path_factory.getbasetemp() / "memfit-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from memfit.models import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smol_model_dir(tmp_path_factory):
    """smollm2-135m's real shapes (49k vocab, 576 hidden, GQA 9/3), cut to 4 layers to run fast on 2 cores."""
    from memfit.models import init_model

    return init_model("smollm2-135m", tmp_path_factory.mktemp("models") / "smol4", num_layers=4)
