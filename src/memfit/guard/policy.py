"""What the guard does with readings: the limit, the threshold, the stop before the limit, leak detection.

The rules, in the order they act:

- **limit**: chosen once at start (`choose_limit`): `--max-memory`, else 80% of what is available now.
- **threshold** (default 80% of the limit): the first step whose peak reaches it releases caches (gc, the CUDA
  cache, glibc's free heap) and is reported once.
- **limit crossed**: a step whose peak is above the limit requests a stop; the trainer saves and exits (code 3).
- **early stop**: the sampler thread requests a stop inside a step when memory is already above the limit, or is
  rising fast enough to cross it before the step would end.
- **leak**: the step-end memory (what survives a step) should be flat once training has warmed up; a steady
  climb is fitted with least squares, reported once with its slope and the step at which it reaches the limit.
- **host RAM** (only where the device is not the host: CUDA): the rules above watch the GPU, and host RAM runs out
  on its own (loading: one copy per rank; a checkpoint's state dict gathered on the CPU; merging adapters). So the
  process's RSS has its own limit (`--max-host-memory`, else 80% of the RAM available at start, cgroup-aware: the
  CPU path of `choose_limit`), and the machine's available memory a floor (`HostLimit.floor_bytes`). Either one
  stops the run like the device limit, reported once, as `limit` events that name the host; no threshold, early
  stop or leak fit runs on them (those are the device's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from memfit import faults
from memfit.guard.sampler import MemorySample, MemorySampler, read_memory, slope_per_second

from memfit.units import GB, MB, format_gb


# --- the limit ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryLimit:
    limit_bytes: int
    available_bytes: int  # what "available" was when the limit was chosen
    auto: bool  # True when derived from what is available, False when --max-memory was given
    device: str
    cgroup_limit_bytes: int | None = None  # this process's memory cgroup limit (CPU/MPS), when there is one

    def describe(self) -> str:
        cgroup = f", inside a {format_gb(self.cgroup_limit_bytes)} cgroup limit" if self.cgroup_limit_bytes else ""
        if self.auto:
            return (f"No memory limit specified. Auto-detecting safe limit: {format_gb(self.limit_bytes)} "
                    f"(based on {format_gb(self.available_bytes)} available{cgroup})")
        text = f"Memory limit: {format_gb(self.limit_bytes)} (--max-memory)"
        if self.cgroup_limit_bytes and self.limit_bytes > self.cgroup_limit_bytes:
            text += (f"; above this process's cgroup limit of {format_gb(self.cgroup_limit_bytes)}: the kernel "
                     "kills the run there first (a lower --max-memory lets the guard stop it with a checkpoint)")
        return text


def choose_limit(max_memory_gb: float | None, device: str = "cpu", fraction: float = 0.8) -> MemoryLimit:
    """The run's memory limit: `max_memory_gb` when given, else `fraction` of what is available on `device`.

    CPU (and MPS, which shares system RAM): psutil's available memory, or what this process's memory cgroup has
    left when that is less (a container sees the whole machine's MemAvailable but is killed at its own limit).
    This process's own RSS is not added back although it is ours to use: at start it is the interpreter and
    libraries, small next to the fraction's margin, and leaving it out errs on the safe side. CUDA: the free memory the driver reports (other processes' use
    already taken out); system RAM when this torch has no CUDA.
    """
    available, cgroup_limit = _available_bytes(device)
    if max_memory_gb is not None:
        return MemoryLimit(int(max_memory_gb * GB), available, False, device, cgroup_limit)
    return MemoryLimit(int(available * fraction), available, True, device, cgroup_limit)


# The floor under the machine's available memory while a GPU trains (HostLimit.floor_bytes): 5% of the RAM, at least
# 512 MiB and at most 4 GiB. 5% is where earlyoom (the desktop OOM daemon most distributions ship) sends SIGKILL by
# default (SIGTERM at 10%), and where the kernel has been evicting the page cache of running programs for a while
# (a desktop stalls); the guard stops before both. 512 MiB keeps room on a small machine for the stop's own
# checkpoint (written one tensor at a time: memfit.train.checkpoint) and for the OS. 4 GiB caps it on big hosts:
# the floor is the kernel's margin and the save's working set, neither of which grows with the machine.
HOST_FLOOR_FRACTION = 0.05
HOST_FLOOR_MIN_BYTES = 512 * MB
HOST_FLOOR_MAX_BYTES = 4 * GB


@dataclass(frozen=True)
class HostLimit:
    """Host RAM, watched beside a GPU: this process's RSS against `rss` (a MemoryLimit on "cpu"), and the machine's
    available memory against `floor_bytes`."""

    rss: MemoryLimit
    floor_bytes: int
    total_bytes: int  # the machine's RAM when the floor was chosen

    def describe(self) -> str:
        rss = self.rss
        # The auto fraction as chosen: 80%, shared out between the ranks of a machine.
        source = (f"auto: {rss.limit_bytes / max(rss.available_bytes, 1):.0%} of {format_gb(rss.available_bytes)} "
                  "available" if rss.auto else "--max-host-memory")
        cgroup = (f", inside a {format_gb(self.rss.cgroup_limit_bytes)} cgroup limit"
                  if self.rss.cgroup_limit_bytes else "")
        return (f"Host RAM limit: {format_gb(self.rss.limit_bytes)} process RSS ({source}{cgroup}); stop when the "
                f"machine has less than {format_gb(self.floor_bytes)} available")


def host_floor_bytes(total_bytes: int, available_bytes: int) -> int:
    """The available-memory floor for a machine of `total_bytes` RAM (see HOST_FLOOR_FRACTION). When less than twice
    that is available at the start, half of what is available: a floor the run starts under would stop it at once."""
    floor = min(max(int(total_bytes * HOST_FLOOR_FRACTION), HOST_FLOOR_MIN_BYTES), HOST_FLOOR_MAX_BYTES)
    return min(floor, available_bytes // 2)


def choose_host_limit(max_host_memory_gb: float | None, fraction: float = 0.8) -> HostLimit:
    """Host RAM's limits for a run on a GPU: the RSS limit through choose_limit's CPU path (`max_host_memory_gb`
    when given, else `fraction` of the available RAM, bounded by the cgroup), and the available-memory floor."""
    import psutil

    rss = choose_limit(max_host_memory_gb, "cpu", fraction)
    total = int(psutil.virtual_memory().total)
    return HostLimit(rss, host_floor_bytes(total, rss.available_bytes), total)


def watches_host(device: str) -> bool:
    """Whether host RAM needs a watch of its own: the device's memory is not the host's (CUDA). CPU and MPS (which
    shares the RAM) are watched through RSS already."""
    return device.startswith("cuda")


def _available_bytes(device: str) -> tuple[int, int | None]:
    """What is available on `device`, and the cgroup limit that bounds it (CPU/MPS only; see memfit.cgroup)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            _, _, index = device.partition(":")
            free, _total = torch.cuda.mem_get_info(int(index) if index else None)
            return int(free), None
    from memfit.system import available_ram

    return available_ram()


