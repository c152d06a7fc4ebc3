"""Checkpoints: written under a temporary name and renamed when complete, verified by checksum when read.

Layout of `OUTPUT_DIR/checkpoints/step-N/`:
- `trainable.safetensors`  the trained tensors (LoRA adapters, or every weight for a full fine-tune);
- `optimizer.pt`, `scheduler.pt`  their `state_dict()`s (plain tensors and numbers: loadable with weights_only);
- `rng.json`                python, numpy and torch RNG states;
- `rng-ranks.json`          several processes: every rank's RNG states, in rank order (rank 0 writes the checkpoint:
                            DDP keeps the same adapter and optimizer state on every rank, only the RNGs differ);
- `trainer_state.json`      step, data position, micro-batch and accumulation, recent losses;
- `meta.json`               written last: what the run was (config, model, data) and a sha256 per file.
A directory without a valid `meta.json`, or whose files do not match their checksums, is never resumed from.

Writing: into `.tmp-step-N-PID/`, fsynced, then renamed to `step-N`. A checkpoint of a step that already has one
(damaged, or of another trajectory after a resume from an earlier step) replaces it in two renames: the old copy to
`.replaced-step-N-PID/`, then the new one into place. At every instant one complete copy of step N exists: a kill
between the two renames leaves the old copy and the complete new one, and `recover_replacements` (run before a
resume looks for checkpoints, and when a trainer starts) finishes the swap, or puts the old copy back when the new
one does not verify. `.tmp-` directories are unfinished writes and are removed; `.replaced-` ones never are until
the step has its `step-N` again.

Memory: a checkpoint taken because memory is at the limit must not need much memory itself. safetensors (>= 0.7)
writes each tensor from its own storage and torch.save streams storages one by one, so neither builds a second copy
of the state in memory; checksums are computed afterwards by reading the files back in 8 MB chunks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memfit import faults
from memfit.config import GUARD_FIELDS, TrainConfig, saved_config_values
from memfit.errors import DiskFullError, UserError
from memfit.files import write_atomic

CHECKPOINTS = "checkpoints"
ENGINE_DIR = "deepspeed"  # a DeepSpeed run's engine state (each rank's partition), inside its checkpoint
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"  # never listed, resumed or kept: a write that did not finish
REPLACED_PREFIX = ".replaced-"  # a complete checkpoint moved aside while a new copy of its step takes its name
_REPLACED = re.compile(r"\.replaced-step-(\d+)-(\d+)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, past RLIMIT_FSIZE


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over because they did not verify (path: why)
    recovered: tuple[str, ...] = ()  # same-step replacements a killed process left half done, finished first

    @property
    def trainer_state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 * 1024**2):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))  # fsynced: the checkpoint's rename relies on it


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": [list(part) if isinstance(part, tuple) else part for part in random.getstate()],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: the ones training changes (contiguous, as safetensors requires)."""
    return {name: param.detach().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict[str, Any], meta: dict[str, Any], keep: int,
                    rank_rng_states: list[dict[str, Any]] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None, engine_dir: Path | None = None) -> Path:
    """Write `checkpoints/step-N` atomically, then drop all but the newest `keep`. Returns its path.
    `tensors` and `optimizer_state`, when given, are written instead of the model's trainable tensors and
    `optimizer.state_dict()` (FSDP: the full states gathered from the ranks' shards, memfit.distributed.fsdp).
    `engine_dir` (DeepSpeed: every rank's shard, written by `accelerator.save_state`) is moved in as `ENGINE_DIR/`
    before the checksums, which then cover its files too."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    partial = root / f"{TMP_PREFIX}step-{step}-{os.getpid()}"
    try:
        _write_partial(partial, step, model=model, optimizer=optimizer, scheduler=scheduler,
                       trainer_state=trainer_state, meta=meta, rank_rng_states=rank_rng_states, tensors=tensors,
                       optimizer_state=optimizer_state, engine_dir=engine_dir)
    except Exception as error:
        # Nothing half-written stays behind, and the newest complete checkpoint is untouched (pruning comes last).
        shutil.rmtree(partial, ignore_errors=True)
        full = disk_full_reason(error, root)
        if full:
            raise DiskFullError(f"could not write checkpoint step-{step} in {root}: {full}",
                                hint="free space on that disk (or lower --keep-checkpoints), then resume; the "
                                     "previous checkpoint is intact") from None
        raise
    # A directory of the same name (damaged, or of another trajectory after a resume from an earlier step) is
    # replaced only once the new one is complete: moved aside under a name nothing removes as a partial write, the
    # new one renamed in, then the old one removed (the module docstring: a kill in between loses neither).
    replaced = root / f"{REPLACED_PREFIX}step-{step}-{os.getpid()}"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        _fsync_dir(root)
        faults.maybe_pause_rename(step, run_dir)
    os.rename(partial, final)
    _fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)
    prune_checkpoints(run_dir, keep)
    return final


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill said it exists
    return stat[stat.rindex(")") + 2:][:1] != "Z"


def recover_replacements(run_dir: Path) -> list[str]:
    """Finish the replacements of same-step checkpoints that a killed process left between its two renames (the
    module docstring); returns one line per recovered step. A replacement whose process still runs is left alone."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    notes = []
    for moved in sorted(root.glob(f"{REPLACED_PREFIX}step-*")):
        match = _REPLACED.fullmatch(moved.name)
        if match is None:
            continue
        step, pid = int(match.group(1)), int(match.group(2))
        if pid != os.getpid() and _process_alive(pid):
            continue
        final, new = root / f"step-{step}", root / f"{TMP_PREFIX}step-{step}-{pid}"
        if final.exists():  # killed after the second rename: only the old copy's removal was left
            shutil.rmtree(moved, ignore_errors=True)
            continue
        if new.is_dir() and verify_checkpoint(new) is None:
            os.rename(new, final)
            shutil.rmtree(moved, ignore_errors=True)
            notes.append(f"step-{step}: its new copy was complete when the process writing it was killed between "
                         "two renames; put in place")
        else:
            os.rename(moved, final)
            notes.append(f"step-{step}: its replacement did not finish; the previous copy put back")
        _fsync_dir(root)
    return notes


