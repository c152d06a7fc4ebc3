"""`memfit estimate --engine mlx`, `probe --engine mlx` and `recommend --device mps`: the MLX estimate against MLX's
own layout and `mx.get_peak_memory()` of real MLX steps, the probe's MLX trials, and a Mac's two engines."""

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from transformers import AutoConfig

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from memfit.config import TrainConfig  # noqa: E402
from memfit.estimate.memory import Hardware  # noqa: E402
from memfit.estimate.mlx_memory import estimate_mlx, recommended_working_set_bytes  # noqa: E402

GB = 1024**3
DEMO_DATA = str(resources.files("memfit").joinpath("data/demo.jsonl"))


def _memfit(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "memfit", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("quant", ["4", "8"])
def test_quantized_weights_are_mlx_layout_to_the_byte(tiny_model_dir, quant):
    """The estimate's weights (packed bits, a scale and a bias per 64 in the compute dtype, embeddings included)
    equal the bytes of the base's arrays after memfit's MLX loader quantized it."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from memfit.mlx.model import load_for_training

    config = TrainConfig(method="lora", quant=quant, dtype="bf16")
    loaded = load_for_training(tiny_model_dir, config)
    base = sum(value.nbytes for name, value in tree_flatten(loaded.model.parameters())
               if "lora_" not in name)
    assert any(isinstance(module, nn.QuantizedEmbedding) for _, module in loaded.model.named_modules())
    estimate = estimate_mlx(AutoConfig.from_pretrained(tiny_model_dir), config, Hardware("cpu", 16 * GB))
    assert estimate.breakdown["weights"] == base
    trainable = sum(value.size for value in loaded.trainable().values())
    assert estimate.trainable_params == trainable
    assert estimate.breakdown["adapters"] == trainable * 4  # mlx-lm's LoRA matrices are fp32


@pytest.mark.parametrize("quant", ["none", "4", "8"])
def test_load_peak_is_the_modules_done_and_one_more(smol_model_dir, quant):
    """smollm2-135m's shapes cut to 4 layers, stored in fp32 and trained in bf16 (a cast at load, and a quantization
    under --quant), in a fresh child: the load's mx.get_peak_memory() equals loading_bytes to 1%. Read in one
    mx.eval, as mlx_lm.load does, every stored tensor was live beside its cast (what the last line rules out);
    memfit reads one module at a time (memfit.mlx.model.evaluate_by_module)."""
    from memfit.estimate.mlx_memory import loading_bytes
    from memfit.mlx.measure import measure_in_child
    from memfit.models.arch import arch_info

    case = dict(method="lora", quant=quant, dtype="bf16", batch_size=1, seq_len=32, grad_checkpointing=False)
    measured = measure_in_child(smol_model_dir, case, steps=1)["load_peak_bytes"]
    info, config = arch_info(AutoConfig.from_pretrained(smol_model_dir)), TrainConfig(**case)
    estimated = loading_bytes(info, config, dtype_bytes=2, stored_bytes=4)
    assert abs(estimated - measured) <= 0.01 * measured, (estimated, measured)
    assert measured < info.params * (4 + 2)  # never the whole base as stored and as cast at once


def test_an_untied_head_loads_before_the_layers(tmp_path):
    """smollm2-135m's shapes cut to 2 layers with an untied head (as Llama-3.1-8B's), 4-bit: the head is read
    second, after the embeddings, not last on top of everything else, and the load's peak is the estimate's."""
    from memfit.estimate.mlx_memory import loading_bytes
    from memfit.mlx.measure import measure_in_child
    from memfit.models import init_model
    from memfit.models.arch import arch_info

    model_dir = init_model("smollm2-135m", tmp_path / "untied", num_layers=2, dtype="bf16",
                           overrides={"tie_word_embeddings": False})
    case = dict(method="lora", quant="4", dtype="bf16", batch_size=1, seq_len=32, grad_checkpointing=False)
    measured = measure_in_child(model_dir, case, steps=0)
    info, config = arch_info(AutoConfig.from_pretrained(model_dir)), TrainConfig(**case)
    assert info.lm_head_params == info.vocab_size * info.hidden_size
    assert abs(loading_bytes(info, config, dtype_bytes=2, stored_bytes=2) - measured["load_peak_bytes"]) <= (
        0.01 * measured["load_peak_bytes"])
    head_as_stored = info.lm_head_params * 2
    # Read last, the bf16 head would sit on top of the whole quantized model.
    assert measured["load_peak_bytes"] < measured["after_load_active_bytes"] + head_as_stored


# The trainer's default chunked loss and the full logits (--no-chunked-loss): the estimate follows the one it runs.
CASES = [
    # 4 x 256: sixteen chunks of 64 (Liger's rule on a 2,048 vocabulary, 128 wide).
    ("tiny_model_dir", dict(method="lora", dtype="fp32", batch_size=4, seq_len=256, grad_checkpointing=False,
                            chunked_loss=True)),
    # The full logits with checkpointing where the head and a recomputed layer are about the same size, 4-bit base:
    # -21.6% before peak_parts counted a share of the smaller side (OVERLAP), -10.9% with it, -6.5% with the fit of
    # seven shapes (benchmarks/derive_mlx_constants.py, 2026-12-04).
    ("tiny_model_dir", dict(method="lora", quant="4", dtype="bf16", batch_size=2, seq_len=256,
                            grad_checkpointing=True, chunked_loss=False)),
    # The whole smollm2-135m with the full logits. Its chunked steps at 4 x 256 took 255 s of the suite's 20 minutes
    # (CI, 2 cores, 2026-12-03); the tiny cases above cover the chunked head.
    ("smol_model_dir", dict(method="lora", dtype="bf16", batch_size=1, seq_len=256, grad_checkpointing=True,
                            chunked_loss=False)),
    # Adapters on some linears, in the last layers (memfit.estimate.mlx_memory.layer_saves): +23% (q_proj and v_proj)
    # on the tiny model cut to 3 layers, 8 x 128 fp32, before the estimate counted what the adapted linears keep
    # (2026-12-06). down_proj alone in bf16 in the last 2 layers is benchmarks/estimate_accuracy.py's case: -8.7%,
    # +17.8% before a one-layer term of the adapted linears' widths (`lora_cast`, since dropped) summed them, -12.2%
    # after the refit on the ordered checkpoint's runs, +6.2% since the adapters' inputs count in fp32.
    ("tiny_model_dir", dict(method="lora", dtype="fp32", batch_size=8, seq_len=128, grad_checkpointing=False,
                            chunked_loss=False, lora_targets="q_proj,v_proj")),
    ("tiny_model_dir", dict(method="lora", dtype="bf16", batch_size=4, seq_len=256, grad_checkpointing=False,
                            chunked_loss=True, lora_targets="q_proj,v_proj", lora_layers=2)),
]


def test_chunked_estimate_drops_the_logits_it_no_longer_holds():
    """smollm2-135m at 4 x 512 tokens, no checkpointing: the chunked loss cuts the head into chunks of 32 tokens,
    and the estimate with it is below the full-logits one by the difference of the fitted head terms, a large share
    of the full logits' (arithmetic: no MLX step runs). An estimate that ignored the chunked loss would not drop."""
    from memfit.estimate.mlx_memory import HEAD_TERMS, Shape, constants, term_bytes
    from memfit.models.arch import arch_info
    from memfit.models.registry import get_architecture

    hf_config = get_architecture("smollm2-135m").to_hf_config()
    coefficients = constants()["coefficients"]
    estimates, logits = {}, {}
    for chunked in (False, True):
        config = TrainConfig(method="lora", dtype="bf16", batch_size=4, seq_len=512, grad_checkpointing=False,
                             chunked_loss=chunked)
        estimates[chunked] = estimate_mlx(hf_config, config, Hardware("cpu", 64 * GB))
        terms = term_bytes(Shape.of(arch_info(hf_config)), 4, 512, False, 2, chunked)
        logits[chunked] = sum(coefficients[name] * terms[name] for name in HEAD_TERMS)
        assert estimates[chunked].breakdown["logits"] == int(logits[chunked])
    vocab = hf_config.vocab_size
    assert terms["head_chunked"] == 32 * vocab * 4  # the first chunk: MLX_MIN_CHUNK_TOKENS' 32 of the 2048
    assert terms["head_chunked_rest"] == (2048 - 32) * vocab * 4 and terms["head"] == 0
    assert terms["head_chunked_checkpointed"] == terms["head_chunked_rest_checkpointed"] == 0  # no checkpointing
    saved = estimates[False].mlx_peak_bytes - estimates[True].mlx_peak_bytes
    assert abs(saved - (logits[False] - logits[True])) <= 2
    assert saved > 0.05 * logits[False]  # 62% with the fitted head terms (mlx_constants.json, 2026-12-04)
    for key in ("weights", "adapters", "gradients", "optimizer", "activations", "runtime"):
        assert estimates[False].breakdown[key] == estimates[True].breakdown[key]  # only the head differs
    assert any("chunked loss" in note for note in estimates[True].notes)
    assert not any("chunked loss" in note for note in estimates[False].notes)


