"""The loading peak: on CPU, a checkpoint whose weights change dtype on the way in is resident twice; on a GPU,
4-bit fused experts arrive in 16 bits first. And the file pages fused experts leave mapped."""

from __future__ import annotations

from memfit.config import TrainConfig
from memfit.estimate import baseline
from memfit.estimate.dtypes import Precision
from memfit.estimate.hardware import Hardware
from memfit.estimate.terms import _nf4_bytes, weight_bytes
from memfit.models.arch import ArchInfo

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def checkpoint_dtype_bytes(hf_config) -> int | None:
    """Bytes per weight as the checkpoint stores them (the config's `dtype`/`torch_dtype`); None when unstated."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(hf_config, key, None)
        if value is not None:
            return _DTYPE_BYTES.get(str(value).removeprefix("torch."))
    return None


def load_peak_bytes(info: ArchInfo, config: TrainConfig, precision: Precision, hardware: Hardware,
                    hf_config) -> int:
    """CPU RSS at the end of loading, when the weights change dtype on the way in.

    transformers maps the safetensors file; when the stored dtype is the one training wants, the tensors are that
    mapping (no copy, no peak). When it is not, every converted tensor is a new allocation while the whole file's
    pages are mapped and read: runtime + checkpoint + converted weights, before PEFT is imported (measured, CPU:
    a bf16 checkpoint loaded as fp32 or fp32 as bf16 peaks at file + converted + the process baseline, +4..+7%;
    QLoRA within -4%; docs/benchmarks.md). The file pages are page cache, so the kernel can drop them under
    pressure, but RSS and the guard count them. On a GPU the weights go to the device: the host peak is not device
    memory.
    """
    if hardware.device != "cpu":
        if config.quant == "4" and info.expert_params:
            # The fused experts arrive on the device in the frozen dtype, all of them, before memfit quantizes
            # them one by one (memfit.train.experts): the device holds the 16-bit experts at the end of loading.
            return (weight_bytes(info, config, precision) + baseline.runtime_bytes(hardware, config, 0)
                    + info.expert_params * precision.frozen_bytes - int(_nf4_bytes(info.expert_params)))
        return 0
    stored_bytes = checkpoint_dtype_bytes(hf_config)
    wanted_bytes = precision.trainable_bytes if config.method == "full" else precision.frozen_bytes
    if not info.experts_fused_at_load and (stored_bytes is None or stored_bytes == wanted_bytes):
        return 0  # QLoRA too: bitsandbytes quantizes tensor by tensor from the mapping (fp32 file, fp32: no peak)
    checkpoint = info.params * (stored_bytes or wanted_bytes)
    loaded = weight_bytes(info, config, precision)
    if config.quant == "4" and info.experts:
        # The fused experts are quantized after loading, from a copy in the frozen dtype, one weight at a time;
        # bitsandbytes' CPU kernel holds the weight's fp32 scaled copy, its int32 bucket indices and their uint8
        # form at once (bitsandbytes/backends/default/ops.py quantize_4bit): 9 bytes a weight of the largest.
        loaded += info.expert_params * precision.frozen_bytes - _nf4_bytes(info.expert_params)
        loaded += 9 * max(weight.params for weight in info.experts)
    return baseline.idle_process_bytes() + checkpoint + int(loaded)


def mapped_expert_file_bytes(info: ArchInfo, hardware: Hardware, hf_config, precision: Precision) -> int:
    """CPU: the file pages of per-expert checkpoint tensors that transformers fused into new tensors while loading.
    They stay resident after loading, since the other tensors are views of the same mapping (measured on tiny
    Mixtral and Qwen3-MoE shapes: benchmarks/estimate_accuracy.py)."""
    if hardware.device != "cpu" or not info.experts_fused_at_load:
        return 0
    return info.expert_params * (checkpoint_dtype_bytes(hf_config) or precision.frozen_bytes)
