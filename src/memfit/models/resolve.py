"""What `--model` means: a local directory, an HF id in the local HF cache, a Hub id, an alias, or a built-in name.

Resolution touches the network only where the caller allows it (`fetch_config=True`: estimate, launch-config), and
then only for a Hub id (`ORG/NAME[@REVISION]`) that is not in the HF cache: its config.json alone is fetched through
huggingface_hub into the HF cache (memfit.models.hub). A Hub id resolves to that repo's config, never silently to a
built-in of the same name. Weights are never downloaded: training needs them on this machine, and the error says
which command gets them.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memfit.errors import ModelNotFoundError, UserError, WeightsDamagedError, WeightsMissingError
from memfit.models.hub import HubSpec, parse_hub_spec
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
    source: str  # "local" | "hf-cache" | "hub" (config.json fetched just now) | "alias" | "builtin"
    name: str
    hf_id: str | None
    path: Path | None
    config: PretrainedConfig
    architecture: Architecture | None
    # Where the config came from, in words (shown by estimate); `describe_origin` when not given.
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.origin is None:
            self.origin = describe_origin(self.source, self.name, self.hf_id, self.path, self.architecture)

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
            hub = parse_hub_spec(self.spec)
            revision = hub.revision if hub is not None and hub.repo_id.lower() == self.hf_id.lower() else None
            raise WeightsMissingError(f"no weight files for {self.name} {where}",
                                      _download_hint(self.hf_id, self.name, revision))
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


def describe_origin(source: str, name: str, hf_id: str | None, path: Path | None,
                    architecture: Architecture | None) -> str:
    """Where a resolution's config came from, in words."""
    if source == "local":
        return f"{path / 'config.json' if path else name}"
    if source in ("hf-cache", "hub") and path is not None:
        what = "fetched from the Hub into the HF cache" if source == "hub" else "from the HF cache"
        return f"config.json of {hf_id} at commit {path.name} ({what}: {path})"
    if source == "alias":
        base = architecture.name if architecture is not None else "a built-in"
        return f"memfit's built-in shapes of {base} with {name}'s changes (not downloaded: {hf_id})"
    return f"memfit's built-in shapes of {name}" + (f" (published as {hf_id}, not downloaded)" if hf_id else "")


def _download_command(hf_id: str, local: str | None = None, modern: bool = True, revision: str | None = None) -> str:
    tool = "hf" if modern else "huggingface-cli"
    tail = (f" --revision {revision}" if revision else "") + (f" --local-dir {local}" if local else "")
    return f"`{tool} download {hf_id}{tail}`"


def _download_hint(hf_id: str, name: str, revision: str | None = None) -> str:
    """The download of the whole repo into the HF cache, where the same --model then finds it."""
    # huggingface_hub 1.0 replaced `huggingface-cli` with `hf`: name the one that works here first.
    modern = _hub_major() >= 1
    first = _download_command(hf_id, None, modern, revision)
    second = _download_command(hf_id, None, not modern, revision)
    return f"download the weights: {first} (or {second}) fills the HF cache, then run this again"


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
    hub = parse_hub_spec(spec)
    hf_id = alias.hf_id if alias else arch.hf_id if arch and arch.hf_id else hub.repo_id if hub else None
    snapshot = cached_snapshot(hf_id, hub.revision if hub else None) if hf_id else None
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


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or spec.count("/") > 1
        or "\\" in spec
        or (len(spec) > 1 and spec[1] == ":")  # Windows drive
    )


def cached_snapshot(hf_id: str, revision: str | None = None) -> Path | None:
    """The HF-cache snapshot dir of `hf_id` that has a config.json: for a revision, the commit it names (itself, or
    what refs/<revision> holds); else the one refs/main names, else the newest."""
    repo = hf_hub_cache() / f"models--{hf_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None

    def ref_commit(name: str) -> str:
        try:
            return (repo / "refs" / name).read_text().strip()
        except (OSError, ValueError):
            return ""

    if revision is not None:
        for commit in (revision, ref_commit(revision)):
            if commit and "/" not in commit and (snapshots / commit / "config.json").is_file():
                return snapshots / commit
        return None
    ref = ref_commit("main")
    if ref and (snapshots / ref / "config.json").is_file():
        return snapshots / ref
    candidates = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    return max(candidates, key=lambda d: d.stat().st_mtime, default=None)