def test_fewer_chunks_than_mlx_min_chunks_are_estimated_with_the_plain_head():
    """smollm2-135m with checkpointing: 1 x 128 tokens make 4 chunks of 32, fewer than MLX_MIN_CHUNKS, which the
    trainer runs through the plain head (memfit.mlx.loss), so the estimate with --chunked-loss is the full-logits
    one; 2 x 128 and 1 x 256 make 8 chunks, and the chunked estimate is lower (arithmetic: no MLX step runs)."""
    from memfit.models.registry import get_architecture
    from memfit.train.chunk_size import MLX_MIN_CHUNKS

    assert MLX_MIN_CHUNKS == 8
    hf_config = get_architecture("smollm2-135m").to_hf_config()
    peaks = {}
    for batch, seq in ((1, 128), (2, 128), (1, 256)):
        for chunked in (False, True):
            config = TrainConfig(method="lora", dtype="bf16", batch_size=batch, seq_len=seq, grad_checkpointing=True,
                                 chunked_loss=chunked)
            estimate = estimate_mlx(hf_config, config, Hardware("cpu", 64 * GB))
            peaks[batch, seq, chunked] = estimate.mlx_peak_bytes
            whole = batch * seq < 256
            assert any("tokens at a time" in note for note in estimate.notes) == (chunked and not whole)
            assert any("the head runs whole" in note for note in estimate.notes) == (chunked and whole)
    assert peaks[1, 128, True] == peaks[1, 128, False]
    assert peaks[2, 128, True] < peaks[2, 128, False] and peaks[1, 256, True] < peaks[1, 256, False]


