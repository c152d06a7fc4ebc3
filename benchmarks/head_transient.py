"""What the trace does not see at the loss head: torch.logsumexp's own buffer, one input-sized tensor.

The chunked loss (memfit.train.chunked_loss) used to take `torch.logsumexp` of each chunk's fp32 logits. That kernel
makes a temporary the size of its input ((x - max).exp(), before the sum) inside one aten op, so the fake-tensor
trace (memfit.estimate.trace), which sees the op's output only, missed it; the loss now exponentiates the logits in
their own buffer (chunked_loss._exp_in_place). Measured two ways, each in this process with memfit's allocator
policy (RSS follows tensors over 1 MiB):
- one call alone: the RSS high-water (VmHWM, reset through /proc/self/clear_refs) of torch.logsumexp, and of the
  loss's in-place form, over the input's bytes, at 256, 512 and 1024 tokens of a 49,152-token vocab (smollm2-135m's);
- a real LoRA step of the whole smollm2-135m (30 layers, fp32, checkpointing, batch 2 x 128): the RSS high-water of
  each phase over the RSS where it began (phases cut where memfit's trace cuts them: at the lm_head and at the
  last layer's gradient), next to the trace's own peak for that phase;
- a tied embedding's two gradients (the head's and the lookup's) summed by the autograd engine: full fine-tuning of
  qwen2.5-0.5b cut to 4 layers (its 151,936 x 896 embedding is 519 MB in fp32), fp32, 2 x 256, with memfit's chunked
  loss and with the full logits: each phase's RSS high-water over the RSS where the step began, next to the trace's
  peak (memfit.estimate.trace._accumulate_in_place says what the engine adds in place).

    python benchmarks/head_transient.py [--write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

MB = 1024**2
VOCAB = 49152
STEP_CASE = dict(method="lora", dtype="fp32", batch_size=2, seq_len=128)
TIED_CASE = dict(method="full", dtype="fp32", batch_size=2, seq_len=256)


def logsumexp_rows() -> list[dict]:
    import torch

    from memfit.estimate.measure import _reset_peak_rss
    from memfit.guard.sampler import peak_rss_bytes, rss_bytes
    from memfit.train.chunked_loss import _exp_in_place

    rows = []
    for tokens in (256, 512, 1024):
        logits = torch.randn(tokens, VOCAB)
        highs, in_place_highs = [], []
        for _ in range(3):
            _reset_peak_rss()
            before = rss_bytes()
            torch.logsumexp(logits, dim=-1)
            highs.append(peak_rss_bytes() - before)
            scratch = logits.clone()  # the in-place form consumes its input
            _reset_peak_rss()
            before = rss_bytes()
            _exp_in_place(scratch)
            in_place_highs.append(peak_rss_bytes() - before)
            del scratch
        rows.append(dict(tokens=tokens, input_bytes=logits.numel() * 4, high_bytes=min(highs),
                         in_place_high_bytes=min(in_place_highs)))
        del logits
    return rows


def step_rows(model_dir: Path, case: dict) -> list[dict]:
    """The 3rd step's phases measured in a fresh child (memfit.estimate.measure.phase_rises), beside the trace's
    peak of each phase for the same configuration."""
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate import cuts
    from memfit.estimate.memory import arch_info, resolve_dtypes
    from memfit.estimate.measure import phase_rises_in_child

    config = TrainConfig(**case)
    measured = phase_rises_in_child(model_dir, case, steps=3)
    hf_config = AutoConfig.from_pretrained(model_dir)
    traced = cuts.traced_peaks(hf_config, arch_info(hf_config), config, resolve_dtypes(config.dtype, "cpu"),
                               config.batch_size)
    return [dict(row, traced_bytes=traced[row["phase"]].total) for row in measured]


def markdown(lse: list[dict], step: list[dict]) -> str:
    lines = [
        "### What the trace does not see at the loss head",
        "",
        "Measured with `python benchmarks/head_transient.py --write`. Over a tokens × 49,152 fp32 tensor (one chunk's "
        "logits): the RSS high-water of one call over its input's size, for `torch.logsumexp` (what the chunked loss "
        "called before) and for the loss's own form now, which exponentiates the logits in their buffer "
        "(`memfit.train.chunked_loss._exp_in_place`).",
        "",
        "| tokens | input MB | torch.logsumexp MB | in place MB |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {row['tokens']} | {row['input_bytes'] / MB:,.0f} | {row['high_bytes'] / MB:,.0f} | "
              f"{row['in_place_high_bytes'] / MB:,.0f} |" for row in lse]
    lines += [
        "",
        "A real step of the whole smollm2-135m, LoRA fp32, checkpointing, batch 2 × 128 (3rd step): each phase's RSS "
        "high-water over the RSS it began at, and the trace's peak for that phase (everything it holds, gradients "
        "included, some of which was already there when the phase began).",
        "",
        "| phase | measured rise MB | traced peak MB |",
        "|---|---:|---:|",
    ]
    lines += [f"| {row['phase']} | {row['rise_bytes'] / MB:,.0f} | {row['traced_bytes'] / MB:,.0f} |"
              for row in step]
    return "\n".join(lines) + "\n"


def tied_markdown(by_loss: dict[str, list[dict]]) -> str:
    lines = [
        "",
        "Full fine-tuning with a tied embedding: qwen2.5-0.5b cut to 4 layers (its 151,936 × 896 embedding: 519 MB in "
        "fp32), fp32, 2 × 256 (3rd step). Each phase's RSS high-water over the RSS where the step began, and the "
        "trace's peak for that phase. In the backward phase the autograd engine sums the head's and the lookup's "
        "gradients of the embedding: in place into the head's when that is a fresh tensor (memfit's chunked loss), "
        "out of place when it is a view (the full logits' transposed matmul); the trace follows "
        "(`memfit.estimate.trace._accumulate_in_place`).",
        "",
        "| loss | phase | measured over the step's start MB | traced peak MB |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {loss} | {row['phase']} | {row['over_step_bytes'] / MB:,.0f} | {row['traced_bytes'] / MB:,.0f} |"
              for loss, rows in by_loss.items() for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    from memfit.allocator import configure
    from memfit.models import init_model

    configure()
    lse = logsumexp_rows()
    with tempfile.TemporaryDirectory() as scratch:
        step = step_rows(Path(init_model("smollm2-135m", Path(scratch) / "smol30")), STEP_CASE)
        qwen = Path(init_model("qwen2.5-0.5b", Path(scratch) / "qwen4", num_layers=4))
        tied = {loss: step_rows(qwen, dict(TIED_CASE, chunked_loss=chunked))
                for loss, chunked in (("chunked", True), ("full logits", False))}
    table = markdown(lse, step) + tied_markdown(tied)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from estimate_accuracy import publish

    publish(table, "head-transient", args.write)


if __name__ == "__main__":
    main()