def configure_cuda(limit: MemoryLimit) -> None:
    """Make the CUDA caching allocator itself refuse to grow past the limit (an OOM error instead of crowding out
    other processes). Only for a CUDA limit, and only where CUDA is available; elsewhere nothing happens.
    This initialises CUDA: call cuda_alloc_conf_env() before it."""
    if not limit.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        return
    _, _, index = limit.device.partition(":")
    index = int(index) if index else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(limit.limit_bytes / total, 0.0)), index)


def cuda_alloc_conf_env() -> None:
    """Ask for expandable segments (less fragmentation, so reserved memory stays close to what tensors use)
    unless the user configured the allocator. It is read when CUDA initialises: call this before anything touches
    CUDA, ideally before torch is imported. newer torch reads PYTORCH_ALLOC_CONF as well; a user setting in either
    name is respected."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def release_memory() -> None:
    """Give back what is free but held: Python garbage, the CUDA/MPS allocator caches, glibc's free heap pages."""
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just to empty caches
    if torch is not None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            mps.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_MALLOC_TRIM: Callable[[int], int] | None | bool = False  # False: not looked up yet


def _malloc_trim() -> Callable[[int], int] | None:
    global _MALLOC_TRIM
    if _MALLOC_TRIM is False:
        _MALLOC_TRIM = None
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                function.argtypes = [ctypes.c_size_t]
                function.restype = ctypes.c_int
                _MALLOC_TRIM = function
            except (OSError, AttributeError):  # musl and others have no malloc_trim
                pass
    return _MALLOC_TRIM


