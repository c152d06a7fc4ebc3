"""Two pieces of a decoder layer, as transformers computes them and as memfit does: attention over packed rows
(transformers' sdpa with its block-diagonal mask, memfit.models.attention.sdpa_by_segment) and RMSNorm
(LlamaRMSNorm, memfit.train.rms_norm). Forward + backward, one thread, memfit's allocator policy (as training
runs), the two ways alternating for --repeats rounds of --iterations calls each.

    python benchmarks/layer_kernels.py [--repeats 5] [--iterations 20] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import write_section  # noqa: E402
from train_vs_hf import cpu_name, versions  # noqa: E402

MARK = "layer-kernels"
# (name, heads, kv heads, rows, documents per row): smollm2-135m's and qwen2.5-0.5b's attention, rows of 512 tokens
# as the head-to-head trains them (benchmarks/train_vs_hf.py: 2 rows for smollm2, 1 for qwen2.5), holding documents
# of the lengths packed plain text gives there.
ATTENTION = (("smollm2-135m", 9, 3, 2, (200, 180, 132)), ("qwen2.5-0.5b", 14, 2, 1, (200, 180, 132)),
             ("smollm2-135m, one document per row", 9, 3, 2, (512,)))
HEAD_DIM = 64
NORMS = (("smollm2-135m", 1024, 576, "fp32"), ("qwen2.5-0.5b", 512, 896, "fp32"), ("smollm2-135m", 1024, 576, "bf16"))


def attention_cases(torch, transformers):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    from memfit.models.attention import sdpa_by_segment, segment_bounds

    for name, heads, kv_heads, rows, documents in ATTENTION:
        length = sum(documents)
        config = transformers.LlamaConfig(hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                                          num_key_value_heads=kv_heads, head_dim=HEAD_DIM)
        config._attn_implementation = "sdpa"
        positions = torch.cat([torch.arange(n) for n in documents]).repeat(rows, 1)
        mask = create_causal_mask(config=config, inputs_embeds=torch.empty(rows, length, 1), attention_mask=None,
                                  cache=None, position_ids=positions)
        module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()
        generator = torch.Generator().manual_seed(0)
        tensors = [torch.randn(rows, length, n, HEAD_DIM, generator=generator).transpose(1, 2)
                   for n in (heads, kv_heads, kv_heads)]
        grad = torch.randn(rows, length, heads, HEAD_DIM, generator=generator)
        bounds = segment_bounds(positions)

        # Defaults bind this case's module, mask and bounds: the cases are all built before any runs.
        def masked(q, k, v, module=module, mask=mask):
            return sdpa_attention_forward(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5)[0]

        def by_segment(q, k, v, module=module, mask=mask, bounds=bounds):
            return sdpa_by_segment(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5, cu_seq_lens_q=bounds)[0]

        label = f"attention, {name}: {rows} × {length} tokens, documents {' + '.join(map(str, documents))}"
        yield label, ("transformers' sdpa, block mask", masked), ("memfit, by segment", by_segment), tensors, grad


def norm_cases(torch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from memfit.train.rms_norm import fuse_rms_norms

    for name, tokens, width, dtype_name in NORMS:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        plain, fused = LlamaRMSNorm(width).to(dtype), LlamaRMSNorm(width).to(dtype)
        for norm in (plain, fused):
            norm.weight.requires_grad_(False)  # LoRA: the norm's weight is frozen
        fuse_rms_norms(torch.nn.Sequential(fused))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, width, generator=generator).to(dtype)
        label = f"RMSNorm, {name}: {tokens} × {width} {dtype_name}, frozen weight"
        yield label, ("transformers' LlamaRMSNorm", plain), ("memfit, fused", fused), [x], torch.ones_like(x)


def time_calls(torch, function, tensors, grad, iterations: int) -> float:
    """Milliseconds per forward + backward."""
    inputs = [t.detach().requires_grad_() for t in tensors]
    started = time.perf_counter()
    for _ in range(iterations):
        function(*inputs).backward(grad)
    return (time.perf_counter() - started) / iterations * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import torch
    import transformers

    from memfit import allocator

    torch.set_num_threads(1)
    policy = allocator.configure()
    rows = []
    for label, (name_a, a), (name_b, b), tensors, grad in [*attention_cases(torch, transformers), *norm_cases(torch)]:
        for function in (a, b):
            time_calls(torch, function, tensors, grad, 3)  # warm-up: the first calls set kernels up
        times = {name_a: [], name_b: []}
        for _ in range(args.repeats):
            for name, function in ((name_a, a), (name_b, b)):
                times[name].append(time_calls(torch, function, tensors, grad, args.iterations))
        ratio = statistics.median(times[name_b]) / statistics.median(times[name_a])
        rows.append((label, name_a, times[name_a], name_b, times[name_b], ratio))
        print(f"{label}: {statistics.median(times[name_a]):.2f} -> {statistics.median(times[name_b]):.2f} ms",
              flush=True)

    def spread(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [
        "## Attention over packed rows and RMSNorm: transformers' and memfit's",
        "",
        f"Measured with `python benchmarks/layer_kernels.py --repeats {args.repeats} --iterations {args.iterations} "
        f"--write` on {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, {cpu_name()}; "
        f"{versions()}. Forward + backward of one call, one thread, allocator policy `{policy.policy}` (memfit's, "
        f"as training runs it), the two ways alternating; ms per call, median (min–max) of {args.repeats} rounds "
        f"of {args.iterations} calls. Attention: head dim {HEAD_DIM}, fp32, the mask transformers builds from the "
        "packed rows' position ids (`create_causal_mask`), against memfit's SDPA on each document alone "
        "(`memfit.models.attention.sdpa_by_segment`). RMSNorm: `LlamaRMSNorm` against `memfit.train.rms_norm`.",
        "",
        "| case | transformers ms | memfit ms | memfit ÷ transformers |",
        "|---|---:|---:|---:|",
    ]
    for label, _, times_a, _, times_b, ratio in rows:
        lines.append(f"| {label} | {spread(times_a)} | {spread(times_b)} | {ratio:.2f}× |")
    lines.append("")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(HERE.parent / "docs" / "benchmarks.md", MARK, body)


if __name__ == "__main__":
    main()
