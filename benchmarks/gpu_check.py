"""The whole CUDA verification of memfit as one command: estimate vs the three counters, the guard's stop and exact
resume, an out-of-memory recovered, probe, and memfit vs HF Trainer + PEFT. No downloads: every model is a random
init of a real architecture's shapes (memfit.models.init_model).

    python benchmarks/gpu_check.py                       # on CUDA, ~8 minutes on one GPU; prints the sections
    python benchmarks/gpu_check.py --write               # ... and writes them into docs/benchmarks.md
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check.md   # the same code on CPU (tests)

Sections (each a `<!-- gpu-check-NAME-DEVICE -->` section of the output file, and all results in OUT.json):
1. estimate: for each case, `estimate_memory`'s three figures against the counters of 3 real training steps in a fresh
   child (memfit.estimate.measure): `allocated_peak_bytes` vs `torch.cuda.max_memory_allocated`,
   `reserved_peak_bytes` vs `max_memory_reserved`, `process_bytes` vs NVML's memory for the process (what nvidia-smi
   shows; needs pynvml, the `nvidia` extra), and the CUDA context NVML shows beyond reserved. On CPU the one counter
   is the child's peak RSS (VmHWM). Cases: llama-3.2-1b, qwen2.5-0.5b, smollm2-135m and a tiny MoE (qwen3-moe
   shapes cut to 2 layers); full bf16, LoRA bf16, QLoRA 4-bit in both layouts; checkpointing on/off; two lengths.
2. guard: a clean run, then the same run with memory rising inside step 3's forward pass (MEMFIT_FAULTS
   leak_forward, on the device) against a --max-memory limit: exit 3, a checkpoint at step 2, and `--resume` must
   give the clean run's losses bit for bit (CUDA RNG included: LoRA dropout is on).
3. oom: a real allocator failure in step 3 (MEMFIT_FAULTS oom@3: torch.OutOfMemoryError on CUDA) recovered by
   halving the micro-batch, the run finished with the clean run's tokens and losses within 1e-4.
4. probe: `memfit probe --json` on the device: the trials' peaks and the batch it recommends.
5. vs-hf: `memfit train` against HF Trainer + PEFT (this file's --hf-child) on the same rows: tokens/s and peak, one
   LoRA and one QLoRA case (the QLoRA case on CUDA only).

Not yet run on a GPU (none has been lent to memfit): the CUDA paths are written against torch's and NVML's APIs and
the 8-minute figure is a plan, not a measurement. The CPU run checks everything but the CUDA counters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from estimate_accuracy import _cpu_name, write_section  # noqa: E402

MB = 1024**2
GB = 1024**3
PY = sys.executable
DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))

# (name, preset, init_model kwargs): whole models on CUDA, the tiny llama on CPU.
MOE_CUT = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32,
               num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=2048,
               tie_word_embeddings=False)
CUDA_MODELS = {
    "smollm2-135m": dict(preset="smollm2-135m"),
    "qwen2.5-0.5b": dict(preset="qwen2.5-0.5b"),
    "llama-3.2-1b": dict(preset="llama-3.2-1b", force=True),
    "qwen3-moe (2 layers, 32 experts)": dict(preset="qwen3-30b-a3b", num_layers=2, overrides=MOE_CUT),
}
CPU_MODELS = {"tiny": dict(preset="tiny")}


def cuda_cases(quick: bool) -> list[tuple[str, dict]]:
    """On smollm2-135m every method with checkpointing on and off at 512 tokens, and on at 2048; the other models
    full, LoRA and QLoRA at 1024 tokens with checkpointing on."""
    methods = [dict(method="full", dtype="bf16"), dict(method="lora", dtype="bf16"),
               dict(method="qlora", dtype="bf16", qlora_upcast=False),
               dict(method="qlora", dtype="bf16", qlora_upcast=True)]
    cases = []
    for seq_len, checkpointing in ((512, True), (512, False)) + (() if quick else ((2048, True),)):
        cases += [("smollm2-135m", dict(**m, batch_size=4, seq_len=seq_len, grad_checkpointing=checkpointing))
                  for m in methods]
    for model in list(CUDA_MODELS)[1:2] if quick else list(CUDA_MODELS)[1:]:
        cases += [(model, dict(**m, batch_size=4, seq_len=1024, grad_checkpointing=True)) for m in methods[:3]]
    return cases


def cpu_cases(quick: bool) -> list[tuple[str, dict]]:
    cases = [("tiny", dict(method="qlora", dtype="fp32", batch_size=2, seq_len=64))]
    if not quick:
        cases += [("tiny", dict(method="lora", dtype="fp32", batch_size=2, seq_len=64)),
                  ("tiny", dict(method="full", dtype="fp32", batch_size=2, seq_len=128, grad_checkpointing=False)),
                  ("tiny", dict(method="lora", dtype="fp32", batch_size=4, seq_len=128, grad_checkpointing=False))]
    return cases


# memfit's cache for every child: the scratch directory's, never the user's (a probe profile there would calibrate
# the user's estimates with these random-init models). Set by main.
CACHE: dict[str, str] = {}


def env(fault: str | None = None) -> dict:
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "TRANSFORMERS_VERBOSITY": "error", **CACHE}
    values.pop("MEMFIT_FAULTS", None)
    if fault:
        values["MEMFIT_FAULTS"] = fault
    return values


def run(command: list[str], fault: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(fault))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def build_models(names: list[str], device: str, scratch: Path) -> dict[str, Path]:
    from memfit.models import init_model

    specs = CUDA_MODELS if device == "cuda" else CPU_MODELS
    dirs = {}
    for name in names:
        spec = dict(specs[name])
        preset = spec.pop("preset")
        dirs[name] = init_model(preset, scratch / name.split()[0], dtype="bf16" if device == "cuda" else "fp32",
                                **spec)
    return dirs


# ------------------------------------------------------------------------------------------------------ 1. estimate

def check_estimate(device: str, quick: bool, models: dict[str, Path]) -> list[dict]:
    from transformers import AutoConfig

    from memfit.config import TrainConfig
    from memfit.estimate.measure import measure_in_child
    from memfit.estimate.memory import Hardware, estimate_memory

    rows = []
    for name, case in cuda_cases(quick) if device == "cuda" else cpu_cases(quick):
        estimate = estimate_memory(AutoConfig.from_pretrained(models[name]), TrainConfig(**case),
                                   Hardware(device, 1 << 40))
        started = time.time()
        measured = measure_in_child(models[name], case, steps=3, device=device, env=CACHE)
        if device == "cuda":
            counters = dict(allocated=measured["max_memory_allocated_bytes"],
                            reserved=measured["max_memory_reserved_bytes"],
                            process=measured.get("nvml_process_bytes"))
            context = measured.get("cuda_context_bytes")
        else:
            counters = dict(allocated=None, reserved=None, process=measured["peak_rss_bytes"])
            context = None
        figures = dict(allocated=estimate.allocated_peak_bytes, reserved=estimate.reserved_peak_bytes,
                       process=estimate.process_bytes)
        errors = {key: None if counters[key] is None else (figures[key] - counters[key]) / counters[key] * 100
                  for key in figures}
        rows.append(dict(model=name, case=case, estimate=figures, measured=counters, error=errors,
                         cuda_context_bytes=context, seconds=round(time.time() - started, 1)))
        shown = "  ".join(f"{key} {figures[key] / MB:,.0f}/{'-' if counters[key] is None else f'{counters[key] / MB:,.0f}'}"
                          for key in figures)
        print(f"estimate  {name:24s} {case}  est/measured MB: {shown}", flush=True)
    return rows


def estimate_markdown(rows: list[dict], device: str) -> str:
    def mb(value):
        return "—" if value is None else f"{value / MB:,.0f}"

    def pct(value):
        return "—" if value is None else f"{value:+.1f}%"

    worst = {key: max((abs(r["error"][key]) for r in rows if r["error"][key] is not None), default=None)
             for key in ("allocated", "reserved", "process")}
    lines = [f"Estimate vs the counters, {len(rows)} cases (worst error: " + ", ".join(
        f"{key} {pct(value)}" for key, value in worst.items() if value is not None) + "). Each case: 3 training "
        "steps in a fresh child (`memfit.estimate.measure`, random full-length rows). "
        + ("allocated = `torch.cuda.max_memory_allocated`, reserved = `max_memory_reserved`, process = NVML's memory "
           "for the process (nvidia-smi), context = process − reserved at the end."
           if device == "cuda" else "On CPU the one counter is the child's peak RSS (VmHWM), against `process_bytes`."),
        "", "| model | method | dtype | batch × seq | grad ckpt | upcast | allocated est / meas MB | error | "
        "reserved est / meas MB | error | process est / meas MB | error | context MB |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    from memfit.config import TrainConfig

    for r in rows:
        case, config = r["case"], TrainConfig(**r["case"])
        e, m, err = r["estimate"], r["measured"], r["error"]
        upcast = "yes" if config.quant != "none" and config.qlora_upcast else ("no" if config.quant != "none" else "")
        lines.append(f"| {r['model']} | {case['method']} | {case['dtype']} | {case['batch_size']} × {case['seq_len']} "
                     f"| {'on' if config.grad_checkpointing else 'off'} | {upcast} "
                     + " ".join(f"| {mb(e[k])} / {mb(m[k])} | {pct(err[k])}" for k in ("allocated", "reserved",
                                                                                       "process"))
                     + f" | {mb(r['cuda_context_bytes'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- 2. guard, 3. oom

def train_command(model_dir: Path, out: Path, device: str, quick: bool, *flags: str) -> list[str]:
    seq, batch = ("64", "4") if device == "cpu" else ("512", "8")
    return [PY, "-m", "memfit", "train", "--model", str(model_dir), "--data", DEMO_DATA, "--output-dir", str(out),
            "--seq-len", seq, "--batch-size", batch, "--device", device, "--no-grad-checkpointing",
            "--save-every", "100000", *flags]


def check_guard(device: str, quick: bool, model_dir: Path, scratch: Path) -> dict:
    """Stop at a limit inside step 3's forward pass, with a checkpoint; the resume redoes step 3 exactly."""
    flags = ("--max-steps", "5", "--lora-dropout", "0.1", "--lr", "0.01", "--memory-sample-interval", "0.02",
             "--seed", "0")
    straight, out = scratch / "guard-straight", scratch / "guard-stopped"
    clean = run(train_command(model_dir, straight, device, quick, *flags))
    if clean.returncode != 0:
        raise RuntimeError(f"clean run failed: {clean.stdout[-2000:]}{clean.stderr[-2000:]}")
    info = run_json(straight)
    clean_peak = max(info.get("peak_watched_bytes") or 0, info["peak_rss_bytes"] if device == "cpu" else 0)
    leak = 150 * MB
    limit = clean_peak + 1.5 * leak
    stopped = run(train_command(model_dir, out, device, quick, *flags, "--max-memory", f"{limit / GB:.4f}"),
                  fault="leak_forward@150:3")
    from memfit.train.checkpoint import open_checkpoint

    try:
        checkpoint_step = open_checkpoint(out).step
    except Exception:  # noqa: BLE001 - no checkpoint: reported as such
        checkpoint_step = None
    resumed = run([PY, "-m", "memfit", "train", "--resume", "--output-dir", str(out)])
    a = [(m["step"], m["loss"]) for m in metrics(straight)]
    b = [(m["step"], m["loss"]) for m in metrics(out)]
    result = dict(clean_peak_bytes=clean_peak, limit_bytes=int(limit), stop_exit=stopped.returncode,
                  checkpoint_step=checkpoint_step, stopped_peak_bytes=run_json(out).get("peak_watched_bytes"),
                  resume_exit=resumed.returncode, losses_equal=a == b, steps=len(b),
                  max_loss_difference=max((abs(x[1] - y[1]) for x, y in zip(a, b)), default=None))
    # The guard checks at each decoder layer's entry: the stopped run may pass the limit by one layer's leak.
    result["ok"] = (result["stop_exit"] == 3 and checkpoint_step == 2 and resumed.returncode == 0
                    and result["losses_equal"] and (result["stopped_peak_bytes"] or 0) <= limit + leak)
    print(f"guard     {result}", flush=True)
    return result