# --- leak detection -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeakFit:
    bytes_per_step: float
    r_squared: float
    first_step: int
    last_step: int
    projected_limit_step: int | None  # step at which the fitted line crosses the limit (None if never)


def fit_leak(steps: Sequence[int], values: Sequence[int], limit_bytes: int, min_points: int = 8) -> LeakFit | None:
    """Plain least squares of memory against step; None with fewer than min_points points.

    r_squared is 0 for a perfectly flat series (there is no trend to explain), so a flat line never looks
    like a leak.
    """
    n = len(steps)
    if n != len(values):
        raise ValueError(f"fit_leak: {n} steps but {len(values)} values")
    if n < max(min_points, 2):
        return None
    mean_s = sum(steps) / n
    mean_v = sum(values) / n
    var_s = sum((s - mean_s) ** 2 for s in steps)
    if var_s == 0:
        return None
    slope = sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values)) / var_s
    intercept = mean_v - slope * mean_s
    ss_tot = sum((v - mean_v) ** 2 for v in values)
    ss_res = sum((v - (intercept + slope * s)) ** 2 for s, v in zip(steps, values))
    r_squared = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    projected = None
    if slope > 0:
        # The first whole step at or past the crossing; the tolerance keeps an exact crossing (limit = a + b*s)
        # from rounding up to the next step through float error.
        crossing = (limit_bytes - intercept) / slope
        projected = math.ceil(crossing - 1e-6)
    return LeakFit(slope, r_squared, int(min(steps)), int(max(steps)), projected)


# --- the guard ------------------------------------------------------------------------------------------------


# Which limit a stop or an event is about (GuardEvent.limit, Guard.stop_limit, run.json's stop_limit).
DEVICE = "device"  # --max-memory: the GPU's memory on CUDA, the RAM on CPU/MPS
HOST_RSS = "host"  # --max-host-memory: this process's RSS while a GPU trains
HOST_AVAILABLE = "host_available"  # the machine's available RAM under its floor while a GPU trains


@dataclass(frozen=True)
class GuardEvent:
    kind: str  # "threshold" | "limit" | "early_stop" | "leak"
    step: int
    watched_bytes: int  # the figure the event is about: RSS for the host limit, available bytes for the floor
    message: str  # one human line
    leak: LeakFit | None = None
    limit: str = DEVICE  # DEVICE | HOST_RSS | HOST_AVAILABLE


# Early stop from the thread: the projection only counts when the rise is real. Below 50 MB/s, allocator noise and
# slow growth (the leak detector's business) dominate; fewer than 5 samples make a slope from one or two jumps.
EARLY_STOP_MIN_RATE = 50 * MB
EARLY_STOP_MIN_SAMPLES = 5
EARLY_STOP_RATE_WINDOW_S = 1.0
# How far above every earlier step's peak memory must be before a rise is projected (a fraction of the limit):
# a step a few MB above the last is noise, and its forward-pass rise would project far past the limit.
EARLY_STOP_NEW_GROUND = 0.02
LEAK_MIN_R_SQUARED = 0.8


