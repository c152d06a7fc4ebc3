"""What `--model` means: a local directory, an HF id in the local HF cache, an alias, or a built-in name.

Resolution never touches the network: estimates must work offline, and a download is always the user's explicit
choice (the error messages name the exact command).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memfit.errors import ModelNotFoundError, UserError, WeightsDamagedError, WeightsMissingError
from memfit.models.registry import (
    ALIASES,
    ARCHITECTURES,
    Alias,
    Architecture,
    close_matches,
    find_alias,
    find_architecture,
)
from memfit.models.weights import Problem, load_damage, loaded_file, weights_problem

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
        """The directory holding the weights, checked whole (`check_weights`: headers and sizes, before anything
        loads), or WeightsMissingError / WeightsDamagedError saying how to get them."""
        if self.path is not None and loaded_file(self.path) is not None:
            check_weights(self.path)
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


def _download_again(hf_id: str, tail: str) -> str:
    """The re-download command, in both spellings, the one that works here first (see `_download_hint`)."""
    first, second = ("hf", "huggingface-cli") if _hub_major() >= 1 else ("huggingface-cli", "hf")
    return f"`{first} download {hf_id} {tail}` (or `{second} download {hf_id} {tail}`)"


def _snapshot_hf_id(directory: Path) -> str | None:
    """ORG/NAME of an HF-cache snapshot directory (`.../models--ORG--NAME/snapshots/<rev>`), else None."""
    path = Path(os.path.abspath(directory))
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or "--" not in repo[len("models--"):]:
        return None
    return repo[len("models--"):].replace("--", "/", 1)


def _init_model_command(directory: Path) -> str | None:
    """The `memfit init-model` command that wrote `directory` (its marker file says how), else None."""
    from memfit.models.init_model import INIT_MARKER
    from memfit.models.registry import SMALL_PRESET_MAX_PARAMS

    try:
        marker = json.loads((directory / INIT_MARKER).read_text())
        arch = find_architecture(str(marker["preset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if arch is None:
        return None
    words = ["memfit", "init-model", "--preset", arch.name, "--out", str(directory)]
    if marker.get("dtype", "fp32") != "fp32":
        words += ["--dtype", str(marker["dtype"])]
    if isinstance(marker.get("num_layers"), int) and marker["num_layers"] != arch.num_layers:
        words += ["--layers", str(marker["num_layers"])]
    if marker.get("seed", 0) != 0:
        words += ["--seed", str(marker["seed"])]
    if isinstance(marker.get("params"), int) and marker["params"] > SMALL_PRESET_MAX_PARAMS:
        words.append("--force")
    return f"`{shlex.join(words)}`"


def repair_hint(directory: Path, problem: Problem | None = None) -> str:
    """How to get whole weights into `directory` again: the HF cache's re-download, the init-model command that
    made it, or a download into it."""
    if problem is not None and problem.unreadable:
        return "check the file's permissions and the disk it is on"
    hf_id = _snapshot_hf_id(directory)
    if hf_id:
        return f"download it again: {_download_again(hf_id, '--force-download')}"
    recreate = _init_model_command(directory)
    if recreate:
        return f"re-create it: delete {directory}, then {recreate}"
    lfs = (f"in a git clone, `git lfs pull` in {directory} fetches the real files; or "
           if problem is not None and problem.lfs_pointer else "")
    return (f"{lfs}download it again: "
            f"{_download_again('ORG/NAME', f'--local-dir {shlex.quote(str(directory))} --force-download')} with "
            "the model's repo id, or copy the files again from where they came from")


def check_weights(directory: Path) -> None:
    """WeightsDamagedError naming the file when the weights transformers would load from `directory` are cut short,
    empty, have a broken header, or are a sharded checkpoint with a shard missing or not holding what its index
    says (memfit.models.weights). Reads headers and file sizes only."""
    problem = weights_problem(directory)
    if problem is not None:
        raise WeightsDamagedError(f"{problem.what}: {problem.text}", repair_hint(directory, problem))


def check_weights_early(spec: str) -> None:
    """`check_weights` for where `--model` resolves to a directory on this machine (a local dir, or the HF-cache
    snapshot of an HF id, alias or built-in), without reading its config: for a parent that never loads the model
    and must not import transformers for it (`train --supervise`). Anything else is left to `require_weights`."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    try:
        if path.exists():
            if (path / "config.json").is_file():
                check_weights(path)
            return
    except OSError:  # a name no file system takes: resolve_model says what is wrong with it
        return
    alias = find_alias(spec)
    arch = find_architecture(spec) if alias is None else None
    hf_id = alias.hf_id if alias else arch.hf_id if arch and arch.hf_id else spec if _looks_like_hf_id(spec) else None
    snapshot = cached_snapshot(hf_id) if hf_id else None
    if snapshot is not None:
        check_weights(snapshot)


def weights_load_error(error: BaseException, directory: Path) -> WeightsDamagedError | None:
    """The one-line error for an exception raised while loading the weights of `directory` when damaged files
    explain it (the check before loading missed them, or they changed since); None for anything else (out of
    memory, a missing package, a bug), which keeps its own handling."""
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return None
    problem = weights_problem(directory)
    if problem is not None:
        return WeightsDamagedError(f"{problem.what}: {problem.text}", repair_hint(directory, problem))
    if not load_damage(error, directory):
        return None
    lines = str(error).strip().splitlines()
    detail = " ".join(lines[0].split())[:200] if lines else ""
    return WeightsDamagedError(f"damaged model weights in {directory}: loading them failed with "
                               f"{type(error).__name__}{': ' + detail if detail else ''}", repair_hint(directory))


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