def check_oom(device: str, quick: bool, model_dir: Path, scratch: Path) -> dict:
    """The LoRA run of check_vs_hf again, with an out-of-memory in step 3: against that run, the same tokens and
    losses (float summation order aside)."""
    clean, recovered = scratch / "vs-hf-memfit-lora", scratch / "oom-recovered"
    done = run(memfit_command(model_dir, recovered, device, quick, "lora"), fault="oom@3")
    lines, reference = metrics(recovered), metrics(clean)
    losses = [m["loss"] for m in lines]
    result = dict(exit=done.returncode, recoveries=run_json(recovered).get("oom_recoveries"),
                  layout=[(m["micro_batch"], m["grad_accum"]) for m in lines],
                  same_tokens=[m["tokens"] for m in lines] == [m["tokens"] for m in reference],
                  max_relative_loss_difference=max(abs(x - y) / abs(y) for x, y in
                                                   zip(losses, [m["loss"] for m in reference])))
    result["ok"] = (done.returncode == 0 and result["recoveries"] == 1 and result["same_tokens"]
                    and result["layout"][2][0] * 2 == result["layout"][0][0]
                    and result["max_relative_loss_difference"] <= 1e-4)
    print(f"oom       {result}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------------- 4. probe

def check_probe(device: str, quick: bool, model_dir: Path) -> dict:
    seq, top, steps = ("64", "2", "2") if device == "cpu" else ("512", "64", "5")
    started = time.time()
    done = run([PY, "-m", "memfit", "probe", "--model", str(model_dir), "--data", DEMO_DATA, "--device", device,
                "--seq-len", seq, "--max-batch", top, "--pow2", "--steps", steps, "--json", "--fresh",
                "--no-grad-checkpointing"])
    if done.returncode != 0:
        raise RuntimeError(f"probe failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    profile = json.loads(done.stdout[done.stdout.index("{"):])
    result = dict(exit=done.returncode, seconds=round(time.time() - started, 1), profile=profile)
    print(f"probe     exit {done.returncode}, {result['seconds']} s: {json.dumps(profile)[:300]}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------- 5. vs HF

def hf_child(spec_path: str) -> None:
    """HF Trainer + PEFT LoRA (or QLoRA: bitsandbytes nf4, PEFT's prepare_model_for_kbit_training) on memfit's rows.
    benchmarks/_hf_trainer_child.py is the CPU contender of train_vs_hf.py (fp32, use_cpu); this one runs on the
    device given, in bf16 there."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from memfit.data import build_dataset
    from memfit.guard.sampler import peak_rss_bytes

    cuda = spec["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    rows = [{"input_ids": r.input_ids, "labels": r.labels}
            for r in build_dataset(spec["data"], tokenizer, spec["seq_len"], packing=False).rows]
    set_seed(spec["seed"])
    kwargs = dict(dtype=torch.bfloat16 if cuda else torch.float32, local_files_only=True)
    if spec["qlora"]:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}  # quantized while loading, onto the GPU
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    if cuda and not spec["qlora"]:
        model.to("cuda")
    if spec["qlora"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.begin)

    timer = Timer()
    tokens = []

    def collate(features, inner=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)):
        batch = inner(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    args = TrainingArguments(output_dir=str(Path(spec["result"]).parent / "hf-out"), max_steps=spec["steps"],
                             per_device_train_batch_size=spec["batch_size"], learning_rate=spec["lr"],
                             lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, seed=spec["seed"],
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda,
                             bf16=cuda, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[timer]).train()
    result = dict(step_times=timer.times, tokens=tokens[:len(timer.times)], peak_rss_bytes=peak_rss_bytes())
    if cuda:
        result["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(result))


def vs_hf_settings(device: str) -> tuple[str, int, int]:
    return ("64", 4, 6) if device == "cpu" else ("512", 8, 20)  # seq, batch, steps


def memfit_command(model_dir: Path, out: Path, device: str, quick: bool, method: str) -> list[str]:
    seq, batch, steps = vs_hf_settings(device)
    flags = ["--method", method, "--max-steps", str(steps), "--lr", "1e-4", "--lora-rank", "16",
             "--lora-alpha", "32", "--lora-dropout", "0", "--no-packing", "--seed", "0"]
    if method == "qlora":
        flags.append("--qlora-upcast")  # PEFT's preparation, as the HF contender runs it
    command = train_command(model_dir, out, device, quick, *flags)
    command[command.index("--batch-size") + 1] = str(batch)
    return command


def check_vs_hf(device: str, quick: bool, model_dir: Path, scratch: Path) -> list[dict]:
    seq, batch, steps = vs_hf_settings(device)
    rows = []
    for method in ("lora", "qlora") if device == "cuda" else ("lora",):
        out = scratch / f"vs-hf-memfit-{method}"
        mine = run(memfit_command(model_dir, out, device, quick, method))
        if mine.returncode != 0:
            raise RuntimeError(f"memfit train failed: {mine.stdout[-2000:]}{mine.stderr[-2000:]}")
        lines, info = metrics(out), run_json(out)
        timed = lines[1:] or lines  # the first step warms up (kernels, allocator): left out of tokens/s
        memfit_tps = sum(m["tokens"] for m in timed) / sum(m["step_time_s"] for m in timed)
        spec = dict(device=device, model=str(model_dir), data=DEMO_DATA, seq_len=int(seq), batch_size=batch,
                    steps=steps, lr=1e-4, seed=0, qlora=method == "qlora",
                    result=str(scratch / f"vs-hf-{method}.json"))
        spec_path = scratch / f"vs-hf-{method}-spec.json"
        spec_path.write_text(json.dumps(spec))
        theirs = run([PY, str(Path(__file__).resolve()), "--hf-child", str(spec_path)])
        if theirs.returncode != 0:
            raise RuntimeError(f"HF child failed: {theirs.stderr[-3000:]}")
        hf = json.loads(Path(spec["result"]).read_text())
        hf_tps = sum(hf["tokens"][1:] or hf["tokens"]) / sum(hf["step_times"][1:] or hf["step_times"])
        memfit_peak = info.get("peak_watched_bytes") if device == "cuda" else info["peak_rss_bytes"]
        hf_peak = hf.get("max_memory_reserved_bytes") if device == "cuda" else hf["peak_rss_bytes"]
        rows.append(dict(method=method, steps=steps, seq_len=int(seq), batch_size=batch,
                         memfit_tokens_per_s=memfit_tps, hf_tokens_per_s=hf_tps,
                         memfit_peak_bytes=memfit_peak, hf_peak_bytes=hf_peak))
        print(f"vs-hf     {rows[-1]}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------- output

def header(device: str) -> str:
    import torch
    import transformers

    if device == "cuda":
        gpu = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB), " \
              f"CUDA {torch.version.cuda}"
    else:
        gpu = f"{_cpu_name()}, no GPU"
    return (f"Measured with `python benchmarks/gpu_check.py --device {device}` on {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()} {platform.system()}, {gpu}, Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}.\n\n")


def sections(results: dict, device: str) -> dict[str, str]:
    out = {}
    head = header(device)
    out["estimate"] = f"## GPU check ({device}): the estimate against the counters\n\n{head}" + estimate_markdown(
        results["estimate"], device)
    g, o = results["guard"], results["oom"]
    out["guard"] = (
        f"## GPU check ({device}): the guard, an out-of-memory, probe\n\n{head}"
        "| check | result | details |\n|---|---|---|\n"
        f"| guard stop at a limit (memory rising inside step 3's forward pass) | {'ok' if g['ok'] else 'FAILED'} | "
        f"exit {g['stop_exit']}, checkpoint at step {g['checkpoint_step']}, limit {g['limit_bytes'] / MB:,.0f} MB "
        f"(clean peak {g['clean_peak_bytes'] / MB:,.0f} MB), stopped run's peak "
        f"{(g['stopped_peak_bytes'] or 0) / MB:,.0f} MB; resume exit {g['resume_exit']}, losses "
        f"{'bit for bit' if g['losses_equal'] else 'differ by ' + str(g['max_loss_difference'])} over {g['steps']} steps |\n"
        f"| out-of-memory in step 3, recovered | {'ok' if o['ok'] else 'FAILED'} | exit {o['exit']}, "
        f"{o['recoveries']} recovery; micro-batch × accumulation per step {o['layout']}; same tokens: "
        f"{o['same_tokens']}; losses within {o['max_relative_loss_difference']:.1e} (relative) |\n"
        f"| probe | exit {results['probe']['exit']} | {results['probe']['seconds']} s; "
        f"{_probe_summary(results['probe']['profile'])} |\n")
    lines = [f"## GPU check ({device}): memfit vs HF Trainer + PEFT\n\n{head}"
             "The same rows (`build_dataset`, no packing), LoRA r16 on all linear layers, AdamW, no gradient "
             "checkpointing; QLoRA with PEFT's preparation on both sides (`--qlora-upcast`). Tokens/s over the "
             "steps after the first; peak: " + ("`max_memory_reserved`." if device == "cuda" else "peak RSS."), "",
             "| method | batch × seq | steps | memfit tokens/s | HF tokens/s | memfit peak MB | HF peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["vs_hf"]:
        lines.append(f"| {r['method']} | {r['batch_size']} × {r['seq_len']} | {r['steps']} | "
                     f"{r['memfit_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} | "
                     f"{(r['memfit_peak_bytes'] or 0) / MB:,.0f} | {(r['hf_peak_bytes'] or 0) / MB:,.0f} |")
    out["vs-hf"] = "\n".join(lines) + "\n"
    return out


def _probe_summary(profile: dict) -> str:
    chosen, trials = profile.get("chosen") or {}, profile.get("trials") or []
    tried = ", ".join(f"batch {t['settings'].get('batch_size')}: {t['status']}"
                      + (f" ({t['peak_bytes'] / MB:,.0f} MB)" if t.get("peak_bytes") else "") for t in trials)
    if not chosen:
        return f"nothing fits; trials: {tried}"
    return (f"chose batch {chosen.get('batch_size')} (peak {chosen.get('peak_bytes', 0) / MB:,.0f} MB, estimate "
            f"{chosen.get('estimate_bytes', 0) / MB:,.0f} MB) under a limit of {profile['limit_bytes'] / MB:,.0f} MB; "
            f"trials: {tried}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer cases (the tests run --device cpu --quick)")
    parser.add_argument("--out", default=None, help="write the sections into this file (and OUT.json)")
    parser.add_argument("--write", action="store_true", help="write the sections into docs/benchmarks.md")
    parser.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hf_child:
        hf_child(args.hf_child)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --device cpu --quick to check the code on CPU")
    started = time.time()
    results: dict = {"device": args.device, "quick": args.quick}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        CACHE["MEMFIT_CACHE"] = os.environ["MEMFIT_CACHE"] = str(scratch / "memfit-cache")  # this process's too
        names = (list(CUDA_MODELS)[:2] if args.quick else list(CUDA_MODELS)) if args.device == "cuda" else ["tiny"]
        timings = results["section_seconds"] = {}

        def timed(name, check, *check_args):
            began = time.time()
            results[name] = check(*check_args)
            timings[name] = round(time.time() - began, 1)

        timed("models", build_models, names, args.device, scratch)
        models = results.pop("models")
        small = models[names[0]] if args.device == "cuda" else models["tiny"]
        timed("estimate", check_estimate, args.device, args.quick, models)
        timed("guard", check_guard, args.device, args.quick, small, scratch)
        timed("vs_hf", check_vs_hf, args.device, args.quick, small, scratch)
        timed("oom", check_oom, args.device, args.quick, small, scratch)  # redoes vs_hf's LoRA run
        timed("probe", check_probe, args.device, args.quick, small)
    results["seconds"] = round(time.time() - started, 1)
    texts = sections(results, args.device)
    for text in texts.values():
        print(text, flush=True)
    targets = ([Path(args.out)] if args.out else []) + ([HERE.parent / "docs" / "benchmarks.md"] if args.write else [])
    for target in targets:
        for name, text in texts.items():
            write_section(target, f"gpu-check-{name}-{args.device}", text)
        print(f"wrote {target}")
    if args.out:  # every figure, for the tests (and for a look at what the tables round)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(f"gpu_check: {results['seconds']} s ({timings}); guard {'ok' if results['guard']['ok'] else 'FAILED'}, "
          f"oom {'ok' if results['oom']['ok'] else 'FAILED'}")
    if not (results["guard"]["ok"] and results["oom"]["ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
