"""Hub ids (`--model ORG/NAME[@REVISION]`) against a loopback Hub (tests/hub_server.py) with the real huggingface_hub
client pointed at it through HF_ENDPOINT: nothing of huggingface_hub is mocked. huggingface_hub reads HF_ENDPOINT,
HF_HUB_OFFLINE and the cache paths when it is imported, so every case runs `python -m memfit` in a subprocess with
its own environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import HubServer

SRC = Path(__file__).resolve().parents[1] / "src"

# Qwen/Qwen3-8B's config.json as published (https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Its safetensors hold 8,190,735,360 parameters (8.19B; 6.95B without the embedding and the untied head, as the
# model card says): 36 layers x 192,946,432 + 2 x 151,936 x 4,096 + the final norm's 4,096.
QWEN3_8B_PARAMS = 8_190_735_360

# meta-llama/Llama-3.1-8B's config.json as published (a gated repo).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA31_8B_PARAMS = 8_030_261_248
TOKEN = "hf_loopbackTestToken0123456789"


@pytest.fixture(scope="module")
def hub():
    server = HubServer()
    server.add("Qwen/Qwen3-8B", {"config.json": QWEN3_8B}, revisions={"v1.0": "1" * 40})
    server.add("meta-llama/Llama-3.1-8B", {"config.json": LLAMA31_8B}, gated_token=TOKEN)
    server.add("acme/odd-arch", {"config.json": {**QWEN3_8B, "model_type": "not-a-transformers-type"}})
    server.add("acme/just-data", {"README.md": b"# a dataset, no config\n"})
    server.add("old-org/qwen3-8b-renamed", {}, moved_to="Qwen/Qwen3-8B")
    server.start()
    yield server
    server.stop()


def _env(tmp_path: Path, endpoint: str | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "MEMFIT_USER_")) and key != "TRANSFORMERS_OFFLINE"}
    env.update(PYTHONPATH=str(SRC), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


def memfit(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memfit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def estimate_json(env, model: str, *extra: str) -> dict:
    # seq 128: the subject is where the config comes from; short sequences make the traces of a full-size layer cheap.
    done = memfit(env, "estimate", "--model", model, "--method", "lora", "--device", "cuda", "--memory-gb", "80",
                  "--seq-len", "128", "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The failure is exit 2 and one line on stderr, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memfit: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_hub_id_fetches_config_into_the_hf_cache_then_works_offline(hub, tmp_path):
    env = _env(tmp_path, hub.url)
    first = estimate_json(env, "Qwen/Qwen3-8B")
    assert first["params"] == QWEN3_8B_PARAMS
    assert first["source"] == "hub" and "Qwen/Qwen3-8B" in first["config_source"]
    seen = hub.requests_for("Qwen/Qwen3-8B")
    assert [s.method for s in seen].count("GET") == 1  # config.json only, once
    assert all(s.path == "/Qwen/Qwen3-8B/resolve/main/config.json" for s in seen)
    # The normal HF cache layout under HF_HOME/hub: refs/main names the commit, the snapshot holds config.json.
    repo = tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen3-8B"
    commit = (repo / "refs" / "main").read_text()
    assert commit == hub.repos["Qwen/Qwen3-8B"].revisions["main"]
    snapshot = repo / "snapshots" / commit / "config.json"
    assert json.loads(snapshot.read_text()) == QWEN3_8B
    assert sorted(p.name for p in (repo / "snapshots" / commit).iterdir()) == ["config.json"]  # no weights
    # Offline now: the same id comes from the cache, nothing is asked of the server, and the output says where
    # the config came from.
    before = len(hub.seen)
    text = memfit(_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"), "estimate", "--model", "Qwen/Qwen3-8B", "--method",
                  "lora", "--device", "cuda", "--memory-gb", "80", "--seq-len", "128")
    assert text.returncode == 0, text.stderr
    words = " ".join(text.stdout.split())
    assert f"of {QWEN3_8B_PARAMS:,}" in words and "hf-cache" in words
    assert f"config.json of Qwen/Qwen3-8B at commit {commit}" in words
    assert len(hub.seen) == before


def test_hf_hub_cache_wins_and_a_revision_is_fetched_as_asked(hub, tmp_path):
    cache = tmp_path / "elsewhere"
    env = _env(tmp_path, hub.url, HF_HUB_CACHE=str(cache))
    done = memfit(env, "launch-config", "--model", "Qwen/Qwen3-8B@v1.0", "--distributed", "fsdp",
                  "--num-processes", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert "Qwen3DecoderLayer" in done.stdout  # the layer FSDP wraps, read from the fetched config
    repo = cache / "models--Qwen--Qwen3-8B"
    assert (repo / "refs" / "v1.0").read_text() == "1" * 40
    assert (repo / "snapshots" / ("1" * 40) / "config.json").is_file()
    assert not (tmp_path / "hf-home" / "hub").exists()
    assert any(s.path == "/Qwen/Qwen3-8B/resolve/v1.0/config.json" for s in hub.seen)


def test_gated_repo_needs_the_token_and_the_token_is_sent(hub, tmp_path):
    line = one_line_error(memfit(_env(tmp_path, hub.url), "estimate", "--model", "meta-llama/Llama-3.1-8B",
                                 "--device", "cuda", "--memory-gb", "80"))
    assert "gated" in line and "HF_TOKEN" in line and "401" in line
    line = one_line_error(memfit(_env(tmp_path, hub.url, HF_TOKEN="hf_someoneElse"), "estimate", "--model",
                                 "meta-llama/Llama-3.1-8B", "--device", "cuda", "--memory-gb", "80"))
    assert "gated" in line and "no access" in line and "403" in line
    # With the token that may read it: served, and it resolved to the repo's config, not to the built-in.
    data = estimate_json(_env(tmp_path, hub.url, HF_TOKEN=TOKEN), "meta-llama/Llama-3.1-8B")
    assert data["params"] == LLAMA31_8B_PARAMS and data["source"] == "hub"
    served = [s for s in hub.requests_for("meta-llama/Llama-3.1-8B") if s.method == "GET"]
    assert served and all(s.authorization == f"Bearer {TOKEN}" for s in served)


def test_renamed_repo_follows_the_hubs_redirect(hub, tmp_path):
    done = memfit(_env(tmp_path, hub.url), "launch-config", "--model", "old-org/qwen3-8b-renamed", "--distributed",
                  "fsdp", "--num-processes", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert "Qwen3DecoderLayer" in done.stdout
    repo = tmp_path / "hf-home" / "hub" / "models--old-org--qwen3-8b-renamed"
    commit = (repo / "refs" / "main").read_text()
    assert json.loads((repo / "snapshots" / commit / "config.json").read_text()) == QWEN3_8B
    assert any(s.path.startswith("/Qwen/Qwen3-8B/") for s in hub.seen)


@pytest.mark.parametrize("model, words", [
    ("nobody/no-such-model", ["no model repo nobody/no-such-model", "404"]),
    ("Qwen/Qwen3-8B@no-such-branch", ["no revision 'no-such-branch'"]),
    ("acme/just-data", ["has no config.json"]),
    ("acme/odd-arch", ["'not-a-transformers-type'", "transformers"]),
])
def test_hub_errors_are_one_line(hub, tmp_path, model, words):
    line = one_line_error(memfit(_env(tmp_path, hub.url), "estimate", "--model", model, "--device", "cuda",
                                 "--memory-gb", "80"))
    for word in words:
        assert word in line


def test_no_network_and_offline_are_one_line_and_fast(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = memfit(_env(tmp_path, dead), "estimate", "--model", "Qwen/Qwen3-8B", "--device", "cuda", "--memory-gb",
                  "80", timeout=25)  # no 25 s of client backoff
    line = one_line_error(done)
    assert f"cannot reach {dead}" in line and "hf download Qwen/Qwen3-8B config.json" in line
    line = one_line_error(memfit(_env(tmp_path, dead, HF_HUB_OFFLINE="1"), "estimate", "--model",
                                 "Qwen/Qwen3-8B", "--device", "cuda", "--memory-gb", "80"))
    assert "offline mode is on" in line and "not in the HF cache" in line
    # An id memfit has built-in shapes for is not silently estimated from them: the user asked for the repo.
    line = one_line_error(memfit(_env(tmp_path, dead, HF_HUB_OFFLINE="1"), "estimate", "--model",
                                 "Qwen/Qwen2.5-7B", "--device", "cuda", "--memory-gb", "80"))
    assert "offline mode is on" in line


def _fill_cache_with_config(env: dict[str, str], repo_id: str) -> None:
    """What `hf download ORG/NAME config.json` does, with the same client."""
    code = f"from huggingface_hub import hf_hub_download; hf_hub_download({repo_id!r}, 'config.json')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_training_commands_need_the_weights(hub, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    env = _env(tmp_path, hub.url)
    _fill_cache_with_config(env, "Qwen/Qwen3-8B")  # config.json in the cache, no weights
    before = len(hub.seen)
    for command in (["train", "--data", str(data), "--output-dir", str(tmp_path / "run")],
                    ["probe", "--data", str(data)],
                    ["eval", "--data", str(data)]):
        line = one_line_error(memfit(env, command[0], "--model", "Qwen/Qwen3-8B", *command[1:]))
        assert "no weight files for Qwen/Qwen3-8B" in line and "`hf download Qwen/Qwen3-8B`" in line, line
    assert len(hub.seen) == before  # training never fetches


def test_training_a_hub_id_not_on_this_machine(hub, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    before = len(hub.seen)
    line = one_line_error(memfit(_env(tmp_path, hub.url), "train", "--model", "Qwen/Qwen3-8B@v1.0", "--data",
                                 str(data), "--output-dir", str(tmp_path / "run")))
    assert "is not on this machine" in line and "`hf download Qwen/Qwen3-8B --revision v1.0`" in line
    assert "memfit estimate --model Qwen/Qwen3-8B@v1.0" in line
    assert len(hub.seen) == before


# --- in process: parsing, the cache's revisions, what is remembered -------------------------------------------------


def test_parse_hub_spec():
    from memfit.models.hub import HubSpec, parse_hub_spec

    assert parse_hub_spec("Qwen/Qwen3-8B") == HubSpec("Qwen/Qwen3-8B", None)
    assert parse_hub_spec(" Qwen/Qwen3-8B@v1.0 ") == HubSpec("Qwen/Qwen3-8B", "v1.0")
    assert parse_hub_spec("org/name@refs/pr/1") == HubSpec("org/name", "refs/pr/1")
    assert str(parse_hub_spec("org/name@refs/pr/1")) == "org/name@refs/pr/1"
    for not_an_id in ("qwen3-8b", "a/b/c", "./a/b", "org/name@", "org/na me", "org/a--b", "/abs/path", "org/"):
        assert parse_hub_spec(not_an_id) is None, not_an_id


def test_cached_snapshot_of_a_revision(tmp_path, monkeypatch):
    from memfit.models import ARCHITECTURES, resolve_model
    from memfit.models.resolve import cached_snapshot

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--w"
    for commit, vocab in (("a" * 40, 3000), ("b" * 40, 4000)):
        ARCHITECTURES["tiny"].to_hf_config(vocab_size=vocab).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    assert cached_snapshot("acme/w") == repo / "snapshots" / ("a" * 40)
    assert cached_snapshot("acme/w", "v2") == repo / "snapshots" / ("b" * 40)
    assert cached_snapshot("acme/w", "b" * 40) == repo / "snapshots" / ("b" * 40)
    assert cached_snapshot("acme/w", "v3") is None
    model = resolve_model("acme/w@v2")
    assert (model.source, model.name, model.config.vocab_size) == ("hf-cache", "acme/w", 4000)
    assert f"at commit {'b' * 40}" in model.origin


def test_a_known_id_offline_names_the_builtin_instead_of_using_it_silently(tmp_path, monkeypatch):
    from memfit.errors import UserError
    from memfit.models import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("MEMFIT_USER_HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        resolve_model("Qwen/Qwen2.5-7B", fetch_config=True)
    line = str(error.value)
    assert "offline mode is on" in line and "--model qwen2.5-7b" in line and "\n" not in line
    # Without the fetch (train, probe, eval): the built-in's shapes, and require_weights names the download.
    model = resolve_model("Qwen/Qwen2.5-7B")
    assert model.source == "builtin" and "not downloaded" in model.origin


def test_user_offline_is_the_users_setting_not_the_clis_default(monkeypatch):
    from memfit.models.hub import USER_OFFLINE_ENV, user_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the CLI sets for everything else
    monkeypatch.setenv(USER_OFFLINE_ENV, "")  # what the user had: nothing
    assert not user_offline()
    monkeypatch.setenv(USER_OFFLINE_ENV, "true")
    assert user_offline()
    monkeypatch.delenv(USER_OFFLINE_ENV)
    assert user_offline()  # the library without the CLI: HF_HUB_OFFLINE as set
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert user_offline()


def test_a_fetched_resolution_is_not_remembered_under_the_fingerprint_before_it(tmp_path, monkeypatch):
    from memfit.estimate import resolution_cache as cache
    from memfit.models import ARCHITECTURES
    from memfit.models.resolve import ResolvedModel

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "memfit"))
    config = ARCHITECTURES["tiny"].to_hf_config()
    key = cache.model_fingerprint("acme/x")
    snapshot = tmp_path / "hub" / "models--acme--x" / "snapshots" / ("c" * 40)
    cache.remember_resolution("acme/x", ResolvedModel("acme/x", "hub", "acme/x", "acme/x", snapshot, config, None),
                              key)
    assert cache.cached_resolution("acme/x", key) is None
    cache.remember_resolution("acme/x", ResolvedModel("acme/x", "hf-cache", "acme/x", "acme/x", snapshot, config,
                                                      None), key)
    again = cache.cached_resolution("acme/x", key)
    assert again.source == "hf-cache" and again.origin.startswith("config.json of acme/x at commit")
