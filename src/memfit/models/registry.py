"""Built-in architectures (their published config.json facts) and aliases for popular fine-tunes.

The shapes here let memfit estimate and init models without the network: a built-in name gives a full HF config
even when nothing is downloaded. Each entry carries the values of the repo's config.json that change memory or
behaviour; the tests count parameters on the meta device against the published totals.

transformers is imported lazily so that listing models stays fast.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from memfit.errors import ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# init-model refuses presets bigger than this unless forced: a random 8B model is 32 GB of fp32 noise on disk.
SMALL_PRESET_MAX_PARAMS = 600_000_000


# The config.json names of an MoE's expert count and top-k: mixtral/phimoe/jamba, qwen*_moe/olmoe/granitemoe,
# deepseek; num_experts_per_tok everywhere but gpt-oss (experts_per_token).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "experts_per_token")


def _frozen(d: Mapping[str, Any] | None = None, **kw: Any) -> Mapping[str, Any]:
    return MappingProxyType({**(d or {}), **kw})


@dataclass(frozen=True)
class Architecture:
    """A decoder-only architecture: the shape facts of one published config.json."""

    name: str
    model_type: str
    hf_id: str | None
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool
    max_position_embeddings: int
    head_dim: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The dtype the published weights are stored in (config.json's torch_dtype): a different training dtype makes
    # loading convert them, which has its own memory peak (memfit.estimate.memory.load_peak_bytes).
    dtype: str | None = None

    @property
    def effective_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def num_experts(self) -> int | None:
        """Routed experts per MoE layer (None for a dense model), under whichever name its model_type uses."""
        for key in _EXPERT_COUNT_KEYS:
            if self.extra.get(key):
                return int(self.extra[key])
        return None

    @property
    def experts_per_token(self) -> int | None:
        """Experts each token is routed to (top-k); None for a dense model."""
        if self.num_experts is None:
            return None
        for key in _EXPERTS_PER_TOKEN_KEYS:
            if self.extra.get(key):
                return int(self.extra[key])
        return None

    @property
    def experts_label(self) -> str:
        """The expert layout, "8×top2" (8 experts, 2 per token) for a mixture of experts; "" for a dense model."""
        if self.num_experts is None:
            return ""
        k = self.experts_per_token
        return f"{self.num_experts}×top{k}" if k else f"{self.num_experts} experts"

    def hf_config_kwargs(self, num_layers: int | None = None, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of `AutoConfig.for_model`, in the names that model_type uses."""
        layers = self.num_layers if num_layers is None else num_layers
        if self.model_type == "gpt2":
            kw: dict[str, Any] = dict(
                vocab_size=self.vocab_size,
                n_embd=self.hidden_size,
                n_layer=layers,
                n_head=self.num_heads,
                n_positions=self.max_position_embeddings,
                # GPT-2's published config leaves n_inner null, meaning 4 * n_embd.
                n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
                tie_word_embeddings=self.tie_embeddings,
            )
        else:
            kw = dict(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=layers,
                num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads,
                max_position_embeddings=self.max_position_embeddings,
                tie_word_embeddings=self.tie_embeddings,
            )
            if self.head_dim is not None:
                kw["head_dim"] = self.head_dim
        if self.dtype is not None:
            kw["dtype"] = self.dtype
        # Copies: transformers edits nested dicts it is given (rope_scaling gains rope_theta), which would change
        # the registry (and every key computed from it) after the first config built.
        kw.update(copy.deepcopy(dict(self.extra)))
        kw.update(copy.deepcopy(overrides))
        return kw

    def to_hf_config(self, num_layers: int | None = None, **overrides: Any) -> PretrainedConfig:
        """A transformers config for this architecture; `num_layers` makes a sized-down copy."""
        from transformers import AutoConfig

        config = AutoConfig.for_model(self.model_type, **self.hf_config_kwargs(num_layers, **overrides))
        if self.hf_id and num_layers in (None, self.num_layers) and not overrides:
            config._name_or_path = self.hf_id
        return config

    def with_layers(self, n: int) -> Architecture:
        """Same shapes with `n` layers (for small test copies); the hf_id's weights no longer fit it."""
        if n < 1:
            raise ValueError(f"num_layers must be >= 1, got {n}")
        return replace(self, num_layers=n)

    @property
    def param_count(self) -> int:
        """Exact parameters, counted on the meta device (memfit.models.arch; cached per config). A built-in as
        registered reads its count from COUNTED_PARAMS (`memfit models` lists them without importing torch and
        transformers); tests/test_models.py counts every one on the meta device against it."""
        if ARCHITECTURES.get(self.name) == self and self.name in COUNTED_PARAMS:
            return COUNTED_PARAMS[self.name]
        from memfit.models.arch import arch_info

        return arch_info(self.to_hf_config()).params

    @property
    def size_label(self) -> str:
        """Human size like "8B", "1.2B", "135M" (truncated past 10B, as model names do: 70.6B is "70B")."""
        p = self.param_count
        if p >= 10e9:
            return f"{int(p // 1e9)}B"
        if p >= 1e9:
            return f"{p / 1e9:.1f}".removesuffix(".0") + "B"
        if p >= 1e6:
            return f"{p / 1e6:.0f}M"
        return f"{p / 1e3:.0f}K"


