"""Ground truth for the estimator: run real training steps in a child process and report its memory peaks.

The child loads the model exactly as training does (memfit.train.model), runs `steps` optimizer steps on random
full-length sequences, and reports its own peak RSS (VmHWM on Linux; getrusage would include the parent's, see
memfit.guard.sampler) and on CUDA `max_memory_reserved`, `max_memory_allocated` and NVML's figure for the process
(what nvidia-smi shows). Peak RSS is also read separately for the load phase and
the training phase: Linux lets a process reset its RSS high-water mark by writing 5 to /proc/self/clear_refs.

Run as `python -m memfit.estimate.measure MODEL_DIR CONFIG_JSON [--steps N] [--device cpu|cuda]`; prints one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memfit.runtime import run_python_json


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def read_every_weight(model) -> None:
    """Read every weight once, one tensor at a time, allocating nothing of its size: on the host what `.to("cuda")`
    does after a CPU load (each page of the mapped checkpoint read as its tensor is copied out), so a CPU run shows
    the host side of loading for a GPU (memfit.estimate.host)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                tensor.detach().reshape(-1).view(torch.uint8).max()


def _prepare(config, device: str):
    """The child's process as training sets it up: the allocator policy (RSS then follows live tensors), PEFT
    imported, the seed. Returns (allocator, precision)."""
    import torch

    from memfit.allocator import configure
    from memfit.precision import resolve_precision

    allocator = configure()
    if config.quant == "none":
        from memfit.libraries import hide_bitsandbytes_from_peft, import_peft

        # As memfit.train.loop does: no 4/8-bit layer here, so PEFT is imported without bitsandbytes (~43 MB less).
        hide_bitsandbytes_from_peft()
        import_peft()
    torch.manual_seed(config.seed)
    return allocator, resolve_precision(config.dtype, device)


def _load(model_dir: str, config, precision, device: str, read_weights: bool = False):
    """(model, optimizer) as training builds them."""
    from memfit.train.model import load_model
    from memfit.train.optim import build_optimizer

    model = load_model(Path(model_dir), config, precision, device)
    if read_weights:
        read_every_weight(model)
    model.train()
    return model, build_optimizer(config.optimizer, model.parameters(), config.lr)


def run_steps(model_dir: str, config_values: dict, steps: int, device: str, read_weights: bool = False) -> dict:
    import torch

    from memfit.config import TrainConfig
    from memfit.guard.sampler import peak_rss_bytes, rss_bytes
    from memfit.system import mapped_file_bytes

    config = TrainConfig(**config_values)
    allocator, precision = _prepare(config, device)
    baseline_rss = rss_bytes()
    model, optimizer = _load(model_dir, config, precision, device, read_weights)
    load_peak_rss = peak_rss_bytes()
    after_load_rss = rss_bytes()
    can_reset = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_rss, loss = _train_steps(model, optimizer, allocator, config, precision, steps, device)
    result = {
        "baseline_rss_bytes": baseline_rss,
        "after_load_rss_bytes": after_load_rss,
        "load_peak_rss_bytes": load_peak_rss,
        "train_peak_rss_bytes": peak_rss_bytes() if can_reset else None,
        "peak_rss_bytes": max(load_peak_rss, peak_rss_bytes()),
        "step_rss_bytes": step_rss,
        # File-backed pages (libraries) count in RSS but follow the page cache, not the configuration; they only
        # grow, so the end reading bounds their share of the peak.
        "rss_file_bytes": mapped_file_bytes(),
        "loss": loss,
    }
    if device == "cuda":
        result.update(_cuda_peaks())
    return result


def _train_steps(model, optimizer, allocator, config, precision, steps: int, device: str,
                 before_step=None, after_backward=None) -> tuple[list[int], float]:
    """`steps` optimizer steps on random full-length sequences, as training runs them: the RSS after each step and
    the last loss. `before_step()` runs as each step begins, `after_backward()` once its micro-steps' backward
    passes are done, before the optimizer (phase_rises marks the step's phases with them)."""
    import torch

    from memfit.guard.sampler import rss_bytes
    from memfit.train.chunked_loss import chunked_loss_blocker, head_returns_hidden
    from memfit.train.losses import every_next_token, micro_step_loss

    head = None
    if config.chunked_loss and chunked_loss_blocker(model) is None:
        bypass = head_returns_hidden(model)  # held: a collected generator would restore the head
        head = bypass.__enter__()
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    step_rss = []
    for _ in range(steps):
        if before_step is not None:
            before_step()
        for _ in range(config.grad_accum):
            input_ids = torch.randint(0, vocab, (config.batch_size, config.seq_len), generator=generator).to(device)
            # The training step's own loss (chunked through the head as configured); every token scored.
            scored = every_next_token(input_ids.cpu()).to(device)
            with torch.autocast(device_type=device, dtype=precision.compute_dtype, enabled=precision.autocast):
                loss = micro_step_loss(model, {"input_ids": input_ids}, scored, head=head,
                                       compute_dtype=precision.compute_dtype)
            (loss / config.grad_accum).backward()
        if after_backward is not None:
            after_backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        allocator.step_end()
        step_rss.append(rss_bytes())
    return step_rss, float(loss.detach()) * config.grad_accum