def disk_full_reason(error: BaseException, directory: Path) -> str | None:
    """Why a write into `directory` failed, when the disk is the reason (full, over quota, past the file-size
    limit); else None. safetensors and torch.save do not raise OSError for these (a SafetensorError naming "os
    error 28", a RuntimeError "unexpected pos"), so when the error itself does not say, a 1 MiB test write does."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return os.strerror(error.errno)
    test = directory / f"{TMP_PREFIX}space-{os.getpid()}"
    try:
        with open(test, "wb") as file:
            file.write(bytes(1024**2))
            file.flush()
            os.fsync(file.fileno())
    except OSError as probe:
        return os.strerror(probe.errno) if probe.errno in _DISK_FULL else None
    finally:
        test.unlink(missing_ok=True)
    return None


def _write_partial(partial: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict[str, Any],
                   meta: dict[str, Any], rank_rng_states: list[dict[str, Any]] | None = None,
                   tensors: dict[str, torch.Tensor] | None = None,
                   optimizer_state: dict[str, Any] | None = None, engine_dir: Path | None = None) -> None:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(trainable_state(model) if tensors is None else tensors, str(partial / "trainable.safetensors"),
              metadata={"step": str(step)})
    faults.maybe_pause_save(step, partial)
    faults.maybe_disk_full(step)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    _write_json(partial / "rng.json", rng_state())
    if rank_rng_states is not None:
        _write_json(partial / "rng-ranks.json", rank_rng_states)
    _write_json(partial / "trainer_state.json", trainer_state)
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt"):
        with open(partial / name, "rb+") as file:
            os.fsync(file.fileno())
    if engine_dir is not None:
        os.rename(engine_dir, partial / ENGINE_DIR)
    files = {str(path.relative_to(partial)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
             for path in sorted(partial.rglob("*")) if path.is_file()}
    _write_json(partial / "meta.json", {**meta, "format": FORMAT_VERSION, "step": step,
                                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files})
    _fsync_dir(partial)


def load_checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """meta.json of a complete checkpoint, or None when it is missing or unreadable (an unfinished write)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "files" in meta and "step" in meta else None


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches its checksum, else what is wrong (one line)."""
    meta = load_checkpoint_meta(path)
    if meta is None:
        return "no valid meta.json (the write did not finish)"
    for name, facts in meta["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != facts["bytes"] or sha256_file(file) != facts["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking `step-N` directories, oldest first (temporary directories are never listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step-") and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path, skipped: list[str] | None = None,
                      recovered: list[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are reported in `skipped` and passed over. A
    replacement a killed process left half done is finished first (`recover_replacements`; said in `recovered`)."""
    notes = recover_replacements(run_dir)
    if recovered is not None:
        recovered.extend(notes)
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            meta = load_checkpoint_meta(path)
            return Checkpoint(path, int(meta["step"]), meta)
        if skipped is not None:
            skipped.append(f"{path}: {problem}")
    return None


