"""Hardware profiles: what a probe found on this machine for this model, kept for `train --profile` and
`memfit estimate`.

Layout under the cache dir (`$MEMFIT_CACHE`, else ~/.cache/memfit):

    profiles/<machine-fingerprint>/<model-key>.json   one file per machine and model; inside, one entry per setup
                                                      (method, quantization, dtype, ... : what changes the memory)
    probe/<machine-fingerprint>/<probe-key>.jsonl     the journal of an unfinished (or finished) probe

The fingerprint hashes what decides how much fits: the CPU model and count, total RAM, and each GPU's name and
memory. The model key is the model's name plus a hash of its config (so two dirs called `model` differ).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

from memfit.errors import UserError
from memfit.files import write_atomic
from memfit.paths import cache_dir
from memfit.units import GB

PROFILE_FORMAT = 1
# The config fields that change how much memory a run takes, besides the batch size and the searched axes.
SETUP_FIELDS = ("method", "quant", "qlora_upcast", "dtype", "optimizer", "seq_len", "lora_rank", "lora_layers",
                "lora_targets", "grad_checkpointing", "attn_implementation", "loss", "packing", "chunked_loss")
# The axes a probe can search; the batch is always one of them.
AXES = {"batch": "batch_size", "rank": "lora_rank", "seq": "seq_len"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """What the fingerprint is made of (rounded to whole GiB so a kernel reserving a few MB more does not count)."""
    from memfit.system import detect

    info = detect()
    return {
        "system": platform.system(), "arch": platform.machine(), "cpu": _cpu_name(), "cpu_count": info.cpu_count,
        "ram_gib": round(info.ram_total_bytes / GB),
        "gpus": [{"name": gpu.name, "memory_gib": round(gpu.total_bytes / GB)} for gpu in info.gpus],
    }


def fingerprint(facts: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    gpu = f"{len(facts['gpus'])}gpu" if facts["gpus"] else "cpu"
    return f"{facts['arch']}-{facts['cpu_count']}c-{facts['ram_gib']}g-{gpu}-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def model_key(resolved) -> str:
    """`<name>-<hash of the model's config>`: the same model found by any path gets the same key."""
    config = resolved.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = Path(resolved.name).name if resolved.source == "local" else resolved.name
    return f"{_slug(name)}-{digest}"


def profiles_dir(machine: str) -> Path:
    return cache_dir() / "profiles" / machine


def profile_path(machine: str, key: str) -> Path:
    return profiles_dir(machine) / f"{key}.json"


def setup_of(config_values: dict[str, Any], device: str, searched: list[str]) -> dict[str, Any]:
    """The memory-relevant settings of a probe, without the ones it searched (those are its answer)."""
    setup = {name: config_values.get(name) for name in SETUP_FIELDS if name not in searched}
    if config_values.get("method") == "full":
        for name in ("lora_rank", "lora_layers", "lora_targets"):
            setup.pop(name, None)
    if config_values.get("quant", "none") == "none" and config_values.get("method") != "qlora":
        setup.pop("qlora_upcast", None)  # only a k-bit base has weights to upcast
    setup["device"] = device
    return setup


def setup_key(setup: dict[str, Any]) -> str:
    return ",".join(f"{key}={setup[key]}" for key in sorted(setup))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_profile(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise UserError(f"cannot read profile {path}: {error.strerror or error}",
                        hint="pass a file written by `memfit probe`, or --profile auto") from None
    except ValueError as error:
        raise UserError(f"{path}: not a memfit profile (invalid JSON: {error})",
                        hint="pass a file written by `memfit probe`") from None
    if not isinstance(data, dict) or data.get("memfit_profile") != PROFILE_FORMAT or not data.get("entries"):
        raise UserError(f"{path}: not a memfit profile (no entries)", hint="pass a file written by `memfit probe`")
    return data


def save_entry(path: Path, machine: dict[str, Any], model: dict[str, Any], entry: dict[str, Any]) -> None:
    """Add or replace the entry for `entry["setup"]`; other setups probed before stay."""
    data = read_profile(path) if path.exists() else {"memfit_profile": PROFILE_FORMAT, "entries": {}}
    data.update({"machine": machine, "model": model, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    data["entries"][setup_key(entry["setup"])] = entry
    write_json_atomic(path, data)


def _differences(entry: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The explicitly wanted settings this entry was not probed with (searched axes match any value)."""
    differences = []
    for name, value in wanted.items():
        if name in entry["setup"] and entry["setup"][name] != value:
            differences.append(f"{name} {entry['setup'][name]!r} (you asked {value!r})")
    return differences


