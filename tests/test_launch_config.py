"""Engines and `memfit launch-config`: the DeepSpeed JSON and FSDP settings follow the TrainConfig, accelerate's own
launcher reads the YAML into the engine memfit builds itself, impossible combinations are one line and exit 2."""

import json
import shlex
import sys

import pytest
import torch

from memfit.cli import main
from memfit.config import TrainConfig
from memfit.distributed import engines, launch
from memfit.precision import resolve_precision

ENGINE_CASES = [  # (--distributed, --offload)
    ("ddp", "none"), ("fsdp", "none"), ("fsdp", "cpu"), ("zero1", "none"), ("zero1", "cpu"), ("zero2", "none"),
    ("zero2", "cpu"), ("zero3", "none"), ("zero3", "cpu"),
]


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- the DeepSpeed JSON -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distributed, offload", [case for case in ENGINE_CASES if case[0].startswith("zero")])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_deepspeed_config_follows_the_train_config(distributed, offload, dtype):
    config = TrainConfig(distributed=distributed, offload=offload, dtype=dtype, batch_size=3, grad_accum=5,
                         max_grad_norm=0.7)
    ds = engines.deepspeed_config(config, resolve_precision(dtype, "cuda"), world_size=16)
    stage = int(distributed[-1])
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 16
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is (dtype == "bf16") and ds["fp16"]["enabled"] is (dtype == "fp16")
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") is (offload == "cpu")
    assert (zero.get("offload_param", {}).get("device") == "cpu") is (offload == "cpu" and stage == 3)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    # memfit's own optimizer steps on the offloaded partitions: DeepSpeed must not insist on its CPU Adam.
    assert ds.get("zero_force_ds_cpu_optimizer", True) is (offload != "cpu")
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("distributed, offload", [case for case in ENGINE_CASES if case[0].startswith("zero")])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_deepspeed_reads_the_json_as_written(distributed, offload, dtype):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = TrainConfig(distributed=distributed, offload=offload, dtype=dtype, batch_size=2, grad_accum=4,
                         max_grad_norm=0.5)
    ds = engines.deepspeed_config(config, resolve_precision(dtype, "cuda"), world_size=1)
    parsed = DeepSpeedConfig(ds)  # no process group here: DeepSpeed checks the batch terms for one rank
    stage = int(distributed[-1])
    assert parsed.zero_optimization_stage == stage
    offloaded = parsed.zero_config.offload_optimizer
    assert (offloaded is not None and offloaded.device == "cpu") is (offload == "cpu")
    params = parsed.zero_config.offload_param
    assert (params is not None and params.device == "cpu") is (offload == "cpu" and stage == 3)
    assert parsed.zero_config.gather_16bit_weights_on_model_save is (stage == 3)
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 4
    assert parsed.train_batch_size == 8
    assert parsed.gradient_clipping == 0.5
    assert parsed.bfloat16_config.enabled is (dtype == "bf16") and parsed.float16_config.enabled is (dtype == "fp16")
    assert parsed.zero_force_ds_cpu_optimizer is (offload != "cpu")


# --- the Accelerator's plugins ------------------------------------------------------------------------------------


def test_accelerator_kwargs_build_each_engines_plugin(tiny_model_dir, monkeypatch):
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    from transformers import AutoConfig

    # The FSDP plugin exports the loading mode it is given for transformers: keep that inside the test.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    # DeepSpeed's plugin is plain accelerate: only training with it needs deepspeed (checked in its own test).
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    assert engines.accelerator_kwargs(TrainConfig(distributed="ddp"), "cuda", world_size=4) == {}
    assert engines.accelerator_kwargs(TrainConfig(), "cpu", world_size=4) == {}
    assert engines.accelerator_kwargs(TrainConfig(distributed="fsdp"), "cuda", world_size=1) == {}

    fsdp = engines.accelerator_kwargs(TrainConfig(distributed="fsdp", offload="cpu", dtype="bf16"), "cuda",
                                      model_config, world_size=4)["fsdp_plugin"]
    assert isinstance(fsdp, FullyShardedDataParallelPlugin)
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True
    assert isinstance(fsdp.cpu_offload, CPUOffloadPolicy)
    assert fsdp.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert fsdp.state_dict_type.name == "SHARDED_STATE_DICT"
    policy = fsdp.mixed_precision_policy
    assert isinstance(policy, MixedPrecisionPolicy)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    pure = engines.accelerator_kwargs(TrainConfig(distributed="fsdp", dtype="bf16-pure"), "cuda",
                                      world_size=2)["fsdp_plugin"]
    assert pure.mixed_precision_policy is None and type(pure.cpu_offload).__name__ == "OffloadPolicy"

    config = TrainConfig(distributed="zero3", offload="cpu", dtype="bf16", batch_size=2, grad_accum=3)
    zero = engines.accelerator_kwargs(config, "cuda", world_size=4)["deepspeed_plugin"]
    assert isinstance(zero, DeepSpeedPlugin)
    assert zero.zero_stage == 3 and zero.zero3_init_flag
    assert zero.offload_optimizer_device == "cpu" and zero.offload_param_device == "cpu"
    assert zero.gradient_accumulation_steps == 3
    assert zero.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    zero1 = engines.accelerator_kwargs(TrainConfig(distributed="zero1"), "cuda", world_size=2)["deepspeed_plugin"]
    assert zero1.zero_stage == 1 and not zero1.zero3_init_flag and zero1.offload_optimizer_device == "none"


