"""Read this process's memory, once or from a background thread.

One reading (`read_memory`) costs tens of microseconds, so a thread can take ten a second at no measurable cost to
training (benchmarks/guard_overhead.py). The thread matters because a step's peak sits in the middle of the step
(activations at the end of the forward pass); a read at the step boundary sees only what survives the step.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

# How much sample history the sampler keeps: enough for rate windows of a few seconds at any sane interval.
_HISTORY_SECONDS = 10.0
_HISTORY_MIN_SAMPLES = 64


@dataclass(frozen=True)
class MemorySample:
    """One reading of this process's memory. Byte counts; GPU fields are None where there is no CUDA device."""

    time: float  # time.monotonic()
    rss_bytes: int  # this process's resident set now
    peak_rss_bytes: int  # the resident set's high-water mark since the process started (VmHWM; getrusage)
    system_available_bytes: int  # what the OS could give out without swapping (psutil's "available")
    cuda_allocated_bytes: int | None = None  # bytes in live tensors (torch caching allocator)
    cuda_reserved_bytes: int | None = None  # bytes the caching allocator holds from the driver
    cuda_max_reserved_bytes: int | None = None  # high-water mark of cuda_reserved_bytes
    nvml_used_bytes: int | None = None  # device memory used by all processes (NVML), None without pynvml
    # Set only on the samples Guard.end_step returns: the highest watched_bytes seen during that step.
    window_peak_bytes: int | None = None

    @property
    def watched_bytes(self) -> int:
        """The number the guard compares to the limit: what the caching allocator holds on CUDA (that is what
        another allocation competes with), the resident set elsewhere."""
        if self.cuda_reserved_bytes is not None:
            return self.cuda_reserved_bytes
        return self.rss_bytes

    @property
    def watched_high_water_bytes(self) -> int:
        """The high-water mark of watched_bytes kept by the OS or the allocator (monotonic, never missed)."""
        if self.cuda_max_reserved_bytes is not None:
            return self.cuda_max_reserved_bytes
        return self.peak_rss_bytes


# --- single readings ------------------------------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# getrusage's ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
_process: psutil.Process | None = None


def rss_bytes() -> int:
    # /proc/self/statm is one short line the kernel formats from counters it keeps anyway (~5 µs); psutil's
    # memory_info reads the same but through more Python. The file is reopened each time on purpose: a cached
    # descriptor would keep pointing at the parent after a fork.
    if sys.platform.startswith("linux"):
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
            try:
                return int(os.read(fd, 128).split()[1]) * _PAGE_SIZE
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError):
            pass
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return int(_process.memory_info().rss)


def _system_available_bytes() -> int:
    # psutil.virtual_memory().available is MemAvailable from /proc/meminfo on Linux; reading that one field
    # directly costs half as much (the sampler thread reads it ten times a second). psutil elsewhere, and on
    # kernels without the field (psutil then estimates it).
    if sys.platform.startswith("linux"):
        try:
            return _proc_bytes("/proc/meminfo", b"MemAvailable:")[0]
        except (OSError, ValueError, IndexError):
            pass
    return int(psutil.virtual_memory().available)