def _newest_first(profile: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(profile["entries"].values(), key=lambda entry: entry.get("created_at", ""), reverse=True)


def select_entry(profile: dict[str, Any], wanted: dict[str, Any], where: str) -> dict[str, Any]:
    """The most recent entry compatible with the settings the user gave explicitly (and the device)."""
    entries = _newest_first(profile)
    for entry in entries:
        if not _differences(entry, wanted) and entry.get("chosen"):
            return entry
    if not any(entry.get("chosen") for entry in entries):
        raise UserError(f"{where}: the probe found no setting that fits", hint="see `memfit probe` for what to change")
    closest = _differences(entries[0], wanted)
    raise UserError(f"{where} was probed with {', '.join(closest)}",
                    hint="run `memfit probe` with these settings, or drop the flags that differ")


def find_profile(resolved, machine: str) -> Path | None:
    path = profile_path(machine, model_key(resolved))
    return path if path.exists() else None


def calibration_for(resolved, machine: str, config_values: dict[str, Any], device: str) -> dict[str, Any] | None:
    """The measured/estimated ratio from this machine's profile of this model, for a matching setup (the searched
    axes and the batch may differ: the ratio was measured across them). None when there is none."""
    path = find_profile(resolved, machine)
    if path is None:
        return None
    try:
        profile = read_profile(path)
    except UserError:
        return None
    for entry in _newest_first(profile):
        calibration = entry.get("calibration")
        setup = entry["setup"]
        same = all(config_values.get(name) == value for name, value in setup.items()
                   if name not in ("device", "seq_len", "lora_rank"))
        if calibration and same and setup.get("device") == device:
            return {**calibration, "profile": str(path)}
    return None


def profile_for_training(choice: str, resolved, wanted: dict[str, Any]) -> tuple[Path, dict[str, Any], list[str]]:
    """The profile entry `train --profile auto|FILE` applies: (file, entry, notes for the user).

    `wanted` holds the settings the user gave explicitly (flags, -c file) among SETUP_FIELDS and the device; an
    entry probed with different ones does not apply (its batch size would be wrong for them)."""
    notes: list[str] = []
    facts = machine_facts()
    machine = fingerprint(facts)
    key = model_key(resolved)
    if choice == "auto":
        path = find_profile(resolved, machine)
        if path is None:
            raise UserError(f"no probe profile for {resolved.name} on this machine (looked in {profiles_dir(machine)})",
                            hint=f"run `memfit probe --model {resolved.spec} --data YOUR.jsonl` first, or drop "
                                 "--profile")
    else:
        path = Path(choice)
    profile = read_profile(path)
    if profile.get("model", {}).get("key") not in (None, key):
        raise UserError(f"{path} was probed for {profile['model'].get('name')}, not {resolved.name}",
                        hint="use --profile auto, or the profile of this model")
    if profile.get("machine", {}).get("fingerprint") not in (None, machine):
        notes.append(f"{path} was probed on another machine ({profile['machine'].get('fingerprint')}); "
                     "its settings may not fit here")
    entry = select_entry(profile, wanted, str(path))
    return path, {**entry, "settings": _settings_for(entry, wanted, path)}, notes


def _settings_for(entry: dict[str, Any], wanted: dict[str, Any], path: Path) -> dict[str, Any]:
    """The entry's settings; when the user fixed the searched second axis (--seq-len or --lora-rank), the batch
    the probe found for that value instead of the chosen one."""
    settings = dict(entry["settings"])
    for axis in entry["search"][1:]:
        name = AXES[axis]
        if name not in wanted:
            continue
        point = next((p for p in entry["frontier"] if p.get(name) == wanted[name]), None)
        if point is None or point["max_batch"] < 1:
            probed = ", ".join(f"{p[name]} (batch {p['max_batch']})" for p in entry["frontier"])
            raise UserError(f"{path} has no fitting batch for {name} {wanted[name]}; probed: {probed}",
                            hint=f"pick one of those, or probe again with --values {wanted[name]}")
        settings.update({name: wanted[name], "batch_size": point["max_batch"]})
    return settings
