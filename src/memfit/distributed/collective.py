"""The guard on several processes: every rank watches its own memory, and the ranks decide together.

Each rank runs its own Guard (its own sampler thread, its own limit) and its own signal handler. What they decide
(stop at the limit, recover from an out-of-memory error with a smaller micro-batch, stop on SIGINT/SIGTERM) is
agreed at every safe point with ONE small all-reduce: a MAX over a 5-number int64 tensor (which rank, plus one, asks
to stop / saw OOM / was interrupted / crossed the threshold; the highest memory reading). Every rank gets the same
answer and acts on it at the same point, so every rank saves and exits together (3, 4 or 130), and none is left in a
collective that another rank will never join.

Why this cannot deadlock. Under plain DDP, gradients are all-reduced by hooks inside backward. A rank whose forward
raises out-of-memory would leave the others blocked in that backward's all-reduce, while it itself goes on to
another collective (the agreement, a checkpoint barrier): they wait for each other forever. So here:

- Every micro-batch runs under `accelerator.no_sync` (DDP then also skips its forward's buffer broadcast): the
  forward and backward of a micro-batch contain no collective at all, whatever raises inside them.
- The only collectives of a step are the agreements and, last, one explicit gradient all-reduce. Agreements happen
  before micro-batch k (k >= 1) and after the last micro-batch. Every rank has the same number of micro-batches
  (the step's rows are split evenly, `ranks.shard_rows`); a rank whose micro-batch k fails skips to the step-end
  agreement, which is then its (k+1)-th agreement of the step, the same count as the other ranks' agreement before
  micro-batch k+1. All ranks learn of the failure there and leave the step together.
- The gradient all-reduce (SUM: the step objective is normalised over the global step's tokens, so the ranks'
  gradients add up to the one-process gradient) runs only after an agreement that said every rank finished. The
  guard's loop-level check (the step end, where a limit crossed or a leak stops the run) is an agreement too.

The price: DDP's overlap of the gradient all-reduce with backward is given up. For LoRA the gradients are the
adapters' (the tiny test model: 156k parameters, 0.6 MB; a Llama-3-8B shape at rank 16 on all linear layers: 42M,
168 MB in fp32), so that all-reduce is short; a full fine-tune pays it at step end in full. Measured between 2 gloo
processes on a shared 2-core machine (benchmarks/distributed_cpu.py, docs/benchmarks.md): one agreement 0.5-0.7 ms,
the all-reduce of 651k adapter gradients 2.5-3.3 ms, against 0.9-1.4 s steps.

Sharded engines (FSDP, DeepSpeed ZeRO) gather parameters from the other ranks inside every forward pass and reduce
gradients inside backward, so their micro-batches are not free of collectives and the argument above does not hold
for an error raised inside them. What they do instead (memfit.train.loop):
- The agreements stay where they are (before micro-batch k >= 1, at the step end; DeepSpeed, whose engine steps in
  the last backward, skips the in-step one after it), so a stop asked by the guard (which acts before the limit),
  a leak or a signal on any rank is still taken by all ranks at the same safe point, checkpointed and exited with 3
  or 130 together. A checkpoint's gathers are collectives every rank reaches at that point too.
- An out-of-memory error inside a micro-batch is not recovered in the process: the other ranks may be waiting in
  that forward's all-gather, and no agreement can reach them. The failing rank raises OutOfMemoryError (one line,
  exit 4) and exits; the others' pending collective fails when its connection closes (gloo) or they are stopped by
  the launcher (torchrun ends every worker once one has failed; on NCCL, its watchdog or the launcher). The last
  periodic checkpoint stays good; restarting is the launcher's job (`torchrun --max-restarts N`, with
  `--resume RUN_DIR` in the command and a smaller --batch-size if the OOM repeats), as --supervise refuses several
  processes.

On CUDA the agreement and the end-of-run gathers use a gloo group beside NCCL: the flags are host values, so agreeing
never waits for the GPU's queue. What no agreement can cover: a rank killed outright (SIGKILL, the kernel's OOM
killer) never reaches the next one, and the others wait in it until the launcher (torchrun stops all workers when
one dies) ends them; the last periodic checkpoint resumes the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.distributed.ranks import Ranks

# Positions in the agreement tensor.
_STOP, _OOM, _INTERRUPTED, _WARN, _WATCHED = range(5)
# Gradient all-reduce buckets: one collective per bucket, each at most this many elements (64 MB of fp32), so a full
# fine-tune does not need a second copy of all its gradients at once.
BUCKET_ELEMENTS = 16 * 1024**2


@dataclass(frozen=True)
class Decision:
    """What the ranks agreed at one safe point. A `*_rank` is the highest rank that raised that flag, None if none did."""

    stop_rank: int | None = None  # the memory guard asked to stop (limit crossed, projected, leak)
    oom_rank: int | None = None  # a micro-batch raised out-of-memory
    interrupted_rank: int | None = None  # SIGINT/SIGTERM
    warn_rank: int | None = None  # memory reached the threshold
    max_watched_bytes: int = 0  # the highest memory reading among the ranks at this point

    @property
    def stop(self) -> bool:
        """Leave the step (and, unless it is an OOM to recover from, the run)."""
        return self.stop_rank is not None or self.interrupted_rank is not None or self.oom_rank is not None


def _flag(raised: bool, rank: int) -> int:
    return rank + 1 if raised else 0


def _rank_of(value: int) -> int | None:
    return int(value) - 1 if value > 0 else None


def decide(values: list[int]) -> Decision:
    """The Decision from a reduced agreement tensor's values."""
    return Decision(_rank_of(values[_STOP]), _rank_of(values[_OOM]), _rank_of(values[_INTERRUPTED]),
                    _rank_of(values[_WARN]), int(values[_WATCHED]))


