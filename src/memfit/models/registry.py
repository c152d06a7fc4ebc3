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
        """Exact parameters, counted on the meta device (memfit.estimate.arch; cached per config). A built-in as
        registered reads its count from COUNTED_PARAMS (`memfit models` lists them without importing torch and
        transformers); tests/test_models.py counts every one on the meta device against it."""
        if ARCHITECTURES.get(self.name) == self and self.name in COUNTED_PARAMS:
            return COUNTED_PARAMS[self.name]
        from memfit.estimate.arch import arch_info

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
