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

from contextlib import nullcontext

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memfit.estimate.peaks import PHASES, TracePeak

__all__ = ["PHASES", "TracePeak", "fakeify_", "trace_step"]


_DEVICE_QUERY = torch.ops.prim.device.default


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops until they are freed; remembers the peak of each phase."""

    def __init__(self, ignored_storages: set[int], vocab_size: int, params: list[torch.nn.Parameter]):
        super().__init__()
        self.ignored = ignored_storages
        self.param_signatures = {(tuple(p.shape), p.dtype) for p in params if p.requires_grad}
        self.vocab_size = vocab_size
        # storage pointer -> (weak ref, bytes, is_logits, serial); pointers are reused after a free, serials not.
        self.live: dict[int, tuple[StorageWeakRef, int, bool, int]] = {}
        self.serial = 0
        self.live_bytes = 0
        self.live_logits = 0
        self.phase = "forward"
        self.checked_phase = ""  # the phase at the last look at the live bytes
        # phase -> (peak bytes, logits bytes at that peak, {serial: bytes} alive at that peak)
        self.peaks: dict[str, tuple[int, int, dict[int, int]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE_QUERY and self.phase == self.checked_phase:
            # Fake tensors ask for their device ~2 times per op (17k calls in an 8B LoRA trace); none allocates.
            return func(*args, **(kwargs or {}))
        if func is torch.ops.aten._grouped_mm.default:
            out = _grouped_mm_any_dtype(func, args, kwargs or {})
        else:
            out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.add.Tensor and self.phase != "forward":
            self._accumulate_in_place(args)
        created = []
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self.ignored:
                    created.append((ref, storage.nbytes(), tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size))
        # Live bytes only grow when an op creates a storage, so the peak can only move then (or when a new phase
        # starts its own peak): only then are the frees since the last look counted. Deferring them is exact, and
        # safe: the weak refs held in `live` keep a freed storage's address from being reused meanwhile.
        if not created and self.phase == self.checked_phase:
            return out
        self.checked_phase = self.phase
        # The keys are the storages' cdata: asking torch directly skips two Python calls per storage and op.
        expired = torch.UntypedStorage._expired
        for key in [key for key in self.live if expired(key)]:
            _, nbytes, is_logits, _ = self.live.pop(key)
            self.live_bytes -= nbytes
            self.live_logits -= nbytes if is_logits else 0
        for ref, nbytes, is_logits in created:
            self.serial += 1
            self.live[ref.cdata] = (ref, nbytes, is_logits, self.serial)
            self.live_bytes += nbytes
            self.live_logits += nbytes if is_logits else 0
        if self.live_bytes > self.peaks.get(self.phase, (-1,))[0]:
            sizes = {serial: nbytes for _, nbytes, _, serial in self.live.values()}
            self.peaks[self.phase] = (self.live_bytes, self.live_logits, sizes)
        return out

    def _accumulate_in_place(self, args) -> None:
        """Two gradients of one parameter (a tied embedding: the head's and the lookup's) are summed by the autograd
        engine, which adds in place into the first one when it holds the only reference to a plain, dense tensor
        (torch's InputBuffer::accumulate); fake tensors are a tensor subclass, so under this mode the sum is always
        out of place, one vocab x hidden buffer more than a real run makes. Hand the first buffer's bytes over to
        the sum where the real engine steals it: when it is not a view. Measured (qwen2.5-0.5b cut to 4 layers,
        full fp32, 2 x 256, the RSS high-water of the backward pass through the layers above its start, step 3):
        memfit's chunked loss returns the head's gradient as a fresh tensor, and the real pass rose 1,265 MB (the
        trace: 1,268 with the hand-over, 1,785 without); the full-logits loss returns it as a transposed view,
        which the engine does not steal: 1,785 (trace 1,785). Autocast's weight-gradient cast makes a fresh
        buffer: stolen too."""
        tensors = [arg for arg in args[:2] if isinstance(arg, torch.Tensor)]
        if len(tensors) != 2 or tensors[0].shape != tensors[1].shape or tensors[0].dtype != tensors[1].dtype:
            return
        if (tuple(tensors[0].shape), tensors[0].dtype) not in self.param_signatures:
            return
        key = StorageWeakRef(tensors[0].untyped_storage()).cdata
        if key in self.live and self.live[key][1] and not tensors[0]._is_view():
            ref, nbytes, is_logits, serial = self.live[key]
            self.live[key] = (ref, 0, is_logits, serial)
            self.live_bytes -= nbytes
            self.live_logits -= nbytes if is_logits else 0


def _grouped_mm_any_dtype(func, args, kwargs):
    """The mixture-of-experts matmul (transformers' "grouped_mm" experts) on fake tensors of any dtype. torch's meta
    kernel takes bf16 only (the CUDA kernel's rule) while the CPU kernel that fp32 training on CPU runs takes fp32
    too: shape the call in bf16, then make the output in the dtype the real kernel returns. The bf16 copies are
    the trace's own, so they are made below this mode and never counted."""
    mat_a, mat_b = args[0], args[1]
    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return func(*args, **kwargs)
    shaped = func(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), *args[2:], **kwargs)
    return torch.empty(shaped.shape, dtype=kwargs.get("out_dtype") or mat_a.dtype, device=shaped.device)


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


def trace_step(model: torch.nn.Module, fake_mode, batch_size: int, seq_len: int, vocab_size: int,
               compute_dtype: torch.dtype, autocast: bool, head: torch.nn.Module,
               last_layer: torch.nn.Module, chunked_loss: bool = False) -> dict[str, TracePeak]:
    """Trace one micro-step of `model` (fakeified by `fakeify_` in `fake_mode`): the peak live bytes of each phase.

    Phases: "forward" until `head` (the lm_head) runs, "head" (logits, loss, and their backward) until the gradient
    reaches `last_layer`'s output, then "backward" through the decoder layers. Within a phase the peak sits at the
    same place whatever the depth, so each phase can be extrapolated over the number of layers on its own.
    """
    from memfit.train.chunked_loss import head_returns_hidden
    from memfit.train.losses import every_next_token, micro_step_loss

    ignored = {StorageWeakRef(t.untyped_storage()).cdata for t in list(model.parameters()) + list(model.buffers())}
    tracker = _LiveBytes(ignored, vocab_size, list(model.parameters()))

    def enter_head(*_):
        tracker.phase = "head"

    def watch_layer_output(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: setattr(tracker, "phase", "backward"))

    hooks = [head.register_forward_pre_hook(enter_head), last_layer.register_forward_hook(watch_layer_output)]
    try:
        with fake_mode:
            input_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
            scored = every_next_token(input_ids)
            # The training step's own loss code, chunked through the head or over full logits as configured.
            bypass = head_returns_hidden(model) if chunked_loss else nullcontext()
            with tracker, bypass as bypassed_head:
                with torch.autocast(device_type="cpu", dtype=compute_dtype, enabled=autocast):
                    loss = micro_step_loss(model, {"input_ids": input_ids}, scored, head=bypassed_head,
                                           compute_dtype=compute_dtype)
                loss.backward()
            grad_serials = set()
            for param in model.parameters():
                if param.grad is not None:
                    entry = tracker.live.get(StorageWeakRef(param.grad.untyped_storage()).cdata)
                    if entry is not None:
                        grad_serials.add(entry[3])
                param.grad = None
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for phase in PHASES:
        peak, logits, sizes = tracker.peaks.get(phase, (0, 0, {}))
        gradients = sum(nbytes for serial, nbytes in sizes.items() if serial in grad_serials)
        result[phase] = TracePeak(activations=peak - logits - gradients, logits=logits, gradients=gradients)
    return result

