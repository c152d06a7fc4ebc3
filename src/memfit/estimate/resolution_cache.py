"""What `--model` resolved to, and the configs of built-in architectures, kept in memfit.cache: a second estimate
of the same model needs neither transformers nor torch.

- `model/`: keyed by every file and registry entry the resolution could read (model_fingerprint);
- `config/`: the transformers config of a built-in architecture, for `memfit recommend`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memfit.cache import ConfigRecord, digest, is_record, load, save


# --- what --model resolves to, without transformers ---------------------------------------------------------------


def _file_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def model_fingerprint(spec: str) -> str | None:
    """A digest of everything `memfit.models.resolve_model(spec)` reads: the local directory's config.json, the
    HF-cache snapshot (and its config.json) of every id the spec could name, and the registry. The same digest
    means the same resolution. None when the file system cannot be read."""
    from memfit.models.hub import parse_hub_spec
    from memfit.models.registry import ALIASES, ARCHITECTURES
    from memfit.models.resolve import cached_snapshot, hf_hub_cache

    spec = spec.strip()
    # "resolution": 2 since a Hub id resolves to its repo's config (fetched), not to a built-in of that name.
    facts: dict[str, Any] = {"spec": spec, "resolution": 2}
    try:
        path = Path(spec).expanduser()
        if path.exists():
            facts["local"] = [os.path.abspath(path), os.path.realpath(path), _file_text(path / "config.json")]
            return digest("model", facts)
        hub = parse_hub_spec(spec)
        low = hub.repo_id.lower() if hub else spec.lower()
        revision = hub.revision if hub else None
        ids = {hub.repo_id} if hub else set()
        for alias in ALIASES.values():
            if low in (alias.name, alias.hf_id.lower()):
                ids.add(alias.hf_id)
        for arch in ARCHITECTURES.values():
            if arch.hf_id and low in (arch.name, arch.hf_id.lower()):
                ids.add(arch.hf_id)
        snapshots = {}
        for hf_id in sorted(ids):
            snapshot = cached_snapshot(hf_id, revision)
            snapshots[hf_id] = None if snapshot is None else [str(snapshot), _file_text(snapshot / "config.json")]
        facts.update(hub=str(hf_hub_cache()), snapshots=snapshots,
                     registry=[repr(ARCHITECTURES), repr(ALIASES)])
    except OSError:
        return None
    return digest("model", facts)


def cached_resolution(spec: str, key: str | None = None):
    """The ResolvedModel of `spec` from the cache (its config a ConfigRecord), or None. `key`: its
    model_fingerprint, when the caller computed it already."""
    from memfit.models.registry import find_architecture
    from memfit.models.resolve import ResolvedModel

    key = key or model_fingerprint(spec)
    data = load("model", key) if key else None
    if not data:
        return None
    try:
        return ResolvedModel(spec.strip(), data["source"], data["name"], data["hf_id"],
                             Path(data["path"]) if data["path"] else None, ConfigRecord.from_record(data["config"]),
                             find_architecture(data["architecture"]) if data["architecture"] else None,
                             data.get("origin"))
    except (KeyError, TypeError):
        return None


def remember_resolution(spec: str, resolved, key: str | None = None) -> None:
    """Keep what `spec` resolved to; `key`: its model_fingerprint taken before resolving (resolving could change
    what the fingerprint reads)."""
    key = key or model_fingerprint(spec)
    # A config fetched from the Hub just now is in the HF cache: the next resolution finds it there (a new
    # fingerprint); kept under this one, it would outlive the cached file.
    if key is None or is_record(resolved.config) or resolved.source == "hub":
        return
    save("model", key, {
        "source": resolved.source, "name": resolved.name, "hf_id": resolved.hf_id, "origin": resolved.origin,
        "path": str(resolved.path) if resolved.path is not None else None,
        "architecture": resolved.architecture.name if resolved.architecture is not None else None,
        "config": ConfigRecord.of(resolved.config).to_record(),
    })


def builtin_config(arch, real: bool = False):
    """A built-in architecture's config: from the cache (a ConfigRecord) unless `real` or not cached yet."""
    key = digest("config", repr(arch))
    if not real:
        data = load("config", key)
        if data:
            return ConfigRecord.from_record(data)
    config = arch.to_hf_config()
    save("config", key, ConfigRecord.of(config).to_record())
    return config