def phase_rises(model_dir: str, config_values: dict, steps: int = 3) -> list[dict]:
    """The last of `steps` training steps on CPU (`_train_steps`), cut into the trace's phases
    (memfit.estimate.trace: "forward" until the lm_head runs, "head" until the gradient reaches the last decoder
    layer's output, then "backward" until the backward pass ends): each phase's RSS high-water (VmHWM, reset between
    phases) over the RSS where the phase began and over the RSS where the step began. The earlier steps make the
    optimizer states, so the step starts from what training keeps."""
    from memfit.config import TrainConfig
    from memfit.guard.sampler import peak_rss_bytes, rss_bytes
    from memfit.models.arch import decoder_layers

    config = TrainConfig(**config_values)
    allocator, precision = _prepare(config, "cpu")
    model, optimizer = _load(model_dir, config, precision, "cpu")
    marks: list[dict] = []
    current = {"phase": "", "start": 0, "step_start": 0}

    def mark(phase: str) -> None:
        if current["phase"]:
            high = peak_rss_bytes()
            marks.append(dict(phase=current["phase"], rise_bytes=high - current["start"],
                              over_step_bytes=high - current["step_start"]))
        _reset_peak_rss()
        current.update(phase=phase, start=rss_bytes())

    def begin_step() -> None:
        marks.clear()
        mark("forward")
        current["step_start"] = current["start"]

    def on_layer_output(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: mark("backward"))

    model.get_output_embeddings().register_forward_pre_hook(lambda *_: mark("head"))
    decoder_layers(model)[-1].register_forward_hook(on_layer_output)
    _train_steps(model, optimizer, allocator, config, precision, steps, "cpu", before_step=begin_step,
                 after_backward=lambda: mark(""))
    return list(marks)


def phase_rises_in_child(model_dir: str | Path, config_values: dict, steps: int = 3, timeout_s: float = 900) -> list:
    """`phase_rises` in a fresh interpreter (it sets the allocator policy and resets the RSS high-water)."""
    args = [str(model_dir), json.dumps(config_values), "--steps", str(steps), "--phases"]
    return run_python_json(["-m", "memfit.estimate.measure", *args], timeout_s)


def _cuda_peaks() -> dict:
    import torch

    from memfit.cuda_context import nvml_process_bytes

    # What nvidia-smi shows for this process now: the caching allocator keeps what it reserved (no empty_cache),
    # so this is the reserved peak + the CUDA context and workspaces. None without pynvml.
    process = nvml_process_bytes(torch.cuda.current_device())
    return {
        "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "nvml_process_bytes": process,
        "cuda_context_bytes": None if process is None else process - torch.cuda.memory_reserved(),
    }


def measure_in_child(model_dir: str | Path, config_values: dict, steps: int = 3, device: str = "cpu",
                     timeout_s: float = 900, env: dict | None = None, read_weights: bool = False) -> dict:
    """Run `run_steps` in a fresh interpreter, so its peak RSS is this configuration's alone."""
    args = [str(model_dir), json.dumps(config_values), "--steps", str(steps), "--device", device,
            *(["--read-weights"] if read_weights else [])]
    return run_python_json(["-m", "memfit.estimate.measure", *args], timeout_s, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("config_json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--read-weights", action="store_true",
                        help="read every weight once after loading (the host side of moving it to a GPU)")
    parser.add_argument("--phases", action="store_true", help="print `phase_rises` of the last step instead")
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phase_rises(args.model_dir, json.loads(args.config_json), args.steps)))
        return
    print(json.dumps(run_steps(args.model_dir, json.loads(args.config_json), args.steps, args.device,
                               args.read_weights)))


if __name__ == "__main__":
    main()