class Guard:
    """Watches memory during training; the trainer calls end_step each step and stops when stop_requested.

    `reader` (the memory reading function) is injectable so tests can play a memory curve. `host` (HostLimit) adds
    the host RAM watch for a device that is not the host (see the module docstring).
    """

    def __init__(self, limit: MemoryLimit, threshold: float = 0.8, interval_s: float = 0.1,
                 leak_bytes_per_step: float = 8 * MB, warmup_steps: int = 10, leak_window: int = 50,
                 reader: Callable[[str], MemorySample] = read_memory, host: HostLimit | None = None):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.limit = limit
        self.host = host
        # Beside a host limit the device's messages say which memory they are about.
        self._device_memory = "GPU memory" if host is not None else "memory"
        self.peak_host_rss_bytes = 0  # the highest RSS the guard read (all samples, the thread's too)
        self.min_system_available_bytes: int | None = None  # the lowest available RAM it read
        self._host_window_rss = 0  # the highest RSS since the previous end_step
        self._host_window_available: int | None = None  # the lowest available RAM since the previous end_step
        self._host_reported: set[str] = set()  # host limits already reported as an event: each once
        self.threshold = threshold
        self.leak_bytes_per_step = leak_bytes_per_step
        self.warmup_steps = warmup_steps
        self.leak_window = leak_window
        self._reader = reader
        self.sampler = MemorySampler(limit.device, interval_s, on_sample=self._on_sample, reader=reader)
        self.samples: list[tuple[int, int]] = []  # (step, watched bytes at the end of the step)
        self.peak_watched_bytes = 0
        self._peak_lock = threading.Lock()  # the thread and end_step both raise the peak
        self._stop = threading.Event()
        # The same request as a plain attribute, for the trainer's hook at every decoder layer's entry: one
        # attribute read per layer, no lock, no call (a bool assignment is atomic under the GIL, and a read that
        # misses it by one layer only stops one layer later).
        self.stop_now = False
        self._stop_lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stop_limit: str | None = None
        self._background_stop_pending = False
        self._threshold_reported = False
        self._leak_reported = False
        self.leak: LeakFit | None = None  # the current fit while step-end memory keeps rising like a leak
        self._last_step_s: float | None = None
        self._step_started: float | None = None  # on the reader's clock; None until start() or an end_step
        # The highest step peak of finished steps, the first step of this process left out: memory inside a step
        # that stays under it is the same transient every step goes through, not a new rise worth projecting.
        self._previous_step_peak: int | None = None
        self._steps_timed = 0  # training steps this process finished (note_step_time); end_step also runs before

    @property
    def threshold_bytes(self) -> int:
        return int(self.limit.limit_bytes * self.threshold)

    # Lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.sampler.start()
        # The step clock runs on the reader's clock (a test's fake reader has its own).
        latest = self.sampler.latest
        self._step_started = latest.time if latest is not None else None

    def stop(self) -> None:
        self.sampler.stop()

    def __enter__(self) -> Guard:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Stop requests ----------------------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def stop_limit(self) -> str | None:
        """Which limit the stop came from (DEVICE, HOST_RSS, HOST_AVAILABLE); None without a stop."""
        return self._stop_limit

    def request_stop(self, reason: str, limit: str = DEVICE) -> None:
        """Ask the trainer to stop; the first reason (and the limit it names) is kept."""
        with self._stop_lock:
            if self._stop_reason is None:
                self._stop_reason = reason
                self._stop_limit = limit
            self._stop.set()
            self.stop_now = True

    def note_step_time(self, seconds: float) -> None:
        """A training step has finished in `seconds`; called before that step's end_step."""
        self._last_step_s = seconds
        self._steps_timed += 1

    def _raise_peak(self, watched: int) -> None:
        with self._peak_lock:
            self.peak_watched_bytes = max(self.peak_watched_bytes, watched)

    # The background check ---------------------------------------------------------------------------------

    def _on_sample(self, sample: MemorySample) -> None:
        """Runs in the sampler thread. Requests a stop once; later samples only keep the peak."""
        faults.maybe_oom_kill(sample.rss_bytes)
        watched = sample.watched_bytes
        self._raise_peak(watched)
        if self.host is not None:
            self._note_host(sample)
            crossing = self._host_crossing(sample.rss_bytes, sample.system_available_bytes)
            if crossing is not None and not self._stop.is_set():
                # Reported by the next end_step as a `limit` event (once), not as an early stop.
                self.request_stop(crossing[1], crossing[0])
        if self._stop.is_set():
            return
        limit = self.limit.limit_bytes
        if watched > limit:
            reason = (f"{self._device_memory} above the limit inside a step: {format_gb(watched)} of "
                      f"{format_gb(limit)}")
        else:
            reason = self._projected_crossing(sample)
        if reason is not None:
            with self._stop_lock:
                if not self._stop.is_set():
                    self._background_stop_pending = True
            self.request_stop(reason)

    def _projected_crossing(self, sample: MemorySample) -> str | None:
        """A reason to stop when the current rise would cross the limit before this step ends, else None.

        The horizon is what remains of the step, judged by the last step's duration. Besides the rate and
        sample-count floors, memory must be clearly above every earlier step's peak (by EARLY_STOP_NEW_GROUND of
        the limit): each step rises and falls again (activations), and projecting that ordinary rise to the end of
        the step would stop healthy runs whose peak sits near the limit. For the same reason nothing is projected
        before the first step has finished (the first forward pass of smollm2-135m-shaped LoRA rises at 750 MB/s,
        and projecting it stopped batches whose peak was 70% of the limit); the limit itself is still enforced.
        Nor is the first step a baseline: its peak and its duration are the allocator's and the libraries' warm-up.
        With the heap serving a step's tensors (allocator.py "trim", there with a fixed 32 MiB mmap threshold) it
        settles over the first steps: step 2 of 30-layer smollm2-135m LoRA peaked 466 MB above step 1, which took
        37 s (warm-up) against 4 s after; projected over that horizon, its ordinary rise stopped a healthy run at 18%
        of the limit (a run of benchmarks/allocator_policies.py's settings, 2026-12-03).
        """
        watched = sample.watched_bytes
        if self._last_step_s is None or self._previous_step_peak is None:
            return None  # no settled step yet: nothing says whether this rise is the forward pass or a runaway
        if watched <= self._previous_step_peak + self.limit.limit_bytes * EARLY_STOP_NEW_GROUND:
            return None
        recent = self.sampler.recent(EARLY_STOP_RATE_WINDOW_S)
        if len(recent) < EARLY_STOP_MIN_SAMPLES:
            return None
        rate = slope_per_second(recent)
        if rate <= EARLY_STOP_MIN_RATE:
            return None
        elapsed = sample.time - self._step_started if self._step_started is not None else 0.0
        # At least one sampling interval ahead: past the usual step length, the step is still running.
        horizon = max(self._last_step_s - elapsed, self.sampler.interval_s)
        if watched + rate * horizon <= self.limit.limit_bytes:
            return None
        return (f"{self._device_memory} rising {rate / MB:,.0f} MB/s ({format_gb(watched)} of "
                f"{format_gb(self.limit.limit_bytes)}): "
                "the limit would be crossed before the step ends")

    # The step-end check -----------------------------------------------------------------------------------

    def end_step(self, step: int) -> tuple[MemorySample, list[GuardEvent]]:
        """A fresh reading plus this step's peak (the sampler's window since the previous end_step); the events
        of this step. The returned sample is the step-end reading, with `window_peak_bytes` set to the peak."""
        sample, peak = self.sampler.take_window()
        self._step_started = sample.time
        sample = replace(sample, window_peak_bytes=peak)
        self._raise_peak(peak)
        if self._steps_timed > 1:
            self._previous_step_peak = max(self._previous_step_peak or 0, peak)
        self.samples.append((step, sample.watched_bytes))
        limit = self.limit.limit_bytes
        events: list[GuardEvent] = []

        with self._stop_lock:
            background, self._background_stop_pending = self._background_stop_pending, False
        if background:
            events.append(GuardEvent("early_stop", step, peak, f"Stopping early: {self._stop_reason}"))

        if peak > limit:
            what = self._device_memory[0].upper() + self._device_memory[1:]
            message = (f"{what} above the limit ({format_gb(peak)} of {format_gb(limit)}, "
                       f"{peak / limit:.0%}): stopping")
            self.request_stop(f"{self._device_memory} above the limit at step {step}: {format_gb(peak)} of "
                              f"{format_gb(limit)}")
            events.append(GuardEvent("limit", step, peak, message))

        if self.host is not None:
            events += self._host_events(step, sample)

        if not self._threshold_reported and peak >= self.threshold_bytes:
            self._threshold_reported = True
            release_memory()
            after = self._reader(self.limit.device).watched_bytes
            events.append(GuardEvent(
                "threshold", step, peak,
                f"Memory at {peak / limit:.0%} of the limit ({format_gb(peak)} of {format_gb(limit)}): "
                f"released caches (now {format_gb(after)})"))

        # The leak check runs every step (a fit over at most leak_window points is microseconds), so a threshold
        # crossing is always checked too.
        leak = self._check_leak(step, sample.watched_bytes)
        if leak is not None:
            events.append(leak)
        leak_stop = self._leak_stop(step, peak)
        if leak_stop is not None:
            events.append(leak_stop)
        return sample, events

    # Host RAM beside a GPU ----------------------------------------------------------------------------------

    def _note_host(self, sample: MemorySample) -> None:
        """Keep the host figures' extremes: over the run and over the current step's window (thread and end_step)."""
        with self._peak_lock:
            self.peak_host_rss_bytes = max(self.peak_host_rss_bytes, sample.rss_bytes)
            self._host_window_rss = max(self._host_window_rss, sample.rss_bytes)
            available = sample.system_available_bytes
            lowest, window = self.min_system_available_bytes, self._host_window_available
            self.min_system_available_bytes = available if lowest is None else min(lowest, available)
            self._host_window_available = available if window is None else min(window, available)

    def _rss_crossing(self, rss: int) -> str | None:
        """The stop reason when this process's RSS is above the host RSS limit, else None."""
        limit = self.host.rss
        if rss <= limit.limit_bytes:
            return None
        source = "auto" if limit.auto else "--max-host-memory"
        return f"host RAM above its limit: process RSS {format_gb(rss)} of {format_gb(limit.limit_bytes)} ({source})"

    def _floor_crossing(self, available: int | None) -> str | None:
        """The stop reason when the machine's available memory is under the floor, else None."""
        if available is None or available >= self.host.floor_bytes:
            return None
        return (f"host RAM running out: {format_gb(available)} available on this machine, under the guard's floor "
                f"of {format_gb(self.host.floor_bytes)}")

    def _host_crossing(self, rss: int, available: int) -> tuple[str, str] | None:
        """(which host limit, the stop reason) for the first host limit this reading crosses, else None."""
        reason = self._rss_crossing(rss)
        if reason is not None:
            return HOST_RSS, reason
        reason = self._floor_crossing(available)
        return (HOST_AVAILABLE, reason) if reason is not None else None

    def _host_events(self, step: int, sample: MemorySample) -> list[GuardEvent]:
        """The step end's host check over the window's extremes: a `limit` event per host limit crossed, each once
        in the run (whether the thread saw it first or this reading); the first crossing asks to stop."""
        self._note_host(sample)
        with self._peak_lock:
            rss, available = self._host_window_rss, self._host_window_available
            self._host_window_rss, self._host_window_available = 0, None
        events = []
        for which, figure, reason in ((HOST_RSS, rss, self._rss_crossing(rss)),
                                      (HOST_AVAILABLE, available, self._floor_crossing(available))):
            if reason is None or which in self._host_reported:
                continue
            self._host_reported.add(which)
            self.request_stop(reason, which)
            events.append(GuardEvent("limit", step, figure, f"Stopping: {reason}", limit=which))
        return events

    def _leak_stop(self, step: int, peak: int) -> GuardEvent | None:
        """Stop one step early when a leak would take the next step past the limit: a leak grows every step's
        peak by its rate, so waiting for the crossing overshoots by up to one step's leak (20 MB/step on a
        0.75 GB limit: 2.6%)."""
        if self.leak is None or self.stop_requested or peak + self.leak.bytes_per_step <= self.limit.limit_bytes:
            return None
        limit = self.limit.limit_bytes
        reason = (f"a memory leak of {self.leak.bytes_per_step / MB:,.1f} MB/step would take step {step + 1} past "
                  f"the limit ({format_gb(peak)} of {format_gb(limit)} at step {step})")
        self.request_stop(reason)
        return GuardEvent("early_stop", step, peak, f"Stopping early: {reason}", leak=self.leak)

    def _check_leak(self, step: int, watched: int) -> GuardEvent | None:
        # Warm-up counts end_step calls, not step numbers: a resumed run starts at a high step and still needs its
        # first steps (optimizer states, allocator pools) to settle.
        settled_count = min(len(self.samples) - self.warmup_steps, self.leak_window)
        if settled_count <= 0:
            return None
        settled = self.samples[-settled_count:]  # a slice of the tail only: the history grows all run
        fit = fit_leak([s for s, _ in settled], [v for _, v in settled], self.limit.limit_bytes)
        if fit is None or fit.bytes_per_step <= self.leak_bytes_per_step or fit.r_squared <= LEAK_MIN_R_SQUARED:
            self.leak = None
            return None
        self.leak = fit  # refitted every step: `_leak_stop` projects the next step with it
        if self._leak_reported:
            return None
        self._leak_reported = True
        if fit.projected_limit_step is not None:
            when = f"the limit would be reached at step {fit.projected_limit_step:,}"
        else:
            when = "no limit crossing projected"
        message = (f"Possible memory leak: step-end memory grows {fit.bytes_per_step / MB:,.1f} MB/step over steps "
                   f"{fit.first_step}-{fit.last_step} (R² {fit.r_squared:.2f}); {when}")
        return GuardEvent("leak", step, watched, message, leak=fit)
