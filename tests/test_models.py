"""memfit.models: registry facts, `--model` resolution (offline), the built-in tokenizer, and init-model."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from memfit.errors import ModelNotFoundError, UserError, WeightsMissingError
from memfit.models import (
    ALIASES,
    ARCHITECTURES,
    Architecture,
    corpus_text,
    get_architecture,
    hf_hub_cache,
    init_model,
    resolve_model,
    train_tokenizer,
)

# The package exports the function `init_model`, which shadows the submodule attribute of the same name.
init_model_module = importlib.import_module("memfit.models.init_model")
tokenizer_module = importlib.import_module("memfit.models.tokenizer")

# Published parameter totals (model cards / safetensors metadata of the HF repos: the Hub API's safetensors
# "total", the sum of the checkpoint's tensor sizes; the same number GGUF conversions record as parameter_count).
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "phi-3-mini": 3_821_079_552,
    "gemma-2-2b": 2_614_341_888,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "gpt2": 124_439_808,
    "tinyllama-1.1b": 1_100_048_384,
    "qwen3-8b": 8_190_735_360,  # Qwen/Qwen3-8B (8.19B; the card's 6.95B leaves out embedding and head)
    "qwen3-32b": 32_762_123_264,  # Qwen/Qwen3-32B (32.8B)
    "mistral-nemo-12b": 12_247_782_400,  # mistralai/Mistral-Nemo-Base-2407 (12.2B; Instruct-2407 the same)
    "phi-4": 14_659_507_200,  # microsoft/phi-4 (14.7B)
    "llama-3.3-70b": 70_553_706_496,  # meta-llama/Llama-3.3-70B-Instruct (70.6B, as Llama-3.1-70B)
    # Mixtures of experts: every expert counts.
    "mixtral-8x7b": 46_702_792_704,  # mistralai/Mixtral-8x7B-v0.1 (46.7B)
    "qwen3-30b-a3b": 30_532_122_624,  # Qwen/Qwen3-30B-A3B (30.5B)
    "olmoe-1b-7b": 6_919_161_856,  # allenai/OLMoE-1B-7B-0924 (6.92B)
}

# Gemma 3 4B/12B/27B are published as image-text checkpoints (Gemma3ForConditionalGeneration); their totals
# (google/gemma-3-{4b,12b,27b}-pt and -it, same tensors) include the SigLIP vision tower and the projector. The
# built-ins are the text models, so the test builds the whole published model and checks both the total and that
# the rest is exactly the built-in's count.
GEMMA3_PUBLISHED_PARAMS = {
    "gemma-3-4b": 4_300_079_472,
    "gemma-3-12b": 12_187_325_040,
    "gemma-3-27b": 27_432_406_640,
}
# The published config.json's vision_config (the same for all three sizes).
GEMMA3_VISION_CONFIG = dict(model_type="siglip_vision_model", hidden_size=1152, image_size=896,
                            intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27, patch_size=14,
                            vision_use_head=False)


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Every test sees an empty HF cache of its own and runs from an empty working directory."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("init") / "tiny")


def _meta_count_plain(config) -> int:
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def _fake_snapshot(cache: Path, hf_id: str, rev: str, arch: Architecture, **overrides) -> Path:
    snap = cache / f"models--{hf_id.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    arch.to_hf_config(**overrides).save_pretrained(snap)
    return snap


# --- registry ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_meta_param_count_matches_published(name):
    arch = ARCHITECTURES[name]
    assert _meta_count_plain(arch.to_hf_config()) == PUBLISHED_PARAMS[name]
    assert arch.param_count == PUBLISHED_PARAMS[name]


def test_param_count_matches_meta_for_every_builtin_and_alias():
    for arch in ARCHITECTURES.values():
        if arch.name in PUBLISHED_PARAMS:
            continue  # counted on the meta device, against the published total, above
        assert arch.param_count == _meta_count_plain(arch.to_hf_config()), arch.name
    # dolphin adds two ChatML rows to embed_tokens and lm_head (untied).
    dolphin = _meta_count_plain(ALIASES["dolphin-8b"].to_hf_config())
    assert dolphin == PUBLISHED_PARAMS["llama-3.1-8b"] + 2 * 2 * 4096


def test_llama_31_8b_config_facts():
    config = ARCHITECTURES["llama-3.1-8b"].to_hf_config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (128256, 4096, 14336)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 8)
    assert config.max_position_embeddings == 131072 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is False
    rope = getattr(config, "rope_parameters", None) or {**config.rope_scaling, "rope_theta": config.rope_theta}
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
    assert rope["original_max_position_embeddings"] == 8192


def test_gpt2_uses_its_own_names_and_layer_override():
    arch = get_architecture("GPT2")
    config = arch.to_hf_config(num_layers=2)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (768, 2, 12, 1024)
    assert arch.with_layers(2).param_count == _meta_count_plain(config)
    with pytest.raises(ValueError):
        arch.with_layers(0)


def test_gemma2_specials_and_size_labels():
    config = ARCHITECTURES["gemma-2-2b"].to_hf_config()
    assert config.head_dim == 256 and config.query_pre_attn_scalar == 256
    assert config.final_logit_softcapping == 30.0 and config.attn_logit_softcapping == 50.0
    labels = {n: ARCHITECTURES[n].size_label for n in ("llama-3.1-8b", "llama-3.1-70b", "qwen2.5-14b",
                                                       "llama-3.2-1b", "smollm2-135m", "qwen2.5-0.5b")}
    assert labels == {"llama-3.1-8b": "8B", "llama-3.1-70b": "70B", "qwen2.5-14b": "14B",
                      "llama-3.2-1b": "1.2B", "smollm2-135m": "135M", "qwen2.5-0.5b": "494M"}


@pytest.mark.parametrize("name", list(GEMMA3_PUBLISHED_PARAMS))
def test_gemma3_text_plus_vision_tower_is_the_published_total(name):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    arch = ARCHITECTURES[name]
    text = arch.to_hf_config()
    # The published config.json: its text_config (what the built-in holds) and vision_config.
    config = Gemma3Config(text_config=text.to_dict(), vision_config=GEMMA3_VISION_CONFIG, mm_tokens_per_image=256)
    with init_empty_weights():
        model = Gemma3ForConditionalGeneration(config)
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert total == GEMMA3_PUBLISHED_PARAMS[name]
    assert vision == 416_866_032  # SigLIP so400m at 896 px, in every size
    assert total - vision - projector == arch.param_count == _meta_count_plain(text)


def test_gemma3_text_config_facts():
    configs = {name: ARCHITECTURES[name].to_hf_config() for name in GEMMA3_PUBLISHED_PARAMS}
    for name, config in configs.items():
        assert config.model_type == "gemma3_text" and config.vocab_size == 262208 and config.tie_word_embeddings
        assert config.sliding_window == 1024 and config.max_position_embeddings == 131072
        # Five local (sliding-window) layers, then a global one.
        assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"], name
        assert config.layer_types.count("full_attention") == config.num_hidden_layers // 6
        assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0,
                                                            "rope_theta": 1000000.0}
        assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert (configs["gemma-3-4b"].head_dim, configs["gemma-3-4b"].query_pre_attn_scalar) == (256, 256)
    assert (configs["gemma-3-27b"].head_dim, configs["gemma-3-27b"].query_pre_attn_scalar) == (128, 168)
    # A cut-down copy keeps the pattern rather than a list of the wrong length.
    assert ARCHITECTURES["gemma-3-4b"].to_hf_config(num_layers=7).layer_types[5:] == ["full_attention",
                                                                                      "sliding_attention"]


def test_new_dense_config_facts():
    qwen3 = ARCHITECTURES["qwen3-8b"].to_hf_config()
    assert (qwen3.model_type, qwen3.head_dim, qwen3.max_position_embeddings) == ("qwen3", 128, 40960)
    assert qwen3.hidden_size // qwen3.num_attention_heads == 128 and ARCHITECTURES["qwen3-32b"].head_dim == 128
    nemo = ARCHITECTURES["mistral-nemo-12b"].to_hf_config()
    assert nemo.head_dim == 128 != nemo.hidden_size // nemo.num_attention_heads  # 160
    assert (nemo.vocab_size, nemo.sliding_window) == (131072, None)
    phi4 = ARCHITECTURES["phi-4"].to_hf_config()
    assert (phi4.model_type, phi4.num_key_value_heads, phi4.vocab_size) == ("phi3", 10, 100352)
    assert phi4.rope_parameters["rope_theta"] == 250000.0
    llama33 = ARCHITECTURES["llama-3.3-70b"]
    assert llama33.to_hf_config().eos_token_id == [128001, 128008, 128009]
    assert llama33.param_count == ARCHITECTURES["llama-3.1-70b"].param_count


def test_moe_config_facts_and_expert_counts():
    mixtral = ARCHITECTURES["mixtral-8x7b"]
    config = mixtral.to_hf_config()
    assert (config.model_type, config.num_local_experts, config.num_experts_per_tok) == ("mixtral", 8, 2)
    assert config.intermediate_size == 14336 and config.router_aux_loss_coef == 0.02
    qwen = ARCHITECTURES["qwen3-30b-a3b"].to_hf_config()
    assert (qwen.model_type, qwen.num_experts, qwen.num_experts_per_tok) == ("qwen3_moe", 128, 8)
    assert (qwen.moe_intermediate_size, qwen.decoder_sparse_step, qwen.mlp_only_layers) == (768, 1, [])
    assert qwen.norm_topk_prob is True and qwen.head_dim == 128
    olmoe = ARCHITECTURES["olmoe-1b-7b"].to_hf_config()
    assert (olmoe.model_type, olmoe.num_experts, olmoe.num_experts_per_tok) == ("olmoe", 64, 8)
    assert olmoe.norm_topk_prob is False and olmoe.intermediate_size == 1024
    experts = {name: (a.num_experts, a.experts_per_token, a.experts_label) for name, a in ARCHITECTURES.items()}
    assert experts["mixtral-8x7b"] == (8, 2, "8×top2")
    assert experts["qwen3-30b-a3b"] == (128, 8, "128×top8")
    assert experts["olmoe-1b-7b"] == (64, 8, "64×top8")
    moe = {"mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"}
    assert all(experts[name] == (None, None, "") for name in ARCHITECTURES if name not in moe)
    # All 8 experts' weights are in the count: 32 layers x 8 experts x 3 x 4096 x 14336, plus embedding and head,
    # attention (q, o 4096x4096; k, v 1024x4096), the router (8x4096) and the norms.
    assert mixtral.param_count == (32 * 8 * 3 * 4096 * 14336 + 2 * 32000 * 4096
                                   + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 4096 + 2 * 4096) + 4096)
    # A cut-down copy keeps its experts.
    small = mixtral.with_layers(2)
    assert (small.num_experts, small.to_hf_config().num_hidden_layers) == (8, 2)


def test_get_architecture_unknown_suggests_close_match():
    assert get_architecture("Mistral-7B") is ARCHITECTURES["mistral-7b"]
    with pytest.raises(ModelNotFoundError, match="llama-3.1-8b"):
        get_architecture("llama-3.1-8")


def test_aliases_point_at_builtins():
    for alias in ALIASES.values():
        assert alias.architecture in ARCHITECTURES
        assert "/" in alias.hf_id


# --- resolution -------------------------------------------------------------------------------------------------


def test_hf_hub_cache_env_order(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hf_hub_cache() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "x"))
    assert hf_hub_cache() == tmp_path / "x"


def test_alias_without_cache_uses_builtin_shapes_plus_overrides():
    model = resolve_model("Hermes-Mistral-7B")
    assert (model.source, model.name, model.path) == ("alias", "hermes-mistral-7b", None)
    assert model.hf_id == "NousResearch/Hermes-2-Pro-Mistral-7B"
    assert model.architecture is ARCHITECTURES["mistral-7b"]
    assert model.config.vocab_size == 32032 and model.config.hidden_size == 4096
    assert not model.has_weights()
    with pytest.raises(WeightsMissingError) as err:
        model.require_weights()
    msg = str(err.value)
    # Into the HF cache, where the same --model then finds it (the alias looks there first).
    assert "hf download NousResearch/Hermes-2-Pro-Mistral-7B`" in msg
    assert "huggingface-cli download NousResearch/Hermes-2-Pro-Mistral-7B`" in msg
    assert "\n" not in msg


def test_builtin_name_and_its_missing_weights():
    model = resolve_model("smollm2-135m")
    assert model.source == "builtin" and model.hf_id == "HuggingFaceTB/SmolLM2-135M"
    assert model.config.num_hidden_layers == 30
    with pytest.raises(WeightsMissingError, match="download HuggingFaceTB/SmolLM2-135M"):
        model.require_weights()
    tiny = resolve_model("tiny")
    assert tiny.source == "builtin" and tiny.hf_id is None
    with pytest.raises(WeightsMissingError, match="memfit init-model --preset tiny"):
        tiny.require_weights()


def test_known_hf_id_not_downloaded_falls_back_to_builtin():
    model = resolve_model("Qwen/Qwen2.5-0.5B")
    assert model.source == "builtin" and model.name == "qwen2.5-0.5b"


def test_hf_cache_prefers_refs_main(_offline):
    hf_id = "acme/widget-1b"
    old = _fake_snapshot(_offline, hf_id, "a" * 40, ARCHITECTURES["tiny"], vocab_size=3000)
    new = _fake_snapshot(_offline, hf_id, "b" * 40, ARCHITECTURES["tiny"], vocab_size=4000)
    os.utime(old / "config.json", (1_000_000, 1_000_000))
    os.utime(old, (1_000_000, 1_000_000))
    (_offline / "models--acme--widget-1b" / "refs").mkdir()
    (_offline / "models--acme--widget-1b" / "refs" / "main").write_text("a" * 40)
    model = resolve_model(hf_id)
    assert (model.source, model.path, model.config.vocab_size) == ("hf-cache", old, 3000)
    # Without refs/main: the newest snapshot wins.
    (_offline / "models--acme--widget-1b" / "refs" / "main").unlink()
    model = resolve_model(hf_id)
    assert (model.path, model.config.vocab_size) == (new, 4000)
    assert not model.has_weights()
    with pytest.raises(WeightsMissingError, match="`hf download acme/widget-1b`"):
        model.require_weights()


def test_alias_found_in_hf_cache(_offline):
    alias = ALIASES["hermes-mistral-7b"]
    snap = _fake_snapshot(_offline, alias.hf_id, "c" * 40, ARCHITECTURES["mistral-7b"], vocab_size=32032)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(snap / "model.safetensors"))  # a whole file (require_weights reads it)
    model = resolve_model("hermes-mistral-7b")
    assert (model.source, model.name, model.path) == ("hf-cache", "hermes-mistral-7b", snap)
    assert model.architecture is ARCHITECTURES["mistral-7b"]
    assert model.require_weights() == snap


def test_sharded_index_needs_every_shard(tmp_path):
    snap = tmp_path / "sharded"
    ARCHITECTURES["tiny"].to_hf_config().save_pretrained(snap)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    (snap / shards[0]).write_bytes(b"x")
    model = resolve_model(str(snap))
    assert model.source == "local" and not model.has_weights()
    (snap / shards[1]).write_bytes(b"x")
    assert model.has_weights()


def test_local_dir_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken[/\\]config\.json"):
        resolve_model(str(broken))


def test_unknown_model_message_is_helpful():
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("mistrl-7b")
    msg = str(err.value)
    assert "mistral-7b" in msg and "memfit models" in msg and "HF cache" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/unheard-of")
    msg = str(err.value)
    assert "models--someone--unheard-of" in msg and "download someone/unheard-of" in msg


# --- tokenizer and init-model -----------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_round_trips():
    text = corpus_text()
    assert 30_000 < len(text.encode()) < 60_000
    tok = train_tokenizer(4096)
    assert len(tok) <= 4096 and len(train_tokenizer(512)) == 512
    ids = tok(text)["input_ids"]
    assert len(ids) < len(text) / 3  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(tok("naïve café, 日本語 🙂")["input_ids"]) == "naïve café, 日本語 🙂"
    tokenizer_module._trained_json.cache_clear()
    assert train_tokenizer(4096).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    with pytest.raises(ValueError):
        train_tokenizer(100)


def test_init_tiny_round_trips(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = model.config
    assert config.vocab_size == 2048 and config.num_hidden_layers == 4 and model.dtype == torch.float32
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids(["<|im_start|>",
                                                                                               "<|im_end|>"])]
    assert all(0 <= i < config.vocab_size for i in specials)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Why do rivers bend?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nWhy do rivers bend?<|im_end|>\n<|im_start|>assistant\n"
    batch = tok([corpus_text()[:200], chat], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape[-1] == 2048 and torch.isfinite(out.loss)

    resolved = resolve_model(str(tiny_dir))
    assert resolved.source == "local" and resolved.require_weights() == tiny_dir


def test_init_refuses_big_presets_and_layers_override_helps(tmp_path, monkeypatch):
    with pytest.raises(UserError) as err:
        init_model("gemma-2-2b", tmp_path / "g")
    assert "2,614,341,888" in str(err.value) and "--force" in str(err.value) and "--layers" in str(err.value)
    assert not (tmp_path / "g").exists()
    monkeypatch.setattr(init_model_module, "SMALL_PRESET_MAX_PARAMS", 500_000)
    with pytest.raises(UserError, match="--force"):
        init_model("tiny", tmp_path / "t")
    out = init_model("tiny", tmp_path / "t", num_layers=1, dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_init_bad_inputs(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="dtype"):
        init_model("tiny", tmp_path / "x", dtype="int3")
    with pytest.raises(UserError, match="not empty"):
        init_model("tiny", tiny_dir)
    with pytest.raises(ModelNotFoundError, match="tiny"):
        init_model("tinny", tmp_path / "y")
    with pytest.raises(UserError, match="layers"):
        init_model("tiny", tmp_path / "z", num_layers=0)


def test_init_is_seeded(tmp_path):
    a = init_model("tiny", tmp_path / "a", num_layers=1, seed=3)
    b = init_model("tiny", tmp_path / "b", num_layers=1, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    marker = json.loads((a / "memfit-init.json").read_text())
    assert marker["random_init"] is True and marker["seed"] == 3 and marker["preset"] == "tiny"