def open_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint given by the user: verified, or a UserError saying why not."""
    recovered: list[str] = []
    if path.parent.name == CHECKPOINTS:  # checkpoints/step-N: it may be moved aside, its replacement cut short
        recovered = recover_replacements(path.parent.parent)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist", hint="pass a checkpoints/step-N dir or a run dir")
    if (path / CHECKPOINTS).is_dir():  # a run directory: its newest good checkpoint
        skipped: list[str] = []
        found = latest_checkpoint(path, skipped, recovered)
        if found is None:
            raise UserError(f"no usable checkpoint in {path / CHECKPOINTS}",
                            hint="; ".join(skipped) or "train without --resume to start over")
        return Checkpoint(found.path, found.step, found.meta, tuple(skipped), tuple(recovered))
    if not (path / "meta.json").exists() and path.parent.name != CHECKPOINTS and not path.name.startswith("step-"):
        if (path / "run.json").is_file():
            raise UserError(f"run {path} has no checkpoint to resume (it stopped before its first save)",
                            hint="train it again without --resume")
        # Neither a run directory nor a checkpoint: nothing was ever written here by `memfit train`.
        raise UserError(f"{path} is not a memfit run or checkpoint (it has no {CHECKPOINTS}/ and no meta.json)",
                        hint="pass the --output-dir of a run, or one of its checkpoints/step-N")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} cannot be resumed: {problem}",
                        hint="resume from an earlier checkpoints/step-N, or the run dir to pick the newest good one")
    meta = load_checkpoint_meta(path)
    return Checkpoint(path, int(meta["step"]), meta, recovered=tuple(recovered))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Leftovers of writes that were killed; returned so the caller can say what it cleaned. A same-step
    replacement cut between its renames is finished first: its new copy is a `.tmp-` directory too."""
    recover_replacements(run_dir)
    root = run_dir / CHECKPOINTS
    removed = [path for path in root.glob(f"{TMP_PREFIX}*")] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def restore(checkpoint: Checkpoint, *, model: torch.nn.Module, optimizer, scheduler, rank: int = 0,
            load_states=None) -> dict[str, Any]:
    """Load a verified checkpoint's tensors and states in place; returns its trainer state. `rank` picks this
    process's RNG states from a checkpoint of several processes. `load_states(tensors, optimizer_state)`, when
    given, puts the tensors and the optimizer state in place instead (FSDP: into each rank's shards)."""
    tensors = load_file(str(checkpoint.path / "trainable.safetensors"))
    expected = set(trainable_state(model))
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        raise UserError(f"checkpoint {checkpoint.path} does not match this model (e.g. {missing or sorted(tensors)[:3]})",
                        hint="resume with the same --model, --method and LoRA settings")
    optimizer_state = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
    if load_states is not None:
        load_states(tensors, optimizer_state)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(checkpoint.path / "scheduler.pt", weights_only=True))
    set_rng_state(json.loads((checkpoint.path / "rng.json").read_text()))
    ranks_file = checkpoint.path / "rng-ranks.json"
    if rank and ranks_file.is_file():
        states = json.loads(ranks_file.read_text())
        if rank < len(states):
            set_rng_state(states[rank])
    return checkpoint.trainer_state


# --- resuming ----------------------------------------------------------------------------------------------------

# Options that may change on resume without breaking exactness (the micro-batch split may change too, as long as
# batch_size x grad_accum stays the same: the step's objective does not depend on it).
RESUME_FREE_FIELDS = GUARD_FIELDS | {"batch_size", "grad_accum", "attn_implementation", "chunked_loss", "compile",
                                     "log_every"}