@dataclass(frozen=True)
class Alias:
    """A short name for a popular fine-tune; `overrides` apply on top of its architecture's config."""

    name: str
    hf_id: str
    architecture: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_hf_config(self) -> PretrainedConfig:
        config = get_architecture(self.architecture).to_hf_config(**self.overrides)
        config._name_or_path = self.hf_id
        return config


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}
_LLAMA3 = dict(rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
               bos_token_id=128000, eos_token_id=128001)
_QWEN3 = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, sliding_window=None,
              use_sliding_window=False, rope_scaling=None, bos_token_id=151643, eos_token_id=151645)
# What the published Gemma 3 text_config sets besides the sizes (the rest are Gemma3TextConfig's defaults, spelled
# out here so that a transformers release with other defaults does not change the built-in).
_GEMMA3 = dict(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"factor": 8.0, "rope_type": "linear"},
               sliding_window=1024, sliding_window_pattern=6, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
               attention_bias=False, final_logit_softcapping=None, attn_logit_softcapping=None, bos_token_id=2,
               eos_token_id=1, pad_token_id=0)
_QWEN25 = dict(rope_theta=1000000.0, hidden_act="silu", use_sliding_window=False, bos_token_id=151643,
               eos_token_id=151643)

_ARCHS = [
    Architecture("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, False, 131072,
                 extra=_frozen(_LLAMA3, rope_scaling=_LLAMA31_ROPE), dtype="bfloat16"),
    Architecture("llama-3.1-70b", "llama", "meta-llama/Llama-3.1-70B", 128256, 8192, 28672, 80, 64, 8, False,
                 131072, extra=_frozen(_LLAMA3, rope_scaling=_LLAMA31_ROPE), dtype="bfloat16"),
    Architecture("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, True, 131072,
                 head_dim=64, extra=_frozen(_LLAMA3, rope_scaling=_LLAMA32_ROPE), dtype="bfloat16"),
    Architecture("llama-3.2-3b", "llama", "meta-llama/Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, True, 131072,
                 head_dim=128, extra=_frozen(_LLAMA3, rope_scaling=_LLAMA32_ROPE), dtype="bfloat16"),
    Architecture("mistral-7b", "mistral", "mistralai/Mistral-7B-v0.1", 32000, 4096, 14336, 32, 32, 8, False, 32768,
                 extra=_frozen(rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096, hidden_act="silu",
                               bos_token_id=1, eos_token_id=2), dtype="bfloat16"),
    Architecture("qwen2.5-0.5b", "qwen2", "Qwen/Qwen2.5-0.5B", 151936, 896, 4864, 24, 14, 2, True, 32768,
                 extra=_frozen(_QWEN25, rms_norm_eps=1e-6, sliding_window=32768), dtype="bfloat16"),
    Architecture("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4, False, 131072,
                 extra=_frozen(_QWEN25, rms_norm_eps=1e-6, sliding_window=131072), dtype="bfloat16"),
    Architecture("qwen2.5-14b", "qwen2", "Qwen/Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8, False, 131072,
                 extra=_frozen(_QWEN25, rms_norm_eps=1e-5, sliding_window=131072), dtype="bfloat16"),
    Architecture("phi-3-mini", "phi3", "microsoft/Phi-3-mini-4k-instruct", 32064, 3072, 8192, 32, 32, 32, False,
                 4096, extra=_frozen(rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=2047, hidden_act="silu",
                                     original_max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000,
                                     pad_token_id=32000), dtype="bfloat16"),
    Architecture("gemma-2-2b", "gemma2", "google/gemma-2-2b", 256000, 2304, 9216, 26, 8, 4, True, 8192,
                 head_dim=256, extra=_frozen(rope_theta=10000.0, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                                             sliding_window=4096, final_logit_softcapping=30.0,
                                             attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                                             attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0),
                 dtype="float32"),
    Architecture("smollm2-135m", "llama", "HuggingFaceTB/SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, True, 8192,
                 extra=_frozen(rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=0,
                               eos_token_id=0), dtype="bfloat16"),
    Architecture("smollm2-360m", "llama", "HuggingFaceTB/SmolLM2-360M", 49152, 960, 2560, 32, 15, 5, True, 8192,
                 extra=_frozen(rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=0,
                               eos_token_id=0), dtype="bfloat16"),
    Architecture("gpt2", "gpt2", "openai-community/gpt2", 50257, 768, 3072, 12, 12, 12, True, 1024,
                 extra=_frozen(n_ctx=1024, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                               bos_token_id=50256, eos_token_id=50256), dtype="float32"),
    Architecture("tinyllama-1.1b", "llama", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 32000, 2048,
                 5632, 22, 32, 4, False, 2048,
                 extra=_frozen(rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1,
                               eos_token_id=2)),
    # --- newer dense models -------------------------------------------------------------------------------------
    # Qwen3: qk-norm llama-like; head_dim 128 is not hidden_size / heads. (huggingface.co/Qwen/Qwen3-8B, -32B:
    # config.json, transformers 4.51.0)
    Architecture("qwen3-8b", "qwen3", "Qwen/Qwen3-8B", 151936, 4096, 12288, 36, 32, 8, False, 40960, head_dim=128,
                 extra=_frozen(_QWEN3, max_window_layers=36), dtype="bfloat16"),
    Architecture("qwen3-32b", "qwen3", "Qwen/Qwen3-32B", 151936, 5120, 25600, 64, 64, 8, False, 40960, head_dim=128,
                 extra=_frozen(_QWEN3, max_window_layers=64), dtype="bfloat16"),
    # Gemma 3 4B/12B/27B are published as image-text models (model_type gemma3); these are their text_config
    # (gemma3_text, what Gemma3ForCausalLM builds): the published text_config sets only the values below, the
    # rest are Gemma3TextConfig's defaults (vocab 262,208, rope 1e6 global / 1e4 local, a global layer every 6th,
    # tied embeddings, 131,072 positions). The vision tower (SigLIP, 416,866,032 params) and projector are not
    # counted: tests/test_models.py checks text + vision + projector against the published totals.
    Architecture("gemma-3-4b", "gemma3_text", "google/gemma-3-4b-pt", 262208, 2560, 10240, 34, 8, 4, True, 131072,
                 head_dim=256, extra=_frozen(_GEMMA3, query_pre_attn_scalar=256), dtype="bfloat16"),
    Architecture("gemma-3-12b", "gemma3_text", "google/gemma-3-12b-pt", 262208, 3840, 15360, 48, 16, 8, True,
                 131072, head_dim=256, extra=_frozen(_GEMMA3, query_pre_attn_scalar=256), dtype="bfloat16"),
    # 27B: head_dim 128 and query_pre_attn_scalar 168 (= hidden_size / heads), the one size where they differ.
    Architecture("gemma-3-27b", "gemma3_text", "google/gemma-3-27b-pt", 262208, 5376, 21504, 62, 32, 16, True,
                 131072, head_dim=128, extra=_frozen(_GEMMA3, query_pre_attn_scalar=168), dtype="bfloat16"),
    # Mistral NeMo 12B: head_dim 128 (hidden_size / heads would be 160), a 131,072-token Tekken vocab.
    Architecture("mistral-nemo-12b", "mistral", "mistralai/Mistral-Nemo-Base-2407", 131072, 5120, 14336, 40, 32, 8,
                 False, 1024000, head_dim=128,
                 extra=_frozen(rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None, hidden_act="silu",
                               bos_token_id=1, eos_token_id=2), dtype="bfloat16"),
    # phi-4 is a phi3 model (fused qkv_proj and gate_up_proj), GQA 40/10. Its config.json as first published
    # (transformers 4.47.0); later edits changed only the special-token ids.
    Architecture("phi-4", "phi3", "microsoft/phi-4", 100352, 5120, 17920, 40, 40, 10, False, 16384,
                 extra=_frozen(rope_theta=250000.0, rms_norm_eps=1e-5, sliding_window=None, hidden_act="silu",
                               original_max_position_embeddings=16384, rope_scaling=None, bos_token_id=100257,
                               eos_token_id=100257, pad_token_id=100257), dtype="bfloat16"),
    # The 3.1-70B shapes; the Instruct repo's config.json ends generation on any of three tokens.
    Architecture("llama-3.3-70b", "llama", "meta-llama/Llama-3.3-70B-Instruct", 128256, 8192, 28672, 80, 64, 8,
                 False, 131072, extra=_frozen(_LLAMA3, rope_scaling=_LLAMA31_ROPE,
                                              eos_token_id=[128001, 128008, 128009]), dtype="bfloat16"),
    # --- mixture of experts: every expert's weights count in params; experts_per_token of them run per token ---
    # Mixtral 8x7B: 8 experts of the Mistral-7B MLP shape (intermediate_size is one expert's), top-2.
    Architecture("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1", 32000, 4096, 14336, 32, 32, 8, False,
                 32768, extra=_frozen(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                                      router_jitter_noise=0.0, output_router_logits=False, rope_theta=1000000.0,
                                      rms_norm_eps=1e-5, sliding_window=None, hidden_act="silu", bos_token_id=1,
                                      eos_token_id=2), dtype="bfloat16"),
    # Qwen3-30B-A3B: 128 experts of moe_intermediate_size 768, top-8, every layer sparse (decoder_sparse_step 1,
    # no mlp_only_layers): intermediate_size 6144 is the dense MLP size, which no layer uses.
    Architecture("qwen3-30b-a3b", "qwen3_moe", "Qwen/Qwen3-30B-A3B", 151936, 2048, 6144, 48, 32, 4, False, 40960,
                 head_dim=128,
                 extra=_frozen(_QWEN3, max_window_layers=48, num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
                               norm_topk_prob=True, router_aux_loss_coef=0.001, output_router_logits=False),
                 dtype="bfloat16"),
    # OLMoE-1B-7B (0924): 64 experts of intermediate_size 1024, top-8, qk-norm, no tied embeddings.
    Architecture("olmoe-1b-7b", "olmoe", "allenai/OLMoE-1B-7B-0924", 50304, 2048, 1024, 16, 16, 16, False, 4096,
                 extra=_frozen(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, router_aux_loss_coef=0.01,
                               output_router_logits=False, clip_qkv=None, rope_theta=10000.0, rms_norm_eps=1e-5,
                               hidden_act="silu", attention_bias=False, eos_token_id=50279, pad_token_id=1),
                 dtype="bfloat16"),
    # Not a published model: a few-MB llama for tests and the demo (`memfit init-model --preset tiny`).
    Architecture("tiny", "llama", None, 2048, 128, 384, 4, 4, 2, True, 2048,
                 extra=_frozen(rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu")),
]

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _ARCHS}

# Every built-in's parameters as the meta device counts them (Architecture.param_count), recorded so that listing
# models needs no model code; tests/test_models.py counts them again and compares.
COUNTED_PARAMS: dict[str, int] = {
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
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "gemma-3-4b": 3_880_263_168,
    "gemma-3-12b": 11_766_034_176,
    "gemma-3-27b": 27_009_346_304,
    "mistral-nemo-12b": 12_247_782_400,
    "phi-4": 14_659_507_200,
    "llama-3.3-70b": 70_553_706_496,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
    "olmoe-1b-7b": 6_919_161_856,
    "tiny": 1_049_728,
}

_ALIASES = [
    Alias("llama-8b", "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated", "llama-3.1-8b"),
    # Llama-3 (not 3.1) 8B: 8k context without rope scaling, plus two ChatML tokens in the vocab.
    Alias("dolphin-8b", "cognitivecomputations/dolphin-2.9-llama3-8b", "llama-3.1-8b",
          _frozen(vocab_size=128258, max_position_embeddings=8192, rope_scaling=None, eos_token_id=128256)),
    Alias("hermes-mistral-7b", "NousResearch/Hermes-2-Pro-Mistral-7B", "mistral-7b",
          _frozen(vocab_size=32032, eos_token_id=32000)),
    Alias("hermes-3-8b", "NousResearch/Hermes-3-Llama-3.1-8B", "llama-3.1-8b"),
    Alias("hermes-3-70b", "NousResearch/Hermes-3-Llama-3.1-70B", "llama-3.1-70b"),
    Alias("r1-distill-14b", "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2", "qwen2.5-14b"),
]

ALIASES: dict[str, Alias] = {a.name: a for a in _ALIASES}


def _lookup(table: Mapping[str, Any], name: str) -> Any | None:
    key = name.strip().lower()
    return table.get(key)


def find_alias(name: str) -> Alias | None:
    return _lookup(ALIASES, name)


def find_architecture(name: str) -> Architecture | None:
    return _lookup(ARCHITECTURES, name)


def close_matches(name: str, names: list[str] | None = None, n: int = 3) -> list[str]:
    """Names (default: built-ins and aliases) that look like `name`, for "did you mean"."""
    pool = names if names is not None else [*ARCHITECTURES, *ALIASES]
    return difflib.get_close_matches(name.strip().lower(), pool, n=n, cutoff=0.5)


def get_architecture(name: str) -> Architecture:
    """A built-in architecture by name, case-insensitive."""
    arch = find_architecture(name)
    if arch is None:
        close = close_matches(name, list(ARCHITECTURES))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelNotFoundError(
            f"unknown architecture {name!r}",
            f"{hint}built-ins: {', '.join(ARCHITECTURES)} (`memfit models` lists them)",
        )
    return arch


def catalog() -> dict[str, list[dict[str, Any]]]:
    """Every built-in architecture and alias as JSON values (`memfit models --json`)."""
    return {
        "architectures": [
            {"name": a.name, "hf_id": a.hf_id, "model_type": a.model_type, "params": a.param_count,
             "size": a.size_label, "vocab_size": a.vocab_size, "hidden_size": a.hidden_size,
             "intermediate_size": a.intermediate_size, "num_layers": a.num_layers, "num_heads": a.num_heads,
             "num_kv_heads": a.num_kv_heads, "tie_embeddings": a.tie_embeddings,
             "num_experts": a.num_experts, "experts_per_token": a.experts_per_token}
            for a in ARCHITECTURES.values()],
        "aliases": [{"name": a.name, "hf_id": a.hf_id, "architecture": a.architecture} for a in ALIASES.values()],
    }