def test_qlora_storage_is_the_compute_dtype_only_where_weights_are_sharded():
    bf16 = resolve_precision("bf16", "cuda")
    for distributed, sharded in [("ddp", False), ("zero2", False), ("zero3", True), ("fsdp", True)]:
        config = TrainConfig(method="qlora", distributed=distributed)
        assert engines.quant_storage_dtype(config, bf16) == (torch.bfloat16 if sharded else torch.uint8)
    assert engines.quant_storage_dtype(TrainConfig(method="lora", distributed="fsdp"), bf16) == torch.uint8


# --- launch-config: the files, accelerate's loader and launcher ---------------------------------------------------


def _launcher_env(yaml_path, monkeypatch):
    """Run accelerate's own `accelerate launch` argument handling on the YAML (no process is started) and put the
    variables it gives the workers into this process's environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "-m", "memfit", "train"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(name, value)
    return args, env


@pytest.mark.parametrize("distributed, offload", ENGINE_CASES)
@pytest.mark.parametrize("machines", [1, 2])
def test_launch_config_is_read_by_accelerate_as_memfit_trains(distributed, offload, machines, tmp_path, capsys,
                                                              monkeypatch, tiny_model_dir):
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)  # memfit's plugin, built here without it
    out = tmp_path / "launch"
    topology = ["--num-processes", 4, "--num-machines", machines]
    if machines > 1:
        topology += ["--main-process-ip", "10.1.2.3", "--main-process-port", 29555, "--machine-rank", 1]
    flags = ["--distributed", distributed, "--offload", offload, "--batch-size", 2, "--grad-accum", 3,
             "--max-grad-norm", 0.25, "--dtype", "bf16", "--lora-rank", 8]
    code, stdout, err = run_cli(capsys, "launch-config", "--model", tiny_model_dir, *flags, *topology, "--out", out,
                                "--json")
    assert code == 0, err
    result = json.loads(stdout)
    yaml_path = out / "accelerate.yaml"
    assert result["files"]["accelerate_yaml"] == str(yaml_path)

    loaded = load_config_from_file(str(yaml_path))
    assert isinstance(loaded, ClusterConfig)
    engine = engines.engine_name(TrainConfig(distributed=distributed))
    assert loaded.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[engine]
    assert loaded.num_processes == 4 * machines and loaded.num_machines == machines
    if machines > 1:
        assert loaded.main_process_ip == "10.1.2.3" and loaded.main_process_port == 29555
        assert loaded.machine_rank == 1

    args, env = _launcher_env(yaml_path, monkeypatch)
    assert int(args.nproc_per_node) == 4
    if machines > 1:
        assert int(args.nnodes) == 2 and args.rdzv_endpoint == "10.1.2.3:29555"

    # The plugin accelerate would build from the launcher's variables, and the one memfit builds from its flags.
    config = TrainConfig(distributed=distributed, offload=offload, batch_size=2, grad_accum=3, max_grad_norm=0.25,
                         dtype="bf16", lora_rank=8)
    from transformers import AutoConfig

    ours = engines.accelerator_kwargs(config, "cuda", AutoConfig.from_pretrained(tiny_model_dir),
                                      world_size=4 * machines)
    if engine == "ddp":
        assert ours == {} and "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
        assert loaded.mixed_precision == "bf16"
    elif engine == "fsdp":
        theirs, mine = FullyShardedDataParallelPlugin(), ours["fsdp_plugin"]
        for name in ("fsdp_version", "reshard_after_forward", "cpu_offload", "state_dict_type",
                     "transformer_cls_names_to_wrap", "cpu_ram_efficient_loading", "activation_checkpointing"):
            assert getattr(theirs, name) == getattr(mine, name), name
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    else:
        written = json.loads((out / "deepspeed.json").read_text())
        assert written == result["deepspeed_config"]
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(out / "deepspeed.json")
        theirs, mine = DeepSpeedPlugin(), ours["deepspeed_plugin"]  # theirs reads the JSON file
        assert theirs.deepspeed_config == mine.deepspeed_config
        assert theirs.zero3_init_flag == mine.zero3_init_flag == (distributed == "zero3")
        assert mine.deepspeed_config["train_batch_size"] == 2 * 3 * 4 * machines
        assert mine.deepspeed_config["gradient_clipping"] == 0.25

    commands = result["commands"]
    for kind in ("accelerate", "torchrun"):
        parts = shlex.split(commands[kind])
        train_args = parts[parts.index("train") + 1:]
        assert parts[parts.index("train") - 2:parts.index("train")] == ["-m", "memfit"]
        for flag, value in zip(flags[::2], flags[1::2]):
            assert train_args[train_args.index(flag) + 1] == str(value), (kind, flag)
        assert train_args[train_args.index("--model") + 1] == str(tiny_model_dir)
    torchrun = shlex.split(commands["torchrun"])
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "4"
    accelerate = shlex.split(commands["accelerate"])
    assert accelerate[accelerate.index("--config_file") + 1] == str(yaml_path)
    if machines > 1:
        assert torchrun[torchrun.index("--nnodes") + 1] == "2"
        assert torchrun[torchrun.index("--master-addr") + 1] == "10.1.2.3"
        assert "--node-rank" in torchrun and "--machine_rank" in accelerate


def test_launch_config_prints_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "launch-config", "--distributed", "zero2", "--num-processes", 8)
    assert code == 0, err
    assert "distributed_type: DEEPSPEED" in out and '"stage": 2' in out
    assert "accelerate launch --config_file accelerate.yaml -m memfit train" in out
    assert "torchrun --nproc-per-node 8 -m memfit train --model MODEL" in out
    assert list(tmp_path.iterdir()) == []


def test_launch_config_file_out_puts_the_json_beside_it(tmp_path, capsys):
    target = tmp_path / "cluster" / "zero3.yaml"
    code, _, err = run_cli(capsys, "launch-config", "--distributed", "zero3", "--num-processes", 2, "--out", target)
    assert code == 0, err
    import yaml

    data = yaml.safe_load(target.read_text())
    assert data["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "cluster" / "zero3.deepspeed.json")
    assert "mixed_precision" not in data  # with a DeepSpeed JSON, accelerate refuses a precision of its own
    assert json.loads((tmp_path / "cluster" / "zero3.deepspeed.json").read_text())["zero_optimization"]["stage"] == 3


# --- bad combinations: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--distributed", "ddp", "--offload", "cpu"], "--offload cpu needs a sharding engine"),
    (["--offload", "cpu"], "--offload cpu needs a sharding engine"),
    (["--distributed", "zero3", "--method", "qlora", "--quant", "8"], "--quant 8 cannot be sharded"),
    (["--distributed", "fsdp", "--method", "lora", "--quant", "8"], "--quant 8 cannot be sharded"),
    (["--distributed", "zero2", "--offload", "cpu", "--optimizer", "adamw8bit"], "adamw8bit with --offload cpu"),
    (["--distributed", "fsdp", "--num-machines", "2"], "--main-process-ip"),
    (["--distributed", "fsdp", "--num-machines", "2", "--main-process-ip", "h", "--machine-rank", "2"],
     "--machine-rank must be 0..1"),
    (["--distributed", "zero1", "--num-processes", "0"], "--num-processes must be >= 1"),
    (["--distributed", "fsdp", "--num-processes", "1", "--offload", "cpu"], "needs several processes"),
    (["--distributed", "zero9"], "unknown --distributed 'zero9'"),
])
def test_launch_config_bad_combinations(argv, fragment, tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = run_cli(capsys, "launch-config", "--num-processes", 4, *argv, "--out", out)
    assert code == 2 and stdout == ""
    assert fragment in one_error_line(err)
    assert not out.exists()


@pytest.fixture
def train_job(tiny_model_dir, tmp_path, monkeypatch):
    """A train command line that must stop before the model loads: loading it fails the test."""
    import memfit.train.model

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the engine check")

    monkeypatch.setattr(memfit.train.model, "load_model", must_not_load)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {index} of the test data"}) + "\n" for index in range(8)))
    out = tmp_path / "run"
    return ["train", "--model", tiny_model_dir, "--data", data, "--output-dir", out, "--max-steps", 1], out


def test_train_zero2_without_deepspeed_stops_before_the_model(train_job, capsys, monkeypatch):
    argv, out = train_job
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an install without the extra looks like
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    code, _, err = run_cli(capsys, *argv, "--device", "cuda", "--distributed", "zero2")
    assert code == 2
    line = one_error_line(err)
    assert "needs DeepSpeed" in line and "pip install 'memfit[deepspeed]'" in line
    assert not out.exists()


@pytest.mark.parametrize("flags, world, fragment", [
    (["--distributed", "zero2"], "1", "trains on CUDA GPUs only, not on cpu"),
    (["--distributed", "fsdp", "--offload", "cpu"], "2", "--offload cpu on CPU processes"),
    (["--distributed", "ddp", "--offload", "cpu"], "1", "--offload cpu needs a sharding engine"),
])
def test_train_refuses_engines_this_machine_cannot_run(flags, world, fragment, train_job, capsys, monkeypatch):
    argv, out = train_job
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", world)
    code, _, err = run_cli(capsys, *argv, "--device", "cpu", *flags)
    assert code == 2
    assert fragment in one_error_line(err)
    assert not out.exists()


def test_train_refuses_a_launcher_set_up_for_another_engine(train_job, capsys, monkeypatch):
    argv, out = train_job
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, _, err = run_cli(capsys, *argv, "--device", "cpu", "--distributed", "ddp")
    assert code == 2
    assert "accelerate config for DEEPSPEED" in one_error_line(err)
    assert not out.exists()


# --- the estimator: FSDP counts as full sharding ------------------------------------------------------------------


def test_estimate_fsdp_is_full_sharding_in_its_own_layout(capsys):
    def estimate(*flags):
        code, out, err = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--method", "full", "--device",
                                 "cuda", "--memory-gb", 80, "--num-gpus", 8, "--seq-len", 512, "--no-calibrate",
                                 "--json", *flags)
        assert code == 0, err
        return json.loads(out)

    fsdp, zero3 = estimate("--distributed", "fsdp"), estimate("--distributed", "zero3")
    assert fsdp["zero"] == 3 and fsdp["engine"] == "fsdp" and zero3["engine"] == "deepspeed"
    params = fsdp["params"]
    # Mixed-precision AdamW: FSDP keeps fp32 sharded weights + fp32 gradients + m, v (4 + 4 + 8 bytes / param / 8);
    # DeepSpeed bf16 weights and gradients + fp32 master, m, v in the optimizer (2 + 2 + 12): 16 bytes either way.
    static = ("weights", "gradients", "optimizer")
    assert fsdp["breakdown"]["optimizer"] == pytest.approx(8 * params / 8, rel=0.01)
    assert zero3["breakdown"]["optimizer"] == pytest.approx(12 * params / 8, rel=0.01)
    assert sum(fsdp["breakdown"][name] for name in static) == pytest.approx(
        sum(zero3["breakdown"][name] for name in static), rel=0.001)
    offloaded = estimate("--distributed", "fsdp", "--offload", "cpu")
    assert offloaded["breakdown"]["optimizer"] == 0 and offloaded["breakdown"]["gradients"] == 0
    assert offloaded["host_offload_bytes"] >= 16 * params * 0.99  # all of it, on the 8 ranks' host RAM
    code, _, err = run_cli(capsys, "estimate", "--model", "llama-3.1-8b", "--device", "cuda", "--memory-gb", 80,
                           "--num-gpus", 8, "--distributed", "fsdp", "--zero", 2)
    assert code == 2 and "FSDP shards fully" in one_error_line(err)


def test_estimated_sharding_of_each_engine():
    """What `memfit estimate` and a run's per-rank estimate count for --distributed (an explicit --zero wins)."""
    assert engines.estimated_sharding(TrainConfig(distributed="zero2")) == (2, "deepspeed")
    assert engines.estimated_sharding(TrainConfig(distributed="zero2"), zero=1) == (1, "deepspeed")
    assert engines.estimated_sharding(TrainConfig(distributed="fsdp")) == (3, "fsdp")
    assert engines.estimated_sharding(TrainConfig(distributed="ddp")) == (0, "deepspeed")
    assert engines.estimated_sharding(TrainConfig(distributed="auto"), zero=3) == (3, "deepspeed")
