"""What `--model` means: a local directory, an HF id in the local HF cache, an alias, or a built-in name.

Resolution never touches the network: estimates must work offline, and a download is always the user's explicit
choice (the error messages name the exact command).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memfit.errors import ModelNotFoundError, UserError, WeightsMissingError
from memfit.models.registry import (
    ALIASES,
    ARCHITECTURES,
    Alias,
    Architecture,
    close_matches,
    find_alias,
    find_architecture,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The single-file names transformers loads; sharded checkpoints go through an index (checked shard by shard).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ResolvedModel:
    spec: str
    source: str  # "local" | "hf-cache" | "alias" | "builtin"
    name: str
    hf_id: str | None
    path: Path | None
    config: PretrainedConfig
    architecture: Architecture | None

    def has_weights(self) -> bool:
        """Whether `path` holds a complete checkpoint transformers can load (every shard of an index present)."""
        if self.path is None:
            return False
        if any((self.path / f).is_file() for f in _WEIGHT_FILES):
            return True
        for index in _WEIGHT_INDEXES:
            # is_file() follows symlinks, so an HF-cache snapshot whose blob never finished downloading is "missing".
            if (self.path / index).is_file():
                try:
                    shards = set(json.loads((self.path / index).read_text())["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    continue
                if shards and all((self.path / s).is_file() for s in shards):
                    return True
        return False

    def require_weights(self) -> Path:
        """The directory holding the weights, or WeightsMissingError saying how to get them."""
        if self.has_weights():
            assert self.path is not None
            return self.path
        where = f"in {self.path}" if self.path is not None else "on this machine"
        if self.hf_id:
            raise WeightsMissingError(f"no weight files for {self.name} {where}", _download_hint(self.hf_id, self.name))
        if self.source == "builtin":
            raise WeightsMissingError(
                f"{self.name} is a built-in architecture with no published weights",
                f"create a random-init copy: `memfit init-model --preset {self.name} --out models/{self.name}` "
                f"and pass --model models/{self.name}",
            )
        raise WeightsMissingError(
            f"no weight files {where} (looked for {', '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)})",
            "copy the model's weights next to its config.json, or point --model at a directory that has them",
        )


def _download_command(hf_id: str, local: str, modern: bool = True) -> str:
    tool = "hf" if modern else "huggingface-cli"
    return f"`{tool} download {hf_id} --local-dir {local}`"


def _download_hint(hf_id: str, name: str) -> str:
    local = f"models/{name.rsplit('/', 1)[-1]}"
    # huggingface_hub 1.0 replaced `huggingface-cli` with `hf`: name the one that works here first.
    modern = _hub_major() >= 1
    first, second = _download_command(hf_id, local, modern), _download_command(hf_id, local, not modern)
    return f"download it: {first} (or {second}), then pass --model {local}"


def _hub_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("huggingface_hub").split(".")[0])
    except Exception:  # not installed or odd version string: assume the current CLI
        return 1


def hf_hub_cache() -> Path:
    """The HF hub cache directory, resolved the way huggingface_hub does (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _looks_like_hf_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or spec.count("/") > 1
        or "\\" in spec
        or (len(spec) > 1 and spec[1] == ":")  # Windows drive
    )


def cached_snapshot(hf_id: str) -> Path | None:
    """The HF-cache snapshot dir of `hf_id` that has a config.json: the one refs/main names, else the newest."""
    repo = hf_hub_cache() / f"models--{hf_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        ref = (repo / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if ref and (snapshots / ref / "config.json").is_file():
        return snapshots / ref
    candidates = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    return max(candidates, key=lambda d: d.stat().st_mtime, default=None)


def load_config(directory: Path) -> PretrainedConfig:
    """AutoConfig from a local directory; a broken or unsupported config.json is a UserError naming the file."""
    from transformers import AutoConfig

    config_file = directory / "config.json"
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # json errors, unknown model_type, missing keys: all mean "this file is not usable"
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(
            f"cannot read model config {config_file}: {detail}",
            "check that it is a valid transformers config.json (and that your transformers version supports its "
            "model_type)",
        ) from exc


def _from_local(spec: str, path: Path) -> ResolvedModel:
    if path.is_file():
        raise ModelNotFoundError(
            f"--model {spec!r} is a file, not a model directory", "pass the directory that holds config.json"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"directory {path} has no config.json",
            "point --model at the folder that holds config.json (in an HF cache: .../snapshots/<revision>)",
        )
    return ResolvedModel(spec, "local", path.resolve().name, None, path, load_config(path), None)


def _from_cache(spec: str, hf_id: str, name: str, architecture: Architecture | None) -> ResolvedModel | None:
    snapshot = cached_snapshot(hf_id)
    if snapshot is None:
        return None
    return ResolvedModel(spec, "hf-cache", name, hf_id, snapshot, load_config(snapshot), architecture)


def _from_alias(spec: str, alias: Alias) -> ResolvedModel:
    arch = find_architecture(alias.architecture)
    cached = _from_cache(spec, alias.hf_id, alias.name, arch)
    if cached is not None:
        return cached
    return ResolvedModel(spec, "alias", alias.name, alias.hf_id, None, alias.to_hf_config(), arch)


def _from_builtin(spec: str, arch: Architecture) -> ResolvedModel:
    if arch.hf_id:
        cached = _from_cache(spec, arch.hf_id, arch.name, arch)
        if cached is not None:
            return cached
    return ResolvedModel(spec, "builtin", arch.name, arch.hf_id, None, arch.to_hf_config(), arch)


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve `--model`: local dir, then HF id in the local cache, then alias, then built-in architecture."""
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("--model is empty", "pass a local directory, an HF id, or a name from `memfit models`")
    path = Path(spec).expanduser()
    if path.exists():
        return _from_local(spec, path)
    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"model directory {spec} does not exist", "check the path, or run `memfit models` for built-in names"
        )
    if _looks_like_hf_id(spec):
        alias_by_id = next((a for a in ALIASES.values() if a.hf_id.lower() == spec.lower()), None)
        arch_by_id = next((a for a in ARCHITECTURES.values() if a.hf_id and a.hf_id.lower() == spec.lower()), None)
        arch = find_architecture(alias_by_id.architecture) if alias_by_id else arch_by_id
        # The cache folder uses the repo's own spelling; known ids may have been typed in another case.
        hf_id = alias_by_id.hf_id if alias_by_id else arch_by_id.hf_id if arch_by_id and arch_by_id.hf_id else spec
        cached = _from_cache(spec, hf_id, hf_id, arch)
        if cached is not None:
            return cached
        # A known id that is not downloaded still has known shapes.
        if alias_by_id is not None:
            return _from_alias(spec, alias_by_id)
        if arch_by_id is not None:
            return _from_builtin(spec, arch_by_id)
        cache_dir = hf_hub_cache() / f"models--{spec.replace('/', '--')}"
        raise ModelNotFoundError(
            f"model {spec!r} not found: no local directory {spec}, not in the HF cache ({cache_dir}), not a built-in",
            f"{_download_hint(spec, spec)}; or run `memfit models` for built-in names",
        )
    alias = find_alias(spec)
    if alias is not None:
        return _from_alias(spec, alias)
    arch = find_architecture(spec)
    if arch is not None:
        return _from_builtin(spec, arch)
    close = close_matches(spec)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not a local directory, not an HF id (org/name) in the HF cache ({hf_hub_cache()}), "
        "not a built-in name or alias",
        f"{hint}run `memfit models` to list built-ins and aliases, or download a model: "
        + _download_command("ORG/NAME", "models/NAME", _hub_major() >= 1),
    )
