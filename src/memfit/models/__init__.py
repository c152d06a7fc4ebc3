"""Models: built-in architectures and aliases, `--model` resolution, and random-init models for demos/tests."""

from memfit.models.init_model import DTYPES, init_model
from memfit.models.registry import (
    ALIASES,
    ARCHITECTURES,
    SMALL_PRESET_MAX_PARAMS,
    Alias,
    Architecture,
    find_alias,
    find_architecture,
    get_architecture,
)
from memfit.models.resolve import ResolvedModel, cached_snapshot, hf_hub_cache, load_config, resolve_model
from memfit.models.tokenizer import corpus_text, train_tokenizer

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "DTYPES",
    "SMALL_PRESET_MAX_PARAMS",
    "Alias",
    "Architecture",
    "ResolvedModel",
    "cached_snapshot",
    "corpus_text",
    "find_alias",
    "find_architecture",
    "get_architecture",
    "hf_hub_cache",
    "init_model",
    "load_config",
    "resolve_model",
    "train_tokenizer",
]