def test_the_shipped_coefficients_are_the_scripts_fit_of_its_recorded_runs():
    """mlx_constants.json's coefficients (the overlap share included) are what benchmarks/derive_mlx_constants.py
    fits on the runs the file records (`--refit`, measuring nothing): no coefficient was set by hand."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from derive_mlx_constants import errors_with, fit, fitted_rows, held_out_rows, recorded_rows

    from memfit.estimate.mlx_memory import _CONSTANTS_PATH, OVERLAP, constants

    rows = recorded_rows(_CONSTANTS_PATH)
    coefficients, errors = fit(fitted_rows(rows))
    shipped = constants()
    assert coefficients == shipped["coefficients"] and OVERLAP in coefficients
    assert round(max(map(abs, errors)), 2) == shipped["fit"]["worst_error_percent"]
    # The held-out deep shape is recorded, not fitted, and its errors are the shipped coefficients' on its runs.
    held = held_out_rows(rows)
    assert len(held) == shipped["held_out"]["runs"] > 0 and len(fitted_rows(rows)) == shipped["fit"]["runs"]
    assert [round(error, 2) for error in errors_with(held, coefficients)] == shipped["held_out"]["errors_percent"]


def test_every_recorded_run_carries_the_shipped_coefficients_error():
    """recorded_errors pairs each run mlx_constants.json records with its error: recomputed from the run's terms
    (benchmarks/derive_mlx_constants.py's errors_with), the fitted and the held-out runs alike."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from derive_mlx_constants import errors_with, recorded_rows

    from memfit.estimate.mlx_memory import _CONSTANTS_PATH, constants, recorded_errors

    shipped = constants()
    paired = recorded_errors(shipped)
    rows = recorded_rows(_CONSTANTS_PATH)
    assert [run["shape"] for run, _ in paired] == [row["shape"] for row in rows]
    recomputed = errors_with(rows, shipped["coefficients"])
    assert [error for _, error in paired] == pytest.approx(recomputed, abs=0.006)


def test_estimate_says_how_far_over_it_measured_runs_of_its_kind_went(tiny_model_dir):
    """Each MLX estimate names the worst under-estimate among the recorded runs of its checkpointing and loss at a
    similar batch, and that figure is the recorded runs' own."""
    from memfit.estimate.mlx_memory import constants, recorded_errors, worst_under

    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    for checkpointing in (True, False):
        config = TrainConfig(method="lora", batch_size=64, seq_len=256, chunked_loss=True,
                             grad_checkpointing=checkpointing)
        error, tokens = worst_under(constants(), checkpointing, True, 64 * 256)
        runs = [err for run, err in recorded_errors(constants()) if run["grad_checkpointing"] == checkpointing
                and run["chunked_loss"] and run["batch_size"] * run["seq_len"] == 16384]
        assert tokens == 16384 and error == min(runs) < -5  # what the note is for: -10.1% and -8.2% on 2026-12-06
        estimate = estimate_mlx(hf_config, config, Hardware("cpu", 16 * GB))
        notes = " ".join(estimate.notes)
        assert f"were up to {-error:.0f}% under the measured need" in notes and "16,384 tokens" in notes
        assert estimate.extra_json()["recorded_worst_under"] == {"percent": error, "tokens": 16384}
        assert "memfit probe --engine mlx" in notes
    # A batch between the recorded sizes takes the runs within a factor of 2 of it: 1,024 tokens, 512 to 2,048.
    error, tokens = worst_under(constants(), True, True, 1024)
    assert 512 <= tokens <= 2048


def test_the_recorded_runs_are_the_scripts_runs_and_probe_sized_ones_among_them():
    """Every run mlx_constants.json records is one benchmarks/derive_mlx_constants.py's `cases` makes (so
    `--missing` measures exactly the runs added since), and the fit includes batches of the size a probe tries
    (16,384 tokens), both losses, with and without checkpointing, on every shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from derive_mlx_constants import SHAPES, cases

    from memfit.estimate.mlx_memory import constants

    runs = constants()["runs"]
    keys = ("method", "dtype", "batch_size", "seq_len", "grad_checkpointing", "chunked_loss")
    for run in runs:
        assert {key: run[key] for key in keys} in cases(run["shape"]), run
    from memfit.train.chunk_size import mlx_chunks

    for shape, values in SHAPES.items():
        large = {(run["grad_checkpointing"], run["chunked_loss"]) for run in runs
                 if run["shape"] == shape and run["batch_size"] * run["seq_len"] >= 16384}
        # Shape d (vocabulary 1,024, hidden 192) makes fewer than MLX_MIN_CHUNKS chunks even there: the plain head.
        chunks = bool(mlx_chunks(16384, values["vocab_size"], values["hidden_size"]))
        assert large == {(False, False), (True, False)} | ({(False, True), (True, True)} if chunks else set()), shape
    assert sum(run["chunked_loss"] for run in runs) >= 60


@pytest.mark.parametrize("fixture, case", CASES)
def test_mlx_estimate_within_10_percent_of_mlx_peak(request, fixture, case):
    """Slow (10-120 s a case on 2 loaded cores): 2 steps of memfit's MLX trainer in a fresh child under a 1-byte MLX
    memory limit, its mx.get_peak_memory() (the step's need: memfit.estimate.mlx_memory says why) against the
    estimate's. Neither shape is one the coefficients were fitted on (benchmarks/derive_mlx_constants.py)."""
    from memfit.mlx.measure import measure_in_child

    model_dir = request.getfixturevalue(fixture)
    measured = measure_in_child(model_dir, case, steps=2, memory_limit_bytes=1)["peak_bytes"]
    estimate = estimate_mlx(AutoConfig.from_pretrained(model_dir), TrainConfig(**case), Hardware("cpu", 16 * GB))
    error = (estimate.mlx_peak_bytes - measured) / measured
    # Under by at most 10% (an under-estimate is a run that dies), over by at most 15% (a batch left unused): the
    # whole smollm2-135m with the full logits is over (+13.7% against its need, 2026-12-05: at 30 layers MLX's
    # order holds less at the head than the fit's 1-8-layer shapes; docs/mlx.md), +9.2% since the adapters'
    # gradients are not counted where the backward starts (2026-12-06), -1.5% with the ordered checkpoint (whose
    # backward pass keeps the plain head's logits live: its need rose 446.6 -> 491.5 MB) and the refit.
    assert -0.10 <= error <= 0.15, (f"estimate {estimate.mlx_peak_bytes / 2**20:.1f} MB vs measured "
                                    f"{measured / 2**20:.1f} MB: {error:+.1%}")


def test_a_layer_keeps_what_its_adapters_and_the_layers_below_need():
    """memfit.estimate.mlx_memory.layer_saves, arithmetic: every linear adapted with something trained below keeps
    the whole unit of each term; a layer below every adapter keeps nothing; an adapter on down_proj alone in the
    lowest adapted layer keeps only its input (a third of the MLP values: T x i of 3 x T x i)."""
    from memfit.estimate.mlx_memory import ALL_ROLES, config_counts, layer_counts, layer_saves
    from memfit.models.arch import arch_info
    from memfit.models.registry import get_architecture

    assert layer_saves(ALL_ROLES, True, 128, 64) == (1.0, 1.0, 1.0)
    assert layer_saves(frozenset({"mlp_out"}), False, 128, 64) == (0.0, 1 / 3, 0.0)
    hidden, mlp, attention = layer_saves(frozenset({"attention_in"}), False, 128, 64)  # q_proj, v_proj, lowest
    assert (hidden, mlp, attention) == ((3 * 128 + 2 * 64) / (6 * 128 + 2 * 64), 2 / 3, 1.0)  # norm 1, r, q k v
    counts = layer_counts(3, [frozenset(), frozenset(), ALL_ROLES], False, 128, 64)
    assert counts == layer_counts(1, [ALL_ROLES], False, 128, 64) and counts.stored == 1
    info = arch_info(get_architecture("tiny").to_hf_config())  # 4 layers
    last_two = config_counts(info, TrainConfig(method="lora", lora_layers=2))
    assert last_two.stored == 2 and last_two.attention == 2.0
    full = config_counts(info, TrainConfig(method="full"))  # the embeddings train: every layer keeps its input
    assert full.hidden == full.mlp == full.attention == 4.0


@pytest.fixture(scope="module")
def tiny_cuts(tmp_path_factory):
    """The tiny model cut to 3 layers and to 1."""
    from memfit.models import init_model

    root = tmp_path_factory.mktemp("cuts")
    return {layers: init_model("tiny", root / f"tiny{layers}", num_layers=layers) for layers in (1, 3)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layers_below_every_adapter_hold_nothing(tiny_cuts, dtype):
    """A real MLX step (fresh children, need under a 1-byte limit, no checkpointing): the 3-layer cut adapting its
    last layer (--lora-layers 1) holds the activations of the 1-layer cut (MLX's value_and_grad computes no
    cotangent no trained parameter needs), where keeping the two layers below would add about 70% (67.2 against
    39.7 MB in fp32 with every layer adapted: benchmarks/mlx_adapters.py). Within 10%: a case's need is not the same
    in every run (39.71 and 39.19 MB for the 1-layer cut in fp32, 17.43 and 15.83 for a bf16 one, 2026-12-06,
    under load; memfit.mlx.measure). The estimate says the same to 1% (arithmetic), and is within this module's
    bounds of the need. Before the estimate counted the adapted layers only it put the fp32 case 77% over (and the
    fp32 one with checkpointing 14%: benchmarks/mlx_adapters.py)."""
    from memfit.estimate.mlx_memory import TERMS
    from memfit.mlx.measure import measure_in_child

    case = dict(method="lora", dtype=dtype, batch_size=8, seq_len=128, grad_checkpointing=False, chunked_loss=False)
    activations, estimated = {}, {}
    for layers, lora_layers in ((3, 1), (1, None)):
        config = TrainConfig(**case, lora_layers=lora_layers)
        hf_config = AutoConfig.from_pretrained(tiny_cuts[layers])
        measured = measure_in_child(tiny_cuts[layers], config.model_dump(include=set(case) | {"lora_layers"}),
                                    steps=2, memory_limit_bytes=1)["train_peak_bytes"]
        exact = estimate_mlx(hf_config, config, Hardware("cpu", 16 * GB),
                             coefficients={name: 0.0 for name in TERMS}).mlx_peak_bytes
        estimate = estimate_mlx(hf_config, config, Hardware("cpu", 16 * GB))
        activations[layers] = measured - exact
        estimated[layers] = estimate.breakdown["activations"] + estimate.breakdown["logits"]
        error = (estimate.mlx_peak_bytes - measured) / measured
        assert -0.10 <= error <= 0.15, (layers, estimate.mlx_peak_bytes, measured)
    assert abs(activations[3] - activations[1]) <= 0.10 * activations[1], activations
    assert abs(estimated[3] - estimated[1]) <= 0.01 * estimated[1], estimated


def test_adapted_inputs_count_in_fp32_in_a_bf16_step(tiny_model_dir, tiny_cuts):
    """mlx-lm's LoRALinear keeps A in fp32, so a bf16 step's x @ A promotes x and A's gradient keeps the fp32 copy
    (memfit.estimate.mlx_memory.input_widths). A real MLX step's need (fresh children, 1-byte limit, 1 x 512, no
    checkpointing, the full logits, every linear adapted) on the tiny model and its 1-layer cut: three layers more
    hold well over half in bf16 of what they hold in fp32 (10.97 and 6.97 MB a layer from 4 to 8 layers, by hand,
    2026-12-06: 0.64x), and the estimate's three layers are within 10% of the measured ones in both dtypes. With
    every term in the compute dtype (the form before `adapter_inputs_cast` and `hidden_backward`) the fp32 layers
    were 17% over (5.4 MB of 31.3, run at 847379a)."""
    from memfit.estimate.mlx_memory import TERMS
    from memfit.mlx.measure import measure_in_child

    case = dict(method="lora", batch_size=1, seq_len=512, grad_checkpointing=False, chunked_loss=False)
    measured, estimated = {}, {}
    for dtype in ("fp32", "bf16"):
        for layers, model_dir in ((4, tiny_model_dir), (1, tiny_cuts[1])):
            config = TrainConfig(**case, dtype=dtype)
            hf_config = AutoConfig.from_pretrained(model_dir)
            need = measure_in_child(model_dir, config.model_dump(include=set(case) | {"dtype"}), steps=2,
                                    memory_limit_bytes=1)["train_peak_bytes"]
            exact = estimate_mlx(hf_config, config, Hardware("cpu", 16 * GB),
                                 coefficients={name: 0.0 for name in TERMS}).mlx_peak_bytes
            measured[dtype, layers] = need - exact
            estimated[dtype, layers] = estimate_mlx(hf_config, config, Hardware("cpu", 16 * GB)).mlx_peak_bytes - exact
    three = {dtype: measured[dtype, 4] - measured[dtype, 1] for dtype in ("fp32", "bf16")}
    assert three["bf16"] > 0.55 * three["fp32"], three
    for dtype in ("fp32", "bf16"):
        estimate = estimated[dtype, 4] - estimated[dtype, 1]
        assert abs(estimate - three[dtype]) <= 0.10 * three[dtype], (dtype, estimate, three[dtype])


def test_estimate_engine_mlx_json(tiny_model_dir):
    completed = _memfit("estimate", "--engine", "mlx", "--model", str(tiny_model_dir), "--device", "mps",
                        "--memory-gb", "16", "--quant", "4", "--method", "lora", "--json")
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)
    assert data["engine"] == "mlx"
    assert data["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert data["unified_memory_bytes"] == 16 * GB
    assert data["device_memory_bytes"] == recommended_working_set_bytes(16 * GB) == int(16 * GB * 2 / 3)
    assert data["mlx_peak_bytes"] == data["total_bytes"] - data["breakdown"]["runtime"]
    assert data["fits"] and data["max_batch_size"] >= 1


@pytest.mark.parametrize("extra, words", [
    (["--device", "cuda"], "--engine mlx runs on a Mac's GPU or a CPU"),
    (["--num-gpus", "2"], "one process on one device"),
    (["--optimizer", "adamw8bit"], "adamw8bit does not run on the MLX engine"),
    (["--engine", "jax"], "unknown --engine"),
])
def test_estimate_engine_mlx_bad_input_is_one_line(tiny_model_dir, extra, words):
    argv = ["estimate", "--model", str(tiny_model_dir), "--memory-gb", "8", *extra]
    if "--engine" not in extra:
        argv += ["--engine", "mlx"]
    completed = _memfit(*argv)
    assert completed.returncode == 2
    assert words in completed.stderr and "Traceback" not in completed.stderr


def test_largest_batch_is_the_last_that_fits(tiny_model_dir):
    from memfit.estimate.mlx_memory import max_batch_mlx

    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = TrainConfig(method="lora", seq_len=256)
    hardware = Hardware("cpu", 2 * GB)
    batch = max_batch_mlx(hf_config, config, hardware)
    assert batch > 1
    assert estimate_mlx(hf_config, config, hardware, batch_size=batch).fits
    assert not estimate_mlx(hf_config, config, hardware, batch_size=batch + 1).fits


def test_largest_batch_when_batch_two_estimates_below_batch_one(monkeypatch):
    """At 1 x 128 the step runs the plain head (too few tokens to chunk), at 2 x 128 the chunked loss: batch 2's
    estimate is below batch 1's. The search must not take that for a flat curve and walk from the limit down (it
    did: 63,724 estimates, 40 s for smollm2-135m); it settles in a few dozen and lands on the last batch that fits."""
    from memfit.models import ARCHITECTURES
    from memfit.estimate import mlx_memory

    hf_config = ARCHITECTURES["smollm2-135m"].to_hf_config()
    config = TrainConfig(method="lora", seq_len=128, dtype="bf16")
    hardware = Hardware("cpu", 20 * GB)
    one = estimate_mlx(hf_config, config, hardware, batch_size=1).total_bytes
    two = estimate_mlx(hf_config, config, hardware, batch_size=2).total_bytes
    assert two < one  # the case itself
    calls = []
    real = mlx_memory.estimate_mlx

    def counted(*args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlx_memory, "estimate_mlx", counted)
    batch = mlx_memory.max_batch_mlx(hf_config, config, hardware)
    monkeypatch.undo()
    assert len(calls) < 100
    assert estimate_mlx(hf_config, config, hardware, batch_size=batch).fits
    assert not estimate_mlx(hf_config, config, hardware, batch_size=batch + 1).fits


def test_recommend_mps_names_both_engines_within_the_working_set(capsys, recommend_calls):
    from memfit.cli import main

    code = main(["recommend", "--device", "mps", "--memory-gb", "64", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code in (0, None)
    assert data["unified_memory_bytes"] == 64 * GB
    assert data["usable_bytes"] == int(64 * GB * 3 / 4)  # above 36 GB: three quarters
    assert set(data["engines"]) == {"torch", "mlx"}
    # Both engines are judged against the GPU's working set, not the Mac's RAM.
    assert recommend_calls[-1][1].device == "mps" and recommend_calls[-1][1].memory_bytes == data["usable_bytes"]
    assert data["engines"]["mlx"]["memory_bytes"] == data["usable_bytes"]
    assert "bitsandbytes" in data["support"]["torch"] and "--quant 4|8" in data["support"]["mlx"]
    mlx_rows = {row["model"]: row["methods"] for row in data["engines"]["mlx"]["models"]}
    # The seeds' Llama-3.1-8B QLoRA fits a 64 GB Mac on MLX; a 70B in 16-bit LoRA does not.
    assert mlx_rows["llama-3.1-8b"]["qlora"]["fits"]
    assert not mlx_rows["llama-3.1-70b"]["lora"]["fits"]
    # MLX's 4-bit base (0.5 byte + two 16-bit values per 64 weights) is smaller than its 16-bit one.
    assert mlx_rows["llama-3.1-8b"]["qlora"]["total_bytes"] < mlx_rows["llama-3.1-8b"]["lora"]["total_bytes"]
    code = main(["recommend", "--device", "mps", "--memory-gb", "16", "--engine", "mlx", "--method", "qlora"])
    out = capsys.readouterr().out
    assert code in (0, None)
    assert "mlx · what fits in 10.67 GB" in out and "torch ·" not in out  # 2/3 of 16 GB up to 36 GB
    assert "bitsandbytes" not in out.split("mlx ·")[0]


def test_probe_engine_mlx_runs_mlx_trials(tiny_model_dir, tmp_path):
    """Slow (about a minute): the probe's trials train with memfit.mlx in child processes; the batch they find is
    saved in the profile, marked as the MLX engine's."""
    import os

    env = {**os.environ, "MEMFIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "memfit", "probe", "--engine", "mlx", "--model", str(tiny_model_dir), "--data",
         DEMO_DATA, "--device", "cpu", "--seq-len", "128", "--steps", "3", "--max-batch", "4", "--max-memory", "8",
         "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    data = json.loads(completed.stdout)
    assert data["setup"]["engine"] == "mlx"
    assert data["chosen"]["batch_size"] == 4
    # Each trial's spec said mlx: its peak is what the MLX guard watches (memfit.probe.trial._classify).
    assert data["trials"] and all(trial["peak_source"] == "peak_rss or MLX peak" for trial in data["trials"])
    assert all(trial["status"] == "fits" and trial["steps_done"] == 3 for trial in data["trials"])
