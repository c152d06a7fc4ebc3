"""Weight files that are there but damaged, found before the model loads.

A download cut short, a copy that filled the disk, a Git LFS pointer where the weights should be, an index naming a
shard that is missing or that does not hold the tensors it maps to it: transformers meets these deep inside
`from_pretrained` (a SafetensorError, a FileNotFoundError, an UnpicklingError, each with a traceback), or, for a
tensor the index maps to the wrong shard, not at all: it initializes that tensor randomly and trains on noise.

`weights_problem` reads only what transformers would load, and of it only the headers (a few KB a file) and the file
sizes, so a 70B checkpoint is checked in milliseconds. `load_damage` tells which of the loader's own exceptions
mean damaged files, for what gets through (memfit.models.resolve turns both into one WeightsDamagedError line).
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# The order transformers picks them in (safetensors first, a single file before an index).
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses a larger header too
_LFS_POINTER = b"version https://git-lfs"
_LISTED = 3  # names shown in a message before "and N more"


@dataclass
class Problem:
    text: str  # what is wrong, naming the file
    lfs_pointer: bool = False  # a Git LFS pointer file instead of the weights (`git lfs pull` fixes it)
    unreadable: bool = False  # the file is there but cannot be opened (permissions): nothing to download
    incomplete: bool = False  # shards the index names are not there (a download that has not finished)

    @property
    def what(self) -> str:
        if self.unreadable:
            return "unreadable model weights"
        return "incomplete model weights" if self.incomplete else "damaged model weights"


def loaded_file(directory: Path) -> Path | None:
    """The weight file (or index) transformers would load from `directory`, if any is there."""
    return next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)


def weights_problem(directory: Path) -> Problem | None:
    """What is wrong with the weights transformers would load from `directory`; None when they look whole (or when
    there are none: that is a missing model, not a damaged one)."""
    path = loaded_file(directory)
    if path is None:
        return None
    try:
        if path.name == SAFETENSORS:
            return safetensors_header(path)[1]
        if path.name == PYTORCH:
            return pytorch_problem(path)
        return index_problem(path, safetensors=path.name == SAFETENSORS_INDEX)
    except OSError as error:  # permissions, an I/O error: the file is there but cannot be read
        where = error.filename or path
        return Problem(f"cannot read {where}: {error.strerror or error}", unreadable=True)


def _more(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _start(path: Path, size: int) -> bytes:
    with open(path, "rb") as file:
        return file.read(min(size, 64))


def safetensors_header(path: Path) -> tuple[dict[str, Any] | None, Problem | None]:
    """(the tensors of a safetensors file's header, None) or (None, what is wrong with the file)."""
    size = path.stat().st_size
    if size == 0:
        return None, Problem(f"{path} is empty (0 bytes)")
    start = _start(path, size)
    if start.startswith(_LFS_POINTER):
        return None, Problem(f"{path} is a Git LFS pointer ({size} bytes), not the weights", lfs_pointer=True)
    if size < 8:
        return None, Problem(f"{path} is {size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", start[:8])
    if length > MAX_HEADER_BYTES:
        return None, Problem(f"{path} is not a safetensors file: it starts with {start[:16]!r}, not a header length")
    if 8 + length > size:
        return None, Problem(f"{path} is cut short or has a broken header: its header length field says "
                             f"{length:,} bytes, past the end of the {size:,}-byte file")
    with open(path, "rb") as file:
        file.seek(8)
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        detail = " ".join(str(error).split())[:120]
        return None, Problem(f"{path} has a corrupt header (not valid JSON: {detail})")
    if not isinstance(header, dict):
        return None, Problem(f"{path} has a corrupt header (not a JSON object)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    end = 0
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list)):
            return None, Problem(f"{path} has a corrupt header (tensor {name!r} has no valid dtype, shape and "
                                 "data_offsets)")
        end = max(end, offsets[1])
    data = size - 8 - length
    if end > data:
        return None, Problem(f"{path} is truncated: {size:,} bytes, but its header puts the end of the tensor data "
                             f"at byte {8 + length + end:,}")
    if end < data:
        return None, Problem(f"{path} has {data - end:,} bytes after its last tensor (its header says the data ends "
                             f"at byte {8 + length + end:,} of {size:,}): not the file that was written")
    # Whatever else the library checks (offsets that overlap or leave gaps, sizes that do not match the shapes).
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 - SafetensorError, and whatever else makes it unreadable
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        return None, Problem(f"{path} is not a valid safetensors file ({detail})")
    return tensors, None


def pytorch_problem(path: Path) -> Problem | None:
    """What is wrong with a torch.save file, as far as a look at its start (and its zip directory) tells."""
    size = path.stat().st_size
    if size == 0:
        return Problem(f"{path} is empty (0 bytes)")
    start = _start(path, size)
    if start.startswith(_LFS_POINTER):
        return Problem(f"{path} is a Git LFS pointer ({size} bytes), not the weights", lfs_pointer=True)
    if start.startswith(b"PK\x03\x04"):  # torch >= 1.6: a zip archive, whose directory is at the end
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            return Problem(f"{path} is cut short or corrupt (its zip archive does not open: {error})")
        return None
    if start.startswith(b"\x80"):  # the legacy format: a pickle, not checkable without loading
        return None
    return Problem(f"{path} is not a PyTorch checkpoint (it starts with {start[:16]!r})")


def index_problem(index: Path, safetensors: bool) -> Problem | None:
    """What is wrong with a sharded checkpoint: its index, a shard missing or damaged, or a tensor the index maps
    to a shard that does not hold it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, ValueError) as error:
        return Problem(f"{index} is not valid JSON ({' '.join(str(error).split())[:120]})")
    except (KeyError, TypeError):
        return Problem(f"{index} has no weight_map")
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(shard, str) and shard for shard in weight_map.values())):
        return Problem(f"{index} has no valid weight_map (tensor name -> shard file)")
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        return Problem(f"{index} names {len(shards)} shard files, {len(missing)} of them missing: {_more(missing)}",
                       incomplete=True)
    for shard in shards:
        path = index.parent / shard
        if not safetensors:
            problem = pytorch_problem(path)
            if problem:
                return problem
            continue
        tensors, problem = safetensors_header(path)
        if problem:
            return problem
        assert tensors is not None
        absent = [name for name, where in weight_map.items() if where == shard and name not in tensors]
        if absent:
            return Problem(f"{path} does not hold {len(absent)} tensor(s) that {index.name} maps to it: "
                           f"{_more(absent)}")
    return None


_DAMAGE_WORDS = ("Error while deserializing header", "PytorchStreamReader", "checkpoint file is corrupted",
                 "Unable to load weights", "failed finding central directory")


def load_damage(error: BaseException, directory: Path) -> bool:
    """Whether an exception from loading `directory` means damaged or missing weight files (and not, say, out of
    memory or a missing package)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - transformers needs safetensors
        SafetensorError = ()  # noqa: N806
    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return True
    text = str(error)
    if isinstance(error, FileNotFoundError):  # a shard the index names; only files of this model count
        return any(str(path) in text for path in (directory, directory.resolve()))
    return isinstance(error, (RuntimeError, OSError, ValueError)) and any(word in text for word in _DAMAGE_WORDS)
