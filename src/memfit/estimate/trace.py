"""Peak memory of one forward+backward, traced without allocating: the real model code runs on fake tensors.

The model is built on the meta device (PEFT adapters and gradient checkpointing included), every parameter is
swapped for a fake CPU tensor of the same shape and dtype, and one training micro-step (forward under autocast
when mixed precision, the memfit loss, backward) runs under `FakeTensorMode`. A dispatch mode records every
storage an op creates and notices when it is freed, so the trace knows the live bytes after every op — the
activations saved for backward, the attention kernel's buffers, the logits and their fp32 copies, the transient
gradients in backward and the parameter gradients as they accumulate. The peak of that series, split by kind at
the moment it happens, is the activations/logits/gradients part of the estimate.

This follows whatever the installed transformers/PEFT/torch really do (SDPA vs eager, RMSNorm upcasts, PEFT's
fp32 adapter casts), which a closed-form formula cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class TracePeak:
    """Live bytes at the peak of one micro-step, by kind (parameters and optimizer states excluded)."""

    activations: int
    logits: int  # tensors with a vocab-sized last dimension: logits, their fp32 copy, log-softmax, their grads
    gradients: int  # parameter gradients alive at the peak

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.gradients


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops, until they are freed; remembers the peak and its split."""

    def __init__(self, ignored_storages: set[int], vocab_size: int):
        super().__init__()
        self.ignored = ignored_storages
        self.vocab_size = vocab_size
        self.live: dict[int, tuple[StorageWeakRef, int, bool]] = {}
        self.live_bytes = 0
        self.live_logits = 0
        self.peak = 0
        self.peak_logits = 0
        self.peak_sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in self.live or ref.cdata in self.ignored:
                continue
            is_logits = tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size
            self.live[ref.cdata] = (ref, storage.nbytes(), is_logits)
            self.live_bytes += storage.nbytes()
            self.live_logits += storage.nbytes() if is_logits else 0
        for key in [key for key, (ref, _, _) in self.live.items() if ref.expired()]:
            _, nbytes, is_logits = self.live.pop(key)
            self.live_bytes -= nbytes
            self.live_logits -= nbytes if is_logits else 0
        if self.live_bytes > self.peak:
            self.peak = self.live_bytes
            self.peak_logits = self.live_logits
            self.peak_sizes = {key: nbytes for key, (_, nbytes, _) in self.live.items()}
        return out


def fakeify_(model: torch.nn.Module, fake_mode) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor (ties kept), in place."""
    replaced: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                with fake_mode:
                    data = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                replaced[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                with fake_mode:
                    module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device="cpu")


def trace_step(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int,
               compute_dtype: torch.dtype, autocast: bool) -> TracePeak:
    """Trace one micro-step of `model` (already fakeified by `fakeify_`) and return its peak live bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.train.losses import causal_lm_loss

    fake_mode = _fake_mode_of(model) or FakeTensorMode()
    ignored = {StorageWeakRef(t.untyped_storage()).cdata for t in list(model.parameters()) + list(model.buffers())}
    tracker = _LiveBytes(ignored, vocab_size)
    with fake_mode:
        input_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        with tracker:
            with torch.autocast(device_type="cpu", dtype=compute_dtype, enabled=autocast):
                logits = model(input_ids=input_ids).logits
            loss = causal_lm_loss(logits, input_ids)
            del logits
            loss.backward()
        grad_storages = {
            StorageWeakRef(param.grad.untyped_storage()).cdata
            for param in model.parameters()
            if param.grad is not None
        }
        for param in model.parameters():
            param.grad = None
    # Gradient storages alive at the peak (freed ones are gone from `live`, so sizes are remembered at the peak).
    gradients = sum(nbytes for key, nbytes in tracker.peak_sizes.items() if key in grad_storages)
    return TracePeak(
        activations=tracker.peak - tracker.peak_logits - gradients,
        logits=tracker.peak_logits,
        gradients=gradients,
    )


def _fake_mode_of(model: torch.nn.Module):
    from torch._subclasses.fake_tensor import FakeTensor

    for param in model.parameters():
        if isinstance(param.data, FakeTensor):
            return param.data.fake_mode
    return None