def _unknown_model_type(config_file: Path) -> str | None:
    """The model_type written in `config_file` when transformers has no config class for it, else None."""
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
        from transformers import CONFIG_MAPPING

        return str(model_type) if isinstance(model_type, str) and model_type not in CONFIG_MAPPING else None
    except Exception:  # unreadable, not JSON, not an object: the caller's message says what failed
        return None


def load_config(directory: Path) -> PretrainedConfig:
    """AutoConfig from a local directory; a broken or unsupported config.json is a UserError naming the file."""
    from transformers import AutoConfig

    config_file = directory / "config.json"
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # json errors, unknown model_type, missing keys: all mean "this file is not usable"
        model_type = _unknown_model_type(config_file)
        if model_type is not None:
            from transformers import __version__

            raise UserError(
                f"cannot read model config {config_file}: its model_type {model_type!r} is not one that transformers "
                f"{__version__} knows",
                "a newer transformers may know it (pip install -U transformers); a repo whose model code is its own "
                "(auto_map, trust_remote_code) is not run by memfit",
            ) from None
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


def _known_by_id(repo_id: str) -> tuple[Alias | None, Architecture | None]:
    """The alias or built-in published as `repo_id` (any case), if any."""
    low = repo_id.lower()
    alias = next((a for a in ALIASES.values() if a.hf_id.lower() == low), None)
    arch = next((a for a in ARCHITECTURES.values() if a.hf_id and a.hf_id.lower() == low), None)
    return alias, arch


def _from_hub_id(spec: str, hub: HubSpec, fetch_config: bool) -> ResolvedModel:
    alias_by_id, arch_by_id = _known_by_id(hub.repo_id)
    arch = find_architecture(alias_by_id.architecture) if alias_by_id else arch_by_id
    # The cache folder uses the repo's own spelling; known ids may have been typed in another case.
    hf_id = alias_by_id.hf_id if alias_by_id else arch_by_id.hf_id if arch_by_id and arch_by_id.hf_id else hub.repo_id
    snapshot = cached_snapshot(hf_id, hub.revision)
    if snapshot is not None:
        return ResolvedModel(spec, "hf-cache", hf_id, hf_id, snapshot, load_config(snapshot), arch)
    if fetch_config:
        from memfit.models.hub import fetch_config as fetch

        try:
            snapshot = fetch(HubSpec(hf_id, hub.revision), hf_hub_cache())
        except UserError as error:
            known = alias_by_id.name if alias_by_id else arch_by_id.name if arch_by_id else None
            if known is None:
                raise
            raise UserError(error.message, f"{error.hint}; or --model {known} estimates memfit's built-in copy of "
                            "its published shapes, offline") from None
        return ResolvedModel(spec, "hub", hf_id, hf_id, snapshot, load_config(snapshot), arch)
    # Without the network (train, probe, eval need the weights anyway): a known id that is not downloaded still has
    # known shapes, and require_weights names the download.
    if hub.revision is None and alias_by_id is not None:
        return _from_alias(spec, alias_by_id)
    if hub.revision is None and arch_by_id is not None:
        return _from_builtin(spec, arch_by_id)
    cache_dir = hf_hub_cache() / f"models--{hf_id.replace('/', '--')}"
    at = f" at revision {hub.revision}" if hub.revision else ""
    raise ModelNotFoundError(
        f"model {spec!r} is not on this machine: no local directory {spec}, not in the HF cache{at} ({cache_dir}), "
        "not a built-in",
        f"{_download_hint(hf_id, hf_id, hub.revision)} (`memfit estimate --model {hub}` needs only its config.json "
        "and fetches it); or run `memfit models` for built-in names",
    )


def resolve_model(spec: str, fetch_config: bool = False) -> ResolvedModel:
    """Resolve `--model`: local dir, then a Hub id (`ORG/NAME[@REVISION]`: the HF cache, then, with
    `fetch_config`, its config.json fetched from the Hub), then alias, then built-in architecture."""
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("--model is empty", "pass a local directory, an HF id, or a name from `memfit models`")
    path = Path(spec).expanduser()
    if path.exists():
        return _from_local(spec, path)
    hub = parse_hub_spec(spec) if not spec.startswith((".", "~", "/")) else None
    if hub is not None:
        return _from_hub_id(spec, hub, fetch_config)
    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"model directory {spec} does not exist", "check the path, or run `memfit models` for built-in names"
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
        + _download_command("ORG/NAME", None, _hub_major() >= 1)
        + " (estimate takes ORG/NAME directly: it fetches only config.json)",
    )