def _proc_bytes(path: str, *fields: bytes) -> list[int]:
    """The "Field:  N kB" lines of a /proc file, in bytes, in one read (os.open/os.read: no buffered file object,
    the sampler thread calls this ten times a second). Raises OSError, ValueError or IndexError when a field is
    missing or the file is not there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 8192)
    finally:
        os.close(fd)
    values = []
    for field in fields:
        start = data.index(field) + len(field)
        values.append(int(data[start:data.index(b"\n", start)].split()[0]) * 1024)  # the kernel's kB is KiB
    return values


def _rss_and_peak_bytes() -> tuple[int, int]:
    """RSS and its high-water mark. Linux: VmRSS and VmHWM, one read of /proc/self/status.

    Not getrusage's ru_maxrss for the peak: in a child process, exec folds in the RSS of the process it replaced,
    and with vfork (Python's subprocess) that is the parent's whole address space, so a 60 MB child of a 1.5 GB
    parent reports 1.5 GB. VmHWM is this address space's own mark (the one /proc/self/clear_refs resets).
    """
    if sys.platform.startswith("linux"):
        try:
            rss, peak = _proc_bytes("/proc/self/status", b"VmRSS:", b"VmHWM:")
            return rss, peak
        except (OSError, ValueError, IndexError):
            pass
    return rss_bytes(), int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT


def peak_rss_bytes() -> int:
    return _rss_and_peak_bytes()[1]


def _cuda_index(device: str) -> int | None:
    """"cuda" -> the current device, "cuda:N" -> N; None for other devices."""
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    if index:
        return int(index)
    import torch

    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


class _Nvml:
    """One NVML handle per device, opened on first use and kept for the process's life (nvmlInit is slow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._unavailable = False

    def used_bytes(self, ordinal: int) -> int | None:
        if self._unavailable:
            return None
        try:
            import pynvml
        except ImportError:
            self._unavailable = True
            return None
        try:
            with self._lock:
                handle = self._handles.get(ordinal)
                if handle is None:
                    from memfit.system import _visible_indices

                    pynvml.nvmlInit()
                    visible = _visible_indices(pynvml.nvmlDeviceGetCount())
                    handle = pynvml.nvmlDeviceGetHandleByIndex(visible[ordinal])
                    self._handles[ordinal] = handle
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # no driver, a MIG slice NVML will not describe, an index it does not know: no reading
            self._unavailable = True
            return None


_nvml = _Nvml()


def read_memory(device: str = "cpu") -> MemorySample:
    """One reading. On a CUDA device the allocator fields are 0 until CUDA is initialised (nothing is held yet);
    this never initialises CUDA itself."""
    cuda: dict[str, int | None] = {"cuda_allocated_bytes": None, "cuda_reserved_bytes": None,
                                   "cuda_max_reserved_bytes": None, "nvml_used_bytes": None}
    index = _cuda_index(device)
    if index is not None:
        import torch

        if torch.cuda.is_available():
            # One call for three numbers: memory_allocated/reserved each rebuild the same stats dict.
            stats = torch.cuda.memory_stats_as_nested_dict(index) if torch.cuda.is_initialized() else {}
            reserved = stats.get("reserved_bytes", {}).get("all", {})
            cuda.update(
                cuda_allocated_bytes=int(stats.get("allocated_bytes", {}).get("all", {}).get("current", 0)),
                cuda_reserved_bytes=int(reserved.get("current", 0)),
                cuda_max_reserved_bytes=int(reserved.get("peak", 0)),
                nvml_used_bytes=_nvml.used_bytes(index),
            )
    rss, peak_rss = _rss_and_peak_bytes()
    return MemorySample(
        time=time.monotonic(),
        rss_bytes=rss,
        peak_rss_bytes=peak_rss,
        system_available_bytes=_system_available_bytes(),
        **cuda,
    )


# --- the background sampler -----------------------------------------------------------------------------------


def slope_per_second(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (time, bytes) points in bytes per second; 0.0 with fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t


class MemorySampler:
    """Background daemon thread reading memory every interval_s (default 0.1), so a spike inside a step is seen.

    `on_sample` is called from the thread with each sample. interval_s <= 0 starts no thread: the window peak and
    the rate then come from on-demand reads only. `reader` is injectable for tests (a fake memory curve).
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.1,
                 on_sample: Callable[[MemorySample], None] | None = None,
                 reader: Callable[[str], MemorySample] = read_memory):
        self.device = device
        self.interval_s = interval_s
        self._on_sample = on_sample
        self._reader = reader
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        history = _HISTORY_MIN_SAMPLES
        if interval_s > 0:
            history = max(history, int(_HISTORY_SECONDS / interval_s))
        self._history: deque[tuple[float, int]] = deque(maxlen=history)
        self._latest: MemorySample | None = None
        self._window_max: int | None = None
        self._window_high_water: int | None = None  # the OS/allocator high-water mark when the window began
        # CPU seconds the thread itself used (time.thread_time, read in the thread as it ends): the guard's own
        # cost, which a with/without comparison of whole runs cannot resolve below its run-to-run noise.
        self.thread_cpu_s = 0.0

    # The thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self.interval_s <= 0:
            return
        # The high-water mark at the start: a rise of it later can only come from this process since then.
        self._record(self._reader(self.device))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memfit-memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # Event.wait, not sleep: stop() returns within one wakeup instead of a full interval.
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_now()
            except Exception:  # a failed read or callback must not end the guard; the next one may work
                logger.exception("memory sample failed")
        self.thread_cpu_s += time.thread_time()  # += : a restarted sampler adds its new thread's time

    def sample_now(self) -> MemorySample:
        """Take one sample as the thread does (record it, call on_sample). Without a thread (interval_s <= 0) the
        caller can sample at points of its choosing, e.g. between micro-batches."""
        sample = self._reader(self.device)
        self._record(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        return sample

    # Readings -----------------------------------------------------------------------------------------------

    def _record(self, sample: MemorySample) -> None:
        with self._lock:
            self._latest = sample
            self._history.append((sample.time, sample.watched_bytes))
            watched = sample.watched_bytes
            self._window_max = watched if self._window_max is None else max(self._window_max, watched)
            if self._window_high_water is None:
                self._window_high_water = sample.watched_high_water_bytes

    @property
    def latest(self) -> MemorySample | None:
        return self._latest

    def take_window(self) -> tuple[MemorySample, int]:
        """A fresh reading and the highest watched bytes since the previous call; starts a new window.

        Besides the samples, the OS keeps a high-water mark (getrusage on CPU, the allocator's peak on CUDA). When it
        rose during the window, the process was at that value during the window, even if the spike fell between
        two samples; so the window peak is exact whenever the process sets a new record, which is when it matters.
        """
        sample = self._reader(self.device)
        self._record(sample)
        with self._lock:
            peak = self._window_max if self._window_max is not None else sample.watched_bytes
            high_water = sample.watched_high_water_bytes
            if self._window_high_water is not None and high_water > self._window_high_water:
                peak = max(peak, high_water)
            self._window_max = None
            self._window_high_water = high_water
        return sample, peak

    def take_window_peak(self) -> int:
        """Max watched_bytes seen since the previous call (a fresh read included), then reset the window."""
        return self.take_window()[1]

    def rate_bytes_per_s(self, window_s: float = 1.0) -> float:
        """Least-squares slope of watched_bytes over the last window_s of samples (0.0 with < 3 samples)."""
        return slope_per_second(self.recent(window_s))

    def recent(self, window_s: float) -> list[tuple[float, int]]:
        """(time, watched_bytes) of the samples taken in the last window_s seconds, oldest first."""
        with self._lock:
            if not self._history:
                return []
            newest = self._history[-1][0]
            return [(t, v) for t, v in self._history if t >= newest - window_s]
