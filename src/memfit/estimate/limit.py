"""Whether a `--max-memory` makes sense before a run starts (`memfit train`, `memfit probe`).

A limit below what micro-batch 1 needs stops the run at its first step (the guard's checkpoint, then a resume that
stops again): refused up front. A limit above what the machine has never triggers (the OS or CUDA runs out
first): a warning. The batch-1 figure is the estimator's, through the same cache as `memfit estimate` (a model
estimated before costs no trace).
"""

from __future__ import annotations

from dataclasses import dataclass

from memfit.config import TrainConfig
from memfit.errors import UserError

from memfit.units import GB, format_gb


@dataclass(frozen=True)
class LimitCheck:
    limit_bytes: int
    batch_one_bytes: int | None  # the estimate at micro-batch 1 (None: the model could not be estimated here)
    machine_bytes: int | None  # what the device has in all (RAM, or the cgroup's limit; a GPU's memory)
    warnings: tuple[str, ...] = ()


def batch_one_bytes(model: str, config: TrainConfig, device: str) -> int | None:
    """The estimated peak of one process training `model` at micro-batch 1 on `device`; None when the model
    cannot be resolved (the run itself says why, with its own error)."""
    from memfit.cache import CacheMiss
    from memfit.estimate.resolution_cache import cached_resolution, model_fingerprint, remember_resolution

    fingerprint = model_fingerprint(model)
    resolved = cached_resolution(model, fingerprint)
    try:
        if resolved is not None:
            try:
                return batch_one_estimate(resolved.config, config, device)
            except CacheMiss:
                pass
        from memfit.models import resolve_model

        resolved = resolve_model(model)
        remember_resolution(model, resolved, fingerprint)
        return batch_one_estimate(resolved.config, config, device)
    except UserError:
        return None


def machine_bytes(device: str) -> int | None:
    """All the memory `device` has on this machine (not what is free): RAM (bounded by this process's cgroup) for
    CPU and MPS, the smallest GPU's memory for CUDA."""
    from memfit.system import detect

    info = detect()
    if device.startswith("cuda"):
        return min((gpu.total_bytes for gpu in info.gpus), default=None)
    if info.cgroup_limit_bytes:
        return min(info.ram_total_bytes, info.cgroup_limit_bytes)
    return info.ram_total_bytes


def check_limit(max_memory_gb: float, needed_bytes: int | None, device: str, force: bool = False,
                flag: str = "--max-memory") -> LimitCheck:
    """Refuse (UserError) a limit below `needed_bytes` (the estimated peak of micro-batch 1) unless `force`; warn
    when the limit is above what the machine has."""
    limit = int(max_memory_gb * GB)
    if needed_bytes is not None and limit < needed_bytes and not force:
        raise UserError(f"{flag} {max_memory_gb:g} GB is below the estimated peak of micro-batch 1 "
                        f"({format_gb(needed_bytes)} on {device}): the guard would stop the run at its first step",
                        hint=f"give {flag} {max(needed_bytes / GB * 1.1, 0.01):.2f} or more (`memfit estimate` shows "
                             "what saves memory), or add --force to run anyway")
    total = machine_bytes(device)
    warnings = []
    if total and limit > total:
        warnings.append(f"{flag} {max_memory_gb:g} GB is above the {format_gb(total)} this machine's {device} has: "
                        "the guard would never stop the run (the OS or the device runs out first); leave it out for "
                        "80% of what is available")
    return LimitCheck(limit, needed_bytes, total, tuple(warnings))


def check_model_limit(max_memory_gb: float, model: str, config: TrainConfig, device: str,
                      force: bool = False) -> LimitCheck:
    """check_limit for `model` trained as `config` on `device` (estimated through the cache)."""
    return check_limit(max_memory_gb, batch_one_bytes(model, config, device), device, force)


def batch_one_estimate(hf_config, config: TrainConfig, device: str) -> int:
    """The estimated peak of one process at micro-batch 1, from a resolved model's config."""
    from memfit.estimate.memory import Hardware, estimate_memory

    return estimate_memory(hf_config, config.updated(batch_size=1, grad_accum=1), Hardware(device, 0)).total_bytes
