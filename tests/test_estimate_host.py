"""Host RAM of a run on GPUs (memfit.estimate.host): the arithmetic of each phase, the estimate's JSON and table, and
the load figure against a real load measured on the CPU (loading takes the same path there: `from_pretrained` in host
memory, before the weights would move to the GPU)."""

import pytest
from transformers import AutoConfig

from memfit.config import TrainConfig
from memfit.estimate.host import CUDA_HOST_RUNTIME_BYTES, HostInputs, host_figures, host_inputs, host_peak
from memfit.estimate.measure import measure_in_child
from memfit.estimate.memory import CPU_BITSANDBYTES_IMPORT_BYTES, GB, Hardware, arch_info, resolve_dtypes
from memfit.models.registry import get_architecture

MB = 1024**2


def inputs(**changes) -> HostInputs:
    values = dict(baseline_bytes=2 * GB, checkpoint_bytes=16 * GB, converted_bytes=0, trained_bytes=1 * GB,
                  gathered_optimizer_bytes=0, offload_bytes=0, ranks=1)
    return HostInputs(**{**values, **changes})


def test_one_gpu_loading_a_checkpoint_in_its_own_dtype_peaks_at_its_file_pages():
    peak = host_peak(inputs())
    assert peak.phases == {"load": 18 * GB, "train": 2 * GB, "save": 3 * GB}
    assert (peak.peak_phase, peak.peak_bytes, peak.machine_peak_bytes) == ("load", 18 * GB, 18 * GB)


def test_a_converted_checkpoint_adds_its_copy_and_each_rank_loads_its_own():
    peak = host_peak(inputs(converted_bytes=32 * GB, ranks=8))
    assert peak.phases["load"] == 2 * GB + 16 * GB + 32 * GB  # one process: what --max-host-memory compares
    # The machine: eight baselines and eight converted copies, the file's pages once (one page cache).
    assert peak.machine_phases["load"] == 8 * (2 * GB + 32 * GB) + 16 * GB
    assert any("8 ranks on one machine" in note for note in peak.notes)


def test_saving_under_fsdp_gathers_the_full_state_on_rank_zero_and_offload_stays_in_host_ram():
    peak = host_peak(inputs(checkpoint_bytes=2 * GB, trained_bytes=32 * GB, gathered_optimizer_bytes=64 * GB,
                            offload_bytes=40 * GB, ranks=4))
    assert peak.phases["train"] == 2 * GB + 10 * GB  # a quarter of the offloaded states per rank
    assert peak.phases["save"] == 12 * GB + 32 * GB + 64 * GB
    assert peak.peak_phase == "save"
    assert peak.machine_phases["save"] == 4 * 2 * GB + 40 * GB + 96 * GB


def test_the_figures_of_an_8b_model_on_cuda_from_its_config():
    hf_config = get_architecture("llama-3.1-8b").to_hf_config()
    info = arch_info(hf_config)
    lora = TrainConfig(method="lora", dtype="bf16", seq_len=2048)
    full = TrainConfig(method="full", dtype="bf16", seq_len=2048)
    qlora = TrainConfig(method="qlora", dtype="bf16", seq_len=2048)
    cuda = Hardware("cuda", 80 * GB)
    precision = resolve_dtypes("bf16", "cuda")
    lora_peak = host_figures(info, lora, precision, cuda, hf_config)
    # bf16 checkpoint loaded as bf16: the mapping alone, no copy (8.03B params x 2 bytes = 16 GB of file pages).
    checkpoint = info.params * 2
    baseline = host_inputs(info, lora, precision, cuda, hf_config, 0).baseline_bytes
    assert lora_peak.phases["load"] == baseline + checkpoint
    assert lora_peak.peak_phase == "load" and lora_peak.merge_bytes > checkpoint
    # A 4-bit base goes to the GPU tensor by tensor from the same mapping: no copy either (bitsandbytes' import more).
    assert host_figures(info, qlora, precision, cuda, hf_config).phases["load"] == \
        lora_peak.phases["load"] + CPU_BITSANDBYTES_IMPORT_BYTES
    full_peak = host_figures(info, full, precision, cuda, hf_config)
    # Mixed precision: fp32 trained weights, all of them in host memory at once while the checkpoint is written.
    assert full_peak.phases["save"] - full_peak.phases["train"] == info.params * 4
    # Loading them is higher still: the bf16 file's pages and the fp32 copy made from them, both resident.
    assert full_peak.phases["load"] == full_peak.phases["train"] + info.params * (2 + 4)
    assert full_peak.peak_phase == "load" and full_peak.merge_bytes == 0
    assert host_figures(info, lora, precision, Hardware("cpu", 80 * GB), hf_config) is None


@pytest.mark.parametrize("dtype, converted", [("fp32", True), ("bf16", False)])
def test_the_load_figure_against_a_measured_load(qwen_bf16_model_dir, dtype, converted):
    """Slow (a child loads the model and trains one step): a bf16 checkpoint loaded for fp32 LoRA (converted on the
    way in) and for bf16 LoRA (the mapping itself). The child reads every weight once after loading, as `.to("cuda")`
    does from the mapping (memfit.estimate.measure.read_every_weight): without that read a CPU load of a bf16 file for
    bf16 touches none of its pages (measured 383 MB against 705 MB, the file's 272 MB of pages never resident), while
    on the way to a GPU every page is read. The CPU part of the host load figure (without CUDA's host share, which
    only a GPU adds) against the child's peak RSS while loading."""
    case = dict(method="lora", dtype=dtype, batch_size=1, seq_len=64)
    measured = measure_in_child(qwen_bf16_model_dir, case, steps=1, read_weights=True)["load_peak_rss_bytes"]
    hf_config = AutoConfig.from_pretrained(qwen_bf16_model_dir)
    host = host_inputs(arch_info(hf_config), TrainConfig(**case), resolve_dtypes(dtype, "cpu"),
                       Hardware("cuda", 80 * GB), hf_config, 0)
    assert (host.converted_bytes > 0) == converted
    figure = host_peak(host).phases["load"] - CUDA_HOST_RUNTIME_BYTES
    error = (figure - measured) / measured
    print(f"host load {dtype}: estimate {figure / MB:.0f} MB, measured {measured / MB:.0f} MB ({error:+.1%})")
    assert abs(error) <= 0.15, f"estimate {figure / MB:.0f} MB vs measured {measured / MB:.0f} MB ({error:+.1%})"


def test_estimate_json_and_table_show_the_host_figures_on_cuda_only(capsys):
    import json

    from memfit.cli import main

    assert main(["estimate", "--model", "llama-3.1-8b", "--device", "cuda", "--memory-gb", "80", "--num-gpus", "4",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host_peak_phase"] == "load" and set(data["host_phases"]) == {"load", "train", "save"}
    assert data["host_peak_bytes"] == data["host_phases"]["load"] > data["params"] * 2  # the bf16 file's pages
    assert data["host_machine_peak_bytes"] > data["host_peak_bytes"]  # four ranks' baselines
    assert data["host_merge_bytes"] > data["params"] * 2  # LoRA (the default): PEFT's merge on the CPU, reported beside
    assert main(["estimate", "--model", "llama-3.1-8b", "--device", "cpu", "--memory-gb", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["host_peak_bytes"] is None and data["host_phases"] is None
    assert main(["estimate", "--model", "llama-3.1-8b", "--device", "cuda", "--memory-gb", "80"]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "host RAM: peak" in table and "(load) per process" in table and "save" in table