def resume_conflicts(saved: dict[str, Any], config: TrainConfig, world_size: int = 1,
                     saved_world_size: int = 1) -> list[str]:
    """Differences between a checkpoint's config and this one that would make the resumed run differ from an
    uninterrupted one. A different number of processes changes the global batch (and its row order)."""
    now = config.model_dump()
    # A key an older memfit did not write had its default then, or the value memfit.config.saved_config_values
    # gives where the default changed with the key (a k-bit base was upcast: qlora_upcast True).
    saved = saved_config_values(saved)
    saved = {key: saved.get(key, TrainConfig.model_fields[key].default) for key in now} | saved
    changed = [f"--{key.replace('_', '-')} {saved.get(key)!r} -> {now[key]!r}"
               for key in now if key not in RESUME_FREE_FIELDS and saved.get(key) != now[key]]
    if saved.get("batch_size", 1) * saved.get("grad_accum", 1) != config.batch_size * config.grad_accum:
        changed.append(f"effective batch {saved.get('batch_size', 1) * saved.get('grad_accum', 1)} -> "
                       f"{config.batch_size * config.grad_accum} (batch-size x grad-accum)")
    if saved_world_size != world_size:
        changed.append(f"world size {saved_world_size} -> {world_size} (processes; the global batch is "
                       "batch-size x grad-accum x world size)")
    return changed


def check_resume(checkpoint: Checkpoint, config: TrainConfig, world_size: int, per_rank: bool,
                 force: bool) -> None:
    """Refuse a resume that would not continue the checkpoint's run exactly (unless --force), or cannot at all: a
    checkpoint of each rank's partition (`per_rank`: DeepSpeed's) needs as many processes as wrote it. An FSDP
    checkpoint holds full states (the one-process format): --force may change the world size."""
    saved_world = int(checkpoint.meta.get("world_size", 1))
    conflicts = resume_conflicts(checkpoint.meta.get("config", {}), config, world_size, saved_world)
    if saved_world != world_size and force and per_rank:
        raise UserError(f"{checkpoint.path} holds {config.distributed} shards of {saved_world} processes; "
                        f"this run has {world_size}", hint=f"launch {saved_world} processes")
    if conflicts and not force:
        raise UserError(f"resuming {checkpoint.path} with a changed config breaks exactness: "
                        f"{'; '.join(conflicts)}", hint="keep the checkpoint's settings, or add --force")


def check_resume_data(checkpoint: Checkpoint, data: Path, data_sha256: str, force: bool) -> None:
    if checkpoint.meta.get("data_sha256") not in (None, data_sha256) and not force:
        raise UserError(f"{data} changed since checkpoint {checkpoint.path} was written",
                        hint="resume with the same data file, or add --force")


# A resume's limit leaves this much room above the higher of the estimate and the peak the guard saw.
RESUME_HEADROOM = 1.25
# ... and stays under this share of what was available when the run started (the OS and others keep the rest).
RESUME_CEILING = 0.95


def resume_fix(limit_bytes: int, available_bytes: int, peak_bytes: int, estimate_bytes: int | None,
               micro_batch: int, effective_batch: int, largest_micro_batch: Callable[[int, int], int]) -> str:
    """The flags that let a run stopped by the guard resume and go on: a higher --max-memory where this machine
    has it (the highest of the limit, the estimate and the peak seen, plus room), else a smaller micro-batch that the estimate
    fits under the same limit, with the accumulation that keeps the effective batch (a free change on resume);
    "" when neither exists."""
    # The guard may stop before the limit (a leak it sees coming): the new limit is above the old one regardless.
    needed = int(max(peak_bytes, estimate_bytes or 0, limit_bytes) * RESUME_HEADROOM)
    if needed <= available_bytes * RESUME_CEILING:
        return f" --max-memory {math.ceil(needed / 1024**3 * 100) / 100:.2f}"
    if micro_batch > 1:
        largest = largest_micro_batch(limit_bytes, micro_batch)
        if largest >= 1:
            micro = max(size for size in range(1, min(largest, micro_batch - 1) + 1) if effective_batch % size == 0)
            return f" --batch-size {micro} --grad-accum {effective_batch // micro}"
    return ""
