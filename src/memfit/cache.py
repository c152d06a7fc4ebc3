"""memfit's measurements on disk, in `$MEMFIT_CACHE/estimate/` (memfit.paths.cache_dir): small JSON records, each
kept under a digest of what it depends on.

What costs time in an estimate is tracing the model code on fake tensors (seconds per cut of the model) and, before
that, importing torch, transformers and PEFT. Neither result changes while the installed versions and the model's
config stay the same, so each is kept as a small JSON file, one folder per kind:

- `trace/`: the peak of one traced cut (its number of layers, at one batch size) per phase, keyed by the model's
  config, the training settings the trace reads, the dtypes, and the versions below;
- `lines/`: the largest batch up to which every traced cut was found on its lines through batch 1 and 2 (so
  batches up to it need no trace: memfit.estimate.memory.lines_hold_to);
- `arch/`: the parameter counts and shapes of one config (memfit.models.arch.ArchInfo);
- `model/` and `config/`: what `--model` resolved to, and built-in configs (memfit.estimate.resolution_cache);
- `file-pages/`: the shared-library pages a process that imported torch and transformers maps (the CPU runtime
  term), for estimates made without importing them.

Versions: memfit, Python, torch, transformers, PEFT, accelerate, and a digest of the source files whose code the
trace runs, so editing the estimator or the loss invalidates what it traced. A file that cannot be read is a miss;
one that cannot be written is skipped.

A `ConfigRecord` stands in for a transformers config read from the cache: the estimator reads its values and its
JSON (the key of everything above), and raises `CacheMiss` where it would need the real config (a trace that is
not cached); callers then resolve the model for real and estimate again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from memfit.files import write_atomic
from memfit.paths import cache_dir

SCHEMA = 1
# The code a trace runs, besides the installed libraries: a change to any of these files invalidates the cache.
_TRACED_SOURCES = ("estimate/memory.py", "estimate/trace.py", "models/arch.py", "estimate/peaks.py",
                   "train/model.py", "train/chunked_loss.py", "train/losses.py", "precision.py",
                   "train/lora_linear.py", "train/gated_mlp.py", "train/rms_norm.py",
                   "train/forward_source.py", "estimate/cuts.py")
_PACKAGES = ("torch", "transformers", "peft", "accelerate")


class CacheMiss(Exception):
    """An estimate from cached measurements needs one that is not cached: estimate again from the real config."""


@functools.cache
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from memfit.version import __version__

    found = {"memfit": __version__, "schema": str(SCHEMA), "python": sys.version.split()[0]}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "-"
    root = Path(__file__).resolve().parent  # memfit/
    sources = hashlib.sha256()
    for name in _TRACED_SOURCES:
        try:
            sources.update((root / name).read_bytes())
        except OSError:
            sources.update(name.encode())
    found["sources"] = sources.hexdigest()[:16]
    return found


def digest(*parts: Any) -> str:
    text = json.dumps([versions(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def config_key(config) -> str:
    """A config's identity for the caches: its full JSON without `_name_or_path` (where it was read from), so the
    same config in another directory or cache snapshot is not traced again."""
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("_name_or_path", None)
    return json.dumps(values, sort_keys=True)


def _path(kind: str, key: str) -> Path:
    return cache_dir() / "estimate" / kind / f"{key}.json"


def load(kind: str, key: str) -> Any | None:
    try:
        return json.loads(_path(kind, key).read_text())
    except (OSError, ValueError):
        return None


def save(kind: str, key: str, data: Any) -> None:
    path = _path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, default=str), fsync=False)
    except OSError:
        pass  # a read-only or full cache: estimates are computed again next time


# --- configs without transformers ---------------------------------------------------------------------------------


class ConfigRecord:
    """A transformers config as recorded in the cache: its values and its `to_json_string(use_diff=False)`."""

    def __init__(self, values: dict[str, Any], json_string: str):
        self._values = values
        self._json = json_string

    @classmethod
    def of(cls, config) -> ConfigRecord:
        values = json.loads(json.dumps(config.to_dict(), default=str))
        return cls(values, config.to_json_string(use_diff=False))

    def to_record(self) -> dict[str, Any]:
        return {"values": self._values, "json": self._json}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> ConfigRecord:
        return cls(data["values"], data["json"])

    def to_json_string(self, use_diff: bool = True) -> str:
        if use_diff:
            raise CacheMiss("a config diff needs transformers")
        return self._json

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._values))

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)


def is_record(config: Any) -> bool:
    return isinstance(config, ConfigRecord)