def local_flags(rank: int, *, stop: bool, oom: bool, interrupted: bool, warn: bool, watched_bytes: int) -> list[int]:
    return [_flag(stop, rank), _flag(oom, rank), _flag(interrupted, rank), _flag(warn, rank), int(watched_bytes)]


class Agreement:
    """The collective side of the guard. With one process nothing is communicated: `agree` returns the local flags."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.calls = 0  # agreements made (tests and the benchmark count them)
        self.group = None
        if ranks.distributed:
            import torch.distributed as dist

            # The default group is gloo on CPU; beside NCCL a gloo group keeps the flags on the host.
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agree(self, *, stop: bool = False, oom: bool = False, interrupted: bool = False, warn: bool = False,
              watched_bytes: int = 0) -> Decision:
        values = local_flags(self.ranks.rank, stop=stop, oom=oom, interrupted=interrupted, warn=warn,
                             watched_bytes=watched_bytes)
        if not self.ranks.distributed:
            return decide(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        self.calls += 1
        return decide(tensor.tolist())

    def gather(self, value):
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.ranks.distributed:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def all_reduce_sum(tensors: list[torch.Tensor], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum `tensors` over the ranks, in place, in buckets flattened into one tensor each: a collective per bucket,
    not per tensor (a LoRA model has hundreds of small adapter tensors). The trainer passes the gradients and the
    step's loss sum last, so the global loss rides along with the gradients at no extra collective. Every rank must
    pass the same shapes in the same order."""
    import torch.distributed as dist

    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        bucket.append(tensor)
        size += tensor.numel()
        if size >= bucket_elements:
            _reduce_bucket(bucket, dist)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, dist)


def gradients(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients, a zero one where backward left none, so every rank sends the same layout."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    return [param.grad for param in params]


def _reduce_bucket(bucket: list[torch.Tensor], dist) -> None:
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in bucket:
        by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for tensors in by_kind.values():
        if len(tensors) == 1:
            dist.all_reduce(tensors[0], op=dist.ReduceOp.SUM)
            continue
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count


def leave() -> None:
    """After a run's last barrier: the ranks have agreed how it ended and rank 0's files are written. The launcher
    stops the other workers with SIGTERM as soon as the first exits with a non-zero code (3, 4, 130); from here on
    that signal must not turn this worker's own exit code into -15, so it is ignored (the process is exiting)."""
    import signal
    import threading

    import torch.distributed as dist

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
