"""The memory of one MLX training configuration (`memfit estimate --engine mlx`): what a step of memfit's MLX trainer
(memfit.mlx.trainer) needs of MLX's arrays, plus the process around them.

The need, not whatever peak a run reads: MLX's eval allocates each op's output when it schedules the op, up to 10
ops ahead of the ops running (mlx/transforms.cpp, MAX_ACTIVE_TASKS), and waits for the running ones first only while
its active memory is over its memory limit. With no limit in reach, what it ran ahead added 14% to 290% to the
activations of benchmarks/derive_mlx_constants.py's runs, by timing; under a limit at or above the need the step runs
within the limit plus one op's outputs (benchmarks/mlx_memory_limit.py), and memfit's MLX engine sets that limit
below the guard's warning threshold (memfit.mlx.memory.arrays_limit_bytes). So the need is what decides whether a
run fits, and what is estimated: `mx.get_peak_memory()` of the step under a 1-byte limit, where MLX waits before
every allocation (memfit.mlx.measure.run_steps), in MLX's default order (MLX_BFS_MAX_WIDTH=20, which memfit's
engine sets unless the environment has one: memfit.mlx.memory.set_eval_width). A run with no limit near its need
(mlx_lm.lora's) reads more.

Why here and not in memfit.mlx: this is arithmetic on a model config, like the rest of memfit.estimate, and must
work where MLX is not installed (planning a Mac's run from Linux, `recommend --device mps`); memfit.mlx imports mlx
at the top of most modules. Nothing here imports mlx, and memfit.mlx is never imported.

Components (bytes, one process, unified memory):
- weights: every parameter in the compute dtype; with `--quant 4|8` MLX's affine layout (mlx_lm.utils.quantize_model
  -> nn.quantize): each Linear and Embedding whose input width is a multiple of the group size (64) holds
  out x in x bits/8 bytes of packed weights plus a scale and a bias per group of 64, in the compute dtype (the model
  is cast before it is quantized: memfit.mlx.model.load_for_training). That includes the embeddings and an untied
  lm_head, as mlx_lm.convert does. Norms and biases stay in the compute dtype.
- adapters: LoRA A (in x r) and B (r x out) per adapted linear, fp32 (mlx_lm.tuner.lora.LoRALinear creates them with
  mx.random.uniform / mx.zeros, float32 whatever the model's dtype);
- gradients: one per trained parameter in its dtype (summed over micro-batches);
- optimizer: mlx.optimizers state per trained parameter in its dtype (AdamW m and v: zeros_like the parameter);
- activations and logits: the arrays the compiled value_and_grad holds at its highest point, per micro-batch of
  b rows of s tokens (T = b x s). The terms follow what the graph keeps per decoder layer: h-wide values (layer
  input, the two norm outputs, q, the attention output, the residual sum) and k and v; i-wide MLP values (gate, up
  and their product); b x H x s^2 attention scores and probabilities (MLX runs the unfused attention in training,
  on Metal and on the CPU alike: "It's faster for training on Metal to use the unfused SDPA for both forward and
  backward", ml-explore/mlx mlx/backend/metal/scaled_dot_product_attention.cpp,
  ScaledDotProductAttention::use_fallback); and the head's T x V logits in fp32 (memfit's loss upcasts them), or
  with the chunked loss (memfit.mlx.loss, the trainer's default) the chunks' (`_head_terms`). mlx-lm's
  checkpointing (mx.checkpoint around each layer) keeps each layer's input and recomputes one layer at a time, and
  the peak is then at the head or at a recomputation, not both (`peak_parts`); since MLX evaluates the lazy graph
  as a whole, how much is live at once is not simply "one layer" or "one chunk". How many of each the step holds
  at once at its peak is therefore measured, not assumed: `python benchmarks/derive_mlx_constants.py` runs real
  MLX steps on small llamas of varied width, vocabulary (1k-32k), depth (1-8 layers), tokens (128-16,384), dtype and
  loss, reads `mx.get_peak_memory()`, and fits the coefficient of each term by least squares; the coefficients,
  the fit's residuals (for each loss apart) and the command are in mlx_constants.json beside this file. Those runs
  adapt every linear of every layer at rank 16; what a step keeps depends on where the adapters are (MLX computes
  only the cotangents a trained parameter needs), so the per-layer terms count what each layer keeps for its
  adapters and the layers below (`layer_saves`, `config_counts`), each adapted linear's x @ A counts at the rank
  asked (`adapter_values`), and the adapters' gradients count where they are live (`step_peak`).
- runtime: the process around the arrays (Python, MLX, mlx-lm, the tokenizer), measured by the same script as the
  children's peak RSS less MLX's peak; on a Mac it is ordinary memory the GPU does not wire.
"""

from __future__ import annotations

import json
import math

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.estimate.memory import Estimate, Hardware
from memfit.models.arch import MLX_PLAIN_HEAD_TYPES, ArchInfo, LinearInfo, arch_info
from memfit.train.chunk_size import MLX_MIN_CHUNKS, mlx_chunk_tokens, mlx_chunks
from memfit.units import GB, format_gb

GROUP_SIZE = 64  # MLX's default affine group (mlx_lm.utils.quantize_model's defaults_for_mode["affine"])
_CONSTANTS_PATH = Path(__file__).with_name("mlx_constants.json")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Term names, in the order of the fitted coefficients (benchmarks/derive_mlx_constants.py writes them): a fixed part
# (MiB); the head's fp32 logits (the full-logits loss), or with the chunked loss (memfit.mlx.loss) the first chunk's
# and the rest of them, without and with checkpointing; the compute-dtype logits a bf16/fp16 step upcasts; per
# decoder layer the hidden-width values, the MLP-width values and the attention scores, and for a bf16/fp16 step a
# 4-byte term of the scores' size (all layers' without checkpointing); with mlx-lm's checkpointing
# the layer inputs it stores (all layers) and one layer's values as its backward recomputes them; for a bf16/fp16
# step with adapters, the fp32 copies of the adapted linears' inputs beyond their compute-dtype bytes (all trained
# layers' without checkpointing, the recomputed layer's with it: term_bytes says why); without checkpointing, one
# layer's hidden-width values more, as the backward pass enters the top layer (`hidden_backward`).
TERMS = ("fixed", "head", "head_chunked", "head_chunked_rest", "head_chunked_checkpointed",
         "head_chunked_rest_checkpointed", "head_cast", "hidden", "mlp", "attention", "attention_cast",
         "stored_checkpointed", "hidden_checkpointed", "mlp_checkpointed", "attention_checkpointed",
         "attention_cast_checkpointed", "adapter_values", "adapter_values_checkpointed", "adapter_inputs_cast",
         "adapter_inputs_cast_checkpointed", "hidden_backward")
HEAD_TERMS = ("head", "head_chunked", "head_chunked_rest", "head_chunked_checkpointed",
              "head_chunked_rest_checkpointed", "head_cast")  # the breakdown's `logits`
RECOMPUTE_TERMS = ("hidden_checkpointed", "mlp_checkpointed", "attention_checkpointed", "attention_cast_checkpointed",
                   "adapter_values_checkpointed", "adapter_inputs_cast_checkpointed")
OVERLAP = "checkpointed_overlap"  # full logits + checkpointing: the share of the smaller side also live (peak_parts)
# Counts set by what the graph holds, not fitted: mx.checkpoint keeps one array per layer, the layer's input (the
# layer before's output). Fitted, with the step's need as the target (2026-12-05), the count came out 4.2 on shapes
# of 1-8 layers, where a per-layer term also takes up what does not grow with the depth, and the 24-layer shape held
# out of the fit (benchmarks/derive_mlx_constants.py's HELD_OUT) was then estimated 34-37% over in its checkpointed
# runs; at 1 its runs are within -9.4% and +13.0% but one (-32.1%), the fitted shapes' worst residual 22.5% -> 21.0%.
# Likewise each adapted linear's x @ A (T x r, fp32 as A is), which B's gradient reads: one per adapted linear of every
# trained layer without checkpointing, of the layer recomputed with it (`adapter_values`). The fitted runs all use
# rank 16, where it is a few % of a layer's values and cannot be told from them; at rank 512 on the tiny model (r
# above its width of 128) the estimate without it was 23% and 32% under the need (benchmarks/mlx_adapters.py).
# And without checkpointing, one fp32 copy of each adapted linear's input (`input_widths`) in every trained layer:
# fitted, the count came out 1.3. With checkpointing the recomputed layer's count is fitted (1.85 on 2026-12-06):
# its backward also makes each input's fp32 cotangent (dz @ A.T) before it casts it back.
FIXED = {"stored_checkpointed": 1.0, "adapter_values": 1.0, "adapter_values_checkpointed": 1.0,
         "adapter_inputs_cast": 1.0}


def constants() -> dict:
    """mlx_constants.json: the fitted coefficients and how they were measured."""
    return json.loads(_CONSTANTS_PATH.read_text())


def compute_dtype(config: TrainConfig, device: str, stored: str | None) -> str:
    """memfit.mlx.model.compute_dtype by name: auto is the checkpoint's bf16/fp16 on a Metal GPU, fp32 on a CPU."""
    if config.dtype == "auto":
        return stored if device == "mps" and stored in ("bfloat16", "float16") else "float32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "bf16-pure": "bfloat16"}[config.dtype]


def _quantized_bytes(rows: int, cols: int, bits: int, dtype_bytes: int) -> int:
    """One matrix (rows x cols, cols the input width) in MLX's affine layout: packed bits, a scale and a bias per
    group of GROUP_SIZE along the input."""
    return rows * cols * bits // 8 + 2 * rows * (cols // GROUP_SIZE) * dtype_bytes


def weight_bytes(info: ArchInfo, config: TrainConfig, dtype_bytes: int) -> int:
    """All the base's parameters as MLX holds them (quantized where --quant says and the shape allows)."""
    if config.quant == "none":
        return info.params * dtype_bytes
    bits = int(config.quant)
    total = info.params * dtype_bytes
    for linear in info.linears:
        if linear.in_features % GROUP_SIZE == 0:
            plain = linear.out_features * linear.in_features
            total += _quantized_bytes(linear.out_features, linear.in_features, bits, dtype_bytes) - plain * dtype_bytes
    h, vocab = info.hidden_size, info.vocab_size
    if h % GROUP_SIZE == 0:  # nn.Embedding -> QuantizedEmbedding (rows: the vocabulary, groups along h)
        heads = 1 if info.tie_embeddings else 2  # an untied lm_head is a Linear of the same shape
        total += heads * (_quantized_bytes(vocab, h, bits, dtype_bytes) - vocab * h * dtype_bytes)
    return total


def _module_bytes(rows: int, cols: int, config: TrainConfig, dtype_bytes: int) -> int:
    """One matrix (rows x cols, cols the input width) as the trained model holds it: quantized where --quant says and
    the shape allows, else in the compute dtype."""
    if config.quant != "none" and cols % GROUP_SIZE == 0:
        return _quantized_bytes(rows, cols, int(config.quant), dtype_bytes)
    return rows * cols * dtype_bytes


def loading_bytes(info: ArchInfo, config: TrainConfig, dtype_bytes: int, stored_bytes: int) -> int:
    """The arrays' peak while memfit's MLX engine loads the base (memfit.mlx.model.evaluate_by_module): one module
    at a time, the largest first (the embeddings, an untied head, each decoder layer with its adapters, the final
    norm), each read as stored (`stored_bytes` a parameter), cast to the compute dtype where that differs, and
    quantized under --quant, all three live at once (MLX reads a module's tensors before it casts them, and casts
    before it quantizes: in MLX's breadth-first order; depth first (MLX_BFS_MAX_WIDTH=1), one tensor at a time),
    beside the modules done. The whole smollm2-135m stored in fp32, trained in bf16: 302.1 MB estimated, 302.7
    measured at MLX's default width (at its last layer), 299.2 depth first; quantized to 4-bit: 185.8 estimated and
    measured (at its embeddings): load_peak_bytes of `python -m memfit.mlx.measure DIR '{"method": "lora", "dtype":
    "bf16", "quant": "none", "batch_size": 1, "seq_len": 64, "grad_checkpointing": false}' --steps 1` (and "quant":
    "4"), 2026-12-06. Stored in bf16: 288.6, 101.8 and 169.6 MB measured unquantized, 4- and 8-bit (width 20),
    288.6, 102.3 and 169.6 estimated; Llama-3.1-8B in 4-bit, r64, from a bf16 checkpoint (`--steps 0`): 5,624.7 MB
    both at width 20, 5,555.7 measured depth first (docs/mlx.md, "Loading"). tests/test_mlx_estimate.py checks it."""
    cast = stored_bytes != dtype_bytes
    quantized = config.quant != "none"
    h, vocab = info.hidden_size, info.vocab_size
    adapted = (config.lora_layers or info.num_layers) if config.uses_adapters else 0  # the last `adapted` layers
    adapters_per_layer = trainable_params(info, config) * 4 // adapted if adapted else 0
    groups: list[tuple[int, int]] = []  # (params, bytes once loaded)
    groups.append((vocab * h, _module_bytes(vocab, h, config, dtype_bytes)))
    for layer, params in enumerate(info.layer_params):
        matrices = [(lin.out_features, lin.in_features) for lin in info.linears if lin.layer == layer]
        rest = params - sum(rows * cols for rows, cols in matrices)
        loaded = sum(_module_bytes(rows, cols, config, dtype_bytes) for rows, cols in matrices)
        adapters = adapters_per_layer if layer >= info.num_layers - adapted else 0
        groups.append((params, loaded + rest * dtype_bytes + adapters))
    groups.append((info.other_params, info.other_params * dtype_bytes))
    if info.lm_head_params:
        groups.append((info.lm_head_params, _module_bytes(vocab, h, config, dtype_bytes)))
    done = peak = 0
    for params, loaded in sorted(groups, key=lambda group: -group[1]):  # the largest first, as they are read
        transient = params * stored_bytes + (params * dtype_bytes if cast else 0) + (loaded if quantized else 0)
        peak = max(peak, done + max(transient, loaded))
        done += loaded
    return peak


def trainable_params(info: ArchInfo, config: TrainConfig) -> int:
    if config.uses_adapters:
        return info.lora_params(config.lora_rank, config.lora_targets, config.lora_layers)
    if config.lora_layers is None:
        return info.params
    return sum(info.layer_params[-config.lora_layers:])


@dataclass(frozen=True)
class Shape:
    """What the activation terms need from an architecture."""

    hidden: int
    intermediate: int
    kv: int  # n_kv_heads x head_dim
    heads: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, info: ArchInfo) -> Shape:
        return cls(info.hidden_size, info.intermediate_size, info.kv_width, info.num_heads, info.vocab_size,
                   info.num_layers)


# Where each adaptable linear of a decoder layer sits, by its name: what an adapter there keeps for its gradient
# follows from it (`layer_saves`).
ROLES = {"q_proj": "attention_in", "k_proj": "attention_in", "v_proj": "attention_in", "qkv_proj": "attention_in",
         "o_proj": "attention_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
         "down_proj": "mlp_out"}
ALL_ROLES = frozenset(ROLES.values())


@dataclass(frozen=True)
class LayerCounts:
    """How many decoder layers' worth of each per-layer term a step holds (`layer_counts`): `hidden`, `mlp` and
    `attention` summed over the layers (without checkpointing), `recompute_*` the largest one layer holds (with it),
    `stored` the layer inputs checkpointing keeps."""

    hidden: float
    mlp: float
    attention: float
    recompute_hidden: float
    recompute_mlp: float
    recompute_attention: float
    stored: int
    adapters: int = 0  # adapted linears in all trained layers
    recompute_adapters: int = 0  # the most in one layer
    adapter_inputs: int = 0  # the adapted linears' distinct inputs' widths, summed over the layers (`input_widths`)
    recompute_adapter_inputs: int = 0  # the most in one layer

    @classmethod
    def every_layer(cls, shape: Shape) -> LayerCounts:
        """LoRA on every linear of every layer (a llama's seven): what benchmarks/derive_mlx_constants.py runs."""
        counts = layer_counts(shape.layers, [ALL_ROLES] * shape.layers, False, shape.hidden, shape.kv)
        inputs = 3 * shape.hidden + shape.intermediate  # q/k/v's, o's, gate/up's and down's (o's: heads x head_dim = h)
        return replace(counts, adapters=7 * shape.layers, recompute_adapters=7, adapter_inputs=inputs * shape.layers,
                       recompute_adapter_inputs=inputs)


def layer_saves(roles: frozenset[str], below: bool, hidden: int, kv: int) -> tuple[float, float, float]:
    """(h-wide values, i-wide values, attention scores) one decoder layer keeps for the backward pass, each as a
    share of what it keeps with every linear adapted and something trained below it (the form's unit: T x (6h + 2kv)
    h-wide values, 3 x T x i MLP values, the scores). A layer keeps what its adapters' gradients read and what carries
    the gradient down to the lowest of them, or to the layer's input when something below it trains (`below`):
    x -> norm -> q, k, v -> attention -> o -> + x = r -> norm -> gate, up -> silu(gate) * up = a -> down -> + r.
    An adapter reads its linear's input (the first norm's output for q, k, v; the attention's output for o; the
    second norm's for gate and up; a for down); the attention's backward reads q, k, v and the scores; the MLP's,
    gate and up; a norm's, its input (x, r). MLX's value_and_grad computes only the cotangents a trained parameter
    needs, so a layer below every adapter keeps nothing: measured with memfit.mlx.measure (tiny shapes, 8 x 128,
    fp32, no checkpointing, full logits, 2026-12-06), a 3-layer model adapting its last layer held 39.71 MB of
    activations, its 1-layer cut 39.71; adapting only q_proj and v_proj it held 8.49 MB less than with every linear,
    only down_proj 14.51 MB less."""
    attention_in = "attention_in" in roles
    through_attention = below or attention_in  # the attention's backward runs
    through_mlp = through_attention or "attention_out" in roles or "mlp_in" in roles  # gate and up's backward runs
    values = (hidden * (below + attention_in + ("attention_out" in roles) + ("mlp_in" in roles)
                        + (through_attention or "attention_out" in roles))  # x, norm 1, attention out, norm 2, r
              + (hidden + 2 * kv) * through_attention)  # q, k, v
    mlp = 2 * through_mlp + ("mlp_out" in roles)
    return values / (6 * hidden + 2 * kv), mlp / 3, float(through_attention)


def layer_counts(layers: int, roles: list[frozenset[str]], trained_below_first: bool, hidden: int,
                 kv: int) -> LayerCounts:
    """The per-layer terms' counts for `layers` decoder layers whose adapted (or trained) linears have `roles`, the
    first layer's with something trained below it (`trained_below_first`: a full fine-tune's embeddings). Layers
    below the lowest trained one keep nothing and store no input."""
    first = next((index for index, layer in enumerate(roles) if layer), layers)
    saves = [layer_saves(roles[index], index > first or trained_below_first, hidden, kv)
             for index in range(first, layers)]
    if not saves:
        return LayerCounts(0, 0, 0, 0, 0, 0, 0)
    return LayerCounts(*(sum(save[part] for save in saves) for part in range(3)),
                       *(max(save[part] for save in saves) for part in range(3)), stored=layers - first)


def config_counts(info: ArchInfo, config: TrainConfig) -> LayerCounts:
    """`layer_counts` for this model and config: the adapters' targets in the last --lora-layers layers (default
    all), or a full fine-tune's layers (every linear, and with every layer trained the embeddings below them). A
    linear whose role is not in ROLES counts as adapting every role of its layer (an estimate over, not under)."""
    layers = info.num_layers
    trained = min(config.lora_layers or layers, layers)
    roles: list[frozenset[str]] = [frozenset()] * layers
    if not config.uses_adapters:
        roles[layers - trained:] = [ALL_ROLES] * trained
        return layer_counts(layers, roles, trained == layers, info.hidden_size, info.kv_width)
    adapted = info.lora_targets(config.lora_targets, config.lora_layers)
    for linear in adapted:
        role = ROLES.get(linear.short_name)
        roles[linear.layer] = roles[linear.layer] | ({role} if role else ALL_ROLES)
    per_layer = Counter(linear.layer for linear in adapted)
    inputs = input_widths(adapted)
    return replace(layer_counts(layers, roles, False, info.hidden_size, info.kv_width),
                   adapters=len(adapted), recompute_adapters=max(per_layer.values(), default=0),
                   adapter_inputs=sum(inputs.values()), recompute_adapter_inputs=max(inputs.values(), default=0))


def input_widths(adapted: list[LinearInfo]) -> Counter:
    """Per decoder layer, the widths of the distinct inputs its adapted linears read. mlx-lm's LoRALinear computes
    x @ A with A in fp32, so MLX promotes x to fp32, and A's gradient reads that fp32 copy: the backward pass keeps
    it, one per input (mx.compile merges the casts of one input: adapting q, k and v held 0.14 MB a layer more than
    q alone in bf16 at 1 x 512 on the tiny model, 0.05 in fp32, where three casts would be 0.52 more), and since the
    base's weights are frozen their own backward does not read x, so in a bf16 step the bf16 x is not kept for them.
    q, k and v (or a fused qkv) read the first norm's output, gate and up the second's; o and down their own."""
    shared = {"attention_in", "mlp_in"}
    per_layer: Counter = Counter()
    seen: set = set()
    for linear in adapted:
        role = ROLES.get(linear.short_name)
        key = (linear.layer, role if role in shared else linear.short_name)
        if key not in seen:
            seen.add(key)
            per_layer[linear.layer] += linear.in_features
    return per_layer


def config_terms(info: ArchInfo, config: TrainConfig, batch: int, dtype_bytes: int, chunked: bool) -> dict[str, float]:
    """`term_bytes` for this model and config at `batch` rows: its layers' counts and its adapters' rank."""
    return term_bytes(Shape.of(info), batch, config.seq_len, config.grad_checkpointing, dtype_bytes, chunked,
                      config_counts(info, config), config.lora_rank if config.uses_adapters else 0)


def term_bytes(shape: Shape, batch: int, seq: int, checkpointing: bool, dtype_bytes: int = 4,
               chunked: bool = False, counts: LayerCounts | None = None, rank: int = 16) -> dict[str, float]:
    """Each activation term's bytes for one micro-batch of `batch` rows of `seq` tokens (T), before its fitted
    coefficient (how many such arrays are live at the peak): 1 MiB for the fixed part; the head's logits
    (`_head_terms`); per layer T x (6h + 2kv)/6 values (the h-wide values and k and v, in the proportion the layer
    makes them), T x i MLP values and b x H x s^2 attention scores. Without checkpointing those are summed over the
    layers (all are kept for the backward pass); with it, the stored layer inputs (T x h per layer) are, and the
    three value terms count one layer (what the backward pass recomputes at a time; `peak_parts` says how they
    combine with the head's). `counts` (`config_counts`; default every linear of every layer adapted, as the
    fitted runs) says how many layers' worth of each a step keeps. The layer values and the attention scores count
    in the compute dtype (the gradient of mx.fast.scaled_dot_product_attention over 1 x 4 x 1024 x 32 peaked at
    28.5 MB in bf16, 56.0 in fp32), the head at 4 bytes (memfit's loss upcasts the logits), except the adapted
    linears' inputs: mlx-lm's LoRALinear keeps A and B in fp32, so a bf16/fp16 step keeps an fp32 copy of each input
    (`input_widths`), counted as `adapter_inputs_cast`, the bytes beyond the compute dtype's (T x the widths x (4 -
    dtype bytes): none in fp32). Measured on the tiny model with memfit.mlx.measure (1 x 512, no checkpointing, full
    logits, every linear adapted, the need, 2026-12-06): a decoder layer held 10.97 MB in fp32 and 6.97 in bf16
    (0.64x, where the compute dtype alone would make it 0.5x); the form before, whose terms all scaled with the
    compute dtype (bar a fitted one-layer `lora_cast` of T x the adapted linears' widths x 4), put a layer at 12.4
    and 6.8 MB, so it estimated the fp32 steps without checkpointing over (the whole 24-layer held-out shape by
    14-18%) and the bf16 ones under; this form puts it at 11.0 and 6.5 MB. `hidden_backward`, one layer's
    hidden-width values without checkpointing, takes up what does not grow with the depth (the backward entering
    the top layer); with it the fit puts the per-layer hidden-width values (`hidden`) at 0 and the MLP-width ones
    take what a layer keeps (every fitted shape's MLP is 1.3-3.5x its width), so a model far outside those
    proportions is extrapolated. Measured by depth (the held-out 24-layer shape cut to 1, 6 and 12 layers, 2 x 512,
    the full logits, memfit.mlx.measure's need, 2026-12-06): a layer held 17.0 MB in fp32 and 11.0 in bf16 at every
    depth (this form: 16.6 and 10.2), and the 1-layer cut about 3 MB beside its head and its layer, where
    `hidden_backward` counts 8.9 (fp32): the fitted shapes' steps hold more beside their layers than that one's.
    Where the layers are few, it shows: a 3-layer tiny model training its last layer or two is estimated 13-14% over
    (3-8% before; benchmarks/mlx_adapters.py); for Llama-3.1-8B at 1 x 2,048 bf16 the term is 0.27 GB. Refitted with both (`python benchmarks/derive_mlx_constants.py --need --refit`,
    2026-12-06): the fitted runs' worst error 16.4% -> 12.2% (rms 5.2 -> 4.2), the held-out 24-layer shape's 18.2%
    -> 7.0% (rms 8.3 -> 3.9); `lora_cast` fitted at 0 and was dropped."""
    tokens = batch * seq
    counts = counts or LayerCounts.every_layer(shape)
    terms = {name: 0.0 for name in TERMS}
    terms["fixed"] = float(2**20)
    terms.update(_head_terms(shape, tokens, dtype_bytes, chunked, checkpointing))
    hidden_values = tokens * (6 * shape.hidden + 2 * shape.kv) / 6 * dtype_bytes  # the unit the counts scale
    if checkpointing:
        suffix, hidden, mlp, attention = ("_checkpointed", counts.recompute_hidden, counts.recompute_mlp,
                                          counts.recompute_attention)
        terms["stored_checkpointed"] = float(counts.stored * tokens * shape.hidden * dtype_bytes)
    else:
        suffix, hidden, mlp, attention = "", counts.hidden, counts.mlp, counts.attention
        terms["hidden_backward"] = float(counts.recompute_hidden * hidden_values)
    terms["hidden" + suffix] = float(hidden * hidden_values)
    terms["mlp" + suffix] = float(mlp * tokens * shape.intermediate * dtype_bytes)
    scores = attention * batch * shape.heads * seq * seq
    terms["attention" + suffix] = float(scores * dtype_bytes)
    terms["attention_cast" + suffix] = float(scores * 4) if dtype_bytes != 4 else 0.0
    adapted = counts.recompute_adapters if checkpointing else counts.adapters
    terms["adapter_values" + suffix] = float(adapted * tokens * rank * 4)  # FIXED says why
    inputs = counts.recompute_adapter_inputs if checkpointing else counts.adapter_inputs
    terms["adapter_inputs_cast" + suffix] = float(inputs * tokens * (4 - dtype_bytes))
    return terms


def peak_parts(terms: dict[str, float], coefficients: dict[str, float]) -> tuple[float, float]:
    """(activations, logits) at the step's peak. With checkpointing the peak is at the head (the logits and their
    gradient, before any layer is recomputed) or while a layer is recomputed (the head's arrays freed): the larger
    of the two, over what both hold (the stored layer inputs, the fixed part). With the full logits, plus a share
    (`OVERLAP`, fitted) of the smaller side: MLX evaluates the lazy graph as a whole, so part of the full logits'
    arrays is still live while the last layers are recomputed (or the reverse). The chunked loss frees each chunk
    inside its own checkpoint: the same share there put benchmarks/estimate_accuracy.py's held-out tiny
    checkpointed chunked cases 10-22% over (within 7% without it). The fit (benchmarks/derive_mlx_constants.py)
    puts each checkpointed run on the side that is larger. Without the share the fit's full-logits runs were within
    12.3% (8.7% with it) and estimate_accuracy.py's tiny full-logits case with checkpointing (bf16, 1 x 512, where
    the two sides are about equal) -19.8%; the additive form before (every term at once) estimated the tiny
    checkpointed chunked cases 29-32% over. Without checkpointing every layer's values are still held at the
    head: the sum."""
    head, recompute = _sides(terms, coefficients)
    rest = sum(coefficients[name] * terms[name] for name in TERMS if name not in HEAD_TERMS + RECOMPUTE_TERMS)
    if not any(terms[name] for name in RECOMPUTE_TERMS):
        return rest, head
    share = coefficients.get(OVERLAP, 0.0) if terms["head"] else 0.0  # terms["head"]: the full logits' term
    return (rest + recompute, share * head) if recompute > head else (rest + share * recompute, head)


def _sides(terms: dict[str, float], coefficients: dict[str, float]) -> tuple[float, float]:
    """(the head's bytes, a layer's recomputation's bytes) with these coefficients."""
    return (sum(coefficients[name] * terms[name] for name in HEAD_TERMS),
            sum(coefficients[name] * terms[name] for name in RECOMPUTE_TERMS))


def at_recomputation(terms: dict[str, float], coefficients: dict[str, float]) -> bool:
    """Whether a checkpointed step peaks while a layer is recomputed (else at the head, `peak_parts`)."""
    head, recompute = _sides(terms, coefficients)
    return recompute > head


def step_peak(terms: dict[str, float], coefficients: dict[str, float], gradients: int,
              adapters_only: bool) -> tuple[float, float, int, str]:
    """(activations, logits, gradients, phase) at the step's peak. `gradients`: the trained parameters' gradients
    at the end of the backward pass. An adapter's gradient is made when its layer's backward runs, so when only
    adapters train (`adapters_only`: LoRA or DoRA, one micro-batch a step) none is made yet where the backward
    starts, at the head, which is where a step without checkpointing peaks and a checkpointed one whose head side is
    the larger (`peak_parts`); a recomputation's peak counts them all (the layers above have made theirs), and the
    step's end, where the optimizer reads them, holds them without the activations, which are freed by then. A
    full fine-tune (the embeddings' or the head's gradient is made at the head) and gradient accumulation (the
    running sum is live through every micro-batch) count them throughout. Counted throughout, as until
    2026-12-06, the whole smollm2-135m's estimates were +13.1% (bf16 1 x 256, checkpointing, the full logits) and
    +6.1% (fp32 2 x 128); counted here (with this change's other terms), +9.2% and +4.5%
    (benchmarks/estimate_accuracy.py --engine mlx; 19.5 MB of the estimates were its r16 adapters' gradients)."""
    activations, logits = peak_parts(terms, coefficients)
    checkpointed = any(terms[name] for name in RECOMPUTE_TERMS)
    if not adapters_only or (checkpointed and at_recomputation(terms, coefficients)):
        return activations, logits, gradients, "backward"
    if gradients > activations + logits:
        return 0.0, 0.0, gradients, "optimizer"
    return activations, logits, 0, "head"


def _head_terms(shape: Shape, tokens: int, dtype_bytes: int, chunked: bool, checkpointing: bool) -> dict[str, float]:
    """The head's terms. Full-logits loss: the T x V fp32 logits (`head`). Chunked loss (chunks of C =
    mlx_chunk_tokens(T, V, h) tokens, one after another: memfit.mlx.loss): the first chunk's logits (`head_chunked`)
    and the other chunks' (`head_chunked_rest`), each with a coefficient of its own when the layers are checkpointed
    (`..._checkpointed`): in benchmarks/derive_mlx_constants.py's runs a further chunk added little without
    checkpointing and much more with it (256-token chunks, shape f: 466 -> 507 MB from four chunks to eight without,
    299 -> 490 with); with the 32-token floor (2026-12-05) the fit makes the first chunk's coefficient 13.3 without
    checkpointing and 13.2 with it, the others' 0.05 and 0.10: about thirteen chunks' logits at once, and a further
    chunk adds little either way.
    Either loss, bf16 or fp16: the compute-dtype logits the upcast starts from, for the tokens counted in the first
    term (`head_cast`: a bf16 step held about one fp32-logits' worth more than an fp32 one). On the fused chunks'
    77 runs before the 4 x 256 ones joined, the form before (two chunks and the rest, one coefficient each for both
    modes) fitted within 21.4% and put the held-out tiny cases of estimate_accuracy.py within 11.4%; this one
    17.6% / 11.8% with the 4 x 256 runs (`--refit --dry-run` with this function changed)."""
    vocab = shape.vocab
    live = min(tokens, mlx_chunk_tokens(tokens, vocab, shape.hidden)) if chunked else tokens
    terms = {"head_cast": float(live * vocab * dtype_bytes) if dtype_bytes != 4 else 0.0}
    if chunked:
        suffix = "_checkpointed" if checkpointing else ""
        terms["head_chunked" + suffix] = live * vocab * 4.0
        terms["head_chunked_rest" + suffix] = (tokens - live) * vocab * 4.0
    else:
        terms["head"] = tokens * vocab * 4.0
    return terms


def _asks_chunked_loss(hf_config, config: TrainConfig) -> bool:
    """--chunked-loss on an architecture whose head the MLX engine can chunk (memfit.mlx.loss's plain heads)."""
    return config.chunked_loss and getattr(hf_config, "model_type", None) in MLX_PLAIN_HEAD_TYPES


def loss_chunk(hf_config, config: TrainConfig, tokens: int) -> int:
    """The chunk the MLX engine runs this model's loss in for a micro-batch of `tokens` tokens
    (memfit.mlx.loss.make_loss's rule), or 0 for the full logits: asked for, a head it cannot chunk, or fewer than
    MLX_MIN_CHUNKS chunks (memfit.train.chunk_size says why). It says which head terms the estimate counts
    (`_head_terms`): the chunked ones, fitted on the chunked runs of benchmarks/derive_mlx_constants.py together
    with the full-logits runs (mlx_constants.json's `chunked_worst_error_percent` beside
    `full_logits_worst_error_percent`)."""
    if not _asks_chunked_loss(hf_config, config):
        return 0
    return mlx_chunks(tokens, hf_config.vocab_size, hf_config.hidden_size)


def chunked_loss(hf_config, config: TrainConfig, tokens: int) -> bool:
    """Whether the MLX engine runs this loss chunk by chunk (`loss_chunk`)."""
    return loss_chunk(hf_config, config, tokens) > 0


@dataclass
class MlxEstimate(Estimate):
    """An Estimate for the MLX engine; `mlx_peak_bytes` is what the step needs of MLX arrays (the module says which
    peak that is)."""

    mlx_peak_bytes: int = 0
    usable_bytes: int = 0  # what the device lets this process use (on a Mac: the GPU's working set)
    unified_bytes: int = 0  # a Mac's RAM (0 on a CPU)
    compute_dtype: str = "float32"
    recorded_worst_under: dict | None = None  # worst_under's figure for this kind of step: {"percent", "tokens"}

    @property
    def fits(self) -> bool:
        return self.process_bytes <= self.hardware.memory_bytes

    @property
    def baseline_bytes(self) -> int:
        return self.breakdown.get("runtime", 0)

    def extra_json(self) -> dict:
        """What `memfit estimate --engine mlx --json` adds to memfit.estimate.memory.to_json's object."""
        return {"engine": "mlx", "mlx_peak_bytes": self.mlx_peak_bytes, "compute_dtype": self.compute_dtype,
                "unified_memory_bytes": self.unified_bytes or None,
                "recorded_worst_under": self.recorded_worst_under,
                "quantization": ({"bits": int(self.config.quant), "group_size": GROUP_SIZE, "mode": "affine"}
                                 if self.config.quant != "none" else None)}


def estimate_mlx(hf_config, config: TrainConfig, hardware: Hardware, model_name: str = "model",
                 batch_size: int | None = None, unified_bytes: int = 0,
                 coefficients: dict[str, float] | None = None) -> MlxEstimate:
    """The breakdown of `config` (at `batch_size`, default its own) trained by memfit's MLX engine.
    `coefficients`: the activation terms' (default: mlx_constants.json's; the script that fits them passes 0s)."""
    if config.optimizer == "adamw8bit":
        raise UserError("--optimizer adamw8bit does not run on the MLX engine (bitsandbytes is torch only)",
                        hint="choose adamw, adafactor or sgd")
    if config.offload != "none" or hardware.num_gpus != 1 or hardware.zero:
        raise UserError("the MLX engine trains in one process on one device: no --num-gpus, --zero or --offload",
                        hint="drop those options, or use --engine torch")
    info = arch_info(hf_config)
    if info.experts:
        raise UserError("estimate --engine mlx covers dense models; this one is a mixture of experts",
                        hint="use `memfit probe --engine mlx` to measure it")
    try:
        stored = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    except Exception:  # noqa: BLE001 - a cached config record without the field: as if unknown
        stored = None
    stored_name = str(stored).replace("torch.", "") if stored else "float32"  # mlx-lm's default, as load_base's
    dtype = compute_dtype(config, hardware.device, stored_name if stored else None)
    dtype_bytes = _DTYPE_BYTES[dtype]
    fitted = constants()
    shipped = coefficients is None  # the recorded errors (worst_under) are the shipped coefficients' errors
    coefficients = fitted["coefficients"] if shipped else coefficients
    batch = batch_size or config.batch_size
    trainable = trainable_params(info, config)
    trainable_bytes = 4 if config.uses_adapters else dtype_bytes
    weights = weight_bytes(info, config, dtype_bytes)
    adapters = trainable * trainable_bytes if config.uses_adapters else 0
    gradients = trainable * trainable_bytes
    states = {"adamw": 2, "sgd": 0, "adafactor": 1}[config.optimizer]
    optimizer = trainable * trainable_bytes * states
    if config.optimizer == "adafactor":
        optimizer = 0  # factored second moments: a row and a column per matrix, negligible beside the weights
    tokens = batch * config.seq_len
    chunk = loss_chunk(hf_config, config, tokens)
    terms = config_terms(info, config, batch, dtype_bytes, chunk > 0)
    if config.grad_accum > 1:
        gradients *= 2  # the running sum and the micro-batch's own gradients are both live while they are added
    made_gradients = gradients
    activations, logits, gradients, phase = step_peak(terms, coefficients, gradients,
                                                      config.uses_adapters and config.grad_accum == 1)
    runtime = int(fitted["runtime_bytes"])
    breakdown = dict(weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                     optimizer=int(optimizer), activations=int(activations), logits=int(logits), runtime=runtime)
    unchunked = tokens if _asks_chunked_loss(hf_config, config) and not chunk else 0  # too few tokens to chunk
    notes = _notes(config, hardware, dtype, breakdown, fitted["measured_on"], chunk, unchunked)
    if phase == "head":
        notes.append(f"the peak is where the backward pass starts, before the adapters' gradients "
                     f"({format_gb(made_gradients)}) are made; the step's end holds them once the activations are "
                     "freed")
    under = worst_under(fitted, config.grad_checkpointing, chunk > 0, tokens) if shipped else None
    if under:
        notes.append(_recorded_caution(config.grad_checkpointing, chunk > 0, *under))
    if config.quant != "none" and config.method == "full":
        raise UserError("--quant with --method full: a quantized base cannot be fully fine-tuned",
                        hint="use --method lora (QLoRA on MLX) or drop --quant")
    estimate = MlxEstimate(model=model_name, config=config.model_copy(update={"batch_size": batch}),
                           hardware=hardware, precision=dtype, params=info.params, trainable_params=trainable,
                           breakdown=breakdown, notes=notes, peak_phase=phase, active_params=info.active_params)
    stored_bytes = _DTYPE_BYTES.get(stored_name, 4)
    loading = loading_bytes(info, config, dtype_bytes, stored_bytes)
    estimate.load_peak_bytes = loading + runtime if loading > sum(breakdown.values()) - runtime else 0
    if estimate.load_peak_bytes:
        notes.append(f"the peak is while the base loads ({format_gb(loading)} of MLX arrays: the modules loaded "
                     f"and one more as stored ({stored_name})" + (f", cast to {dtype}" if stored_bytes != dtype_bytes
                                                                   else "")
                     + (f" and quantized to {config.quant}-bit" if config.quant != "none" else "")
                     + "), above the training step's")
    estimate.mlx_peak_bytes = max(sum(breakdown.values()) - runtime, loading)
    estimate.usable_bytes = hardware.memory_bytes
    estimate.compute_dtype = dtype
    estimate.unified_bytes = unified_bytes
    estimate.recorded_worst_under = {"percent": under[0], "tokens": under[1]} if under else None
    return estimate


def recorded_errors(fitted: dict) -> list[tuple[dict, float]]:
    """Each run mlx_constants.json records with the shipped coefficients' error on it (% of its measured peak): the
    fit's errors for the fitted runs, the held-out ones for the shapes benchmarks/derive_mlx_constants.py measures
    and does not fit (both lists in the runs' order)."""
    held_shapes = set((fitted.get("held_out") or {}).get("shapes", ()))
    fitted_errors = iter(fitted["fit"]["errors_percent"])
    held_errors = iter((fitted.get("held_out") or {}).get("errors_percent", ()))
    return [(run, next(held_errors) if run["shape"] in held_shapes else next(fitted_errors))
            for run in fitted.get("runs", [])]


def worst_under(fitted: dict, checkpointed: bool, chunked: bool, tokens: int) -> tuple[float, int] | None:
    """(the most a recorded run held above its estimate, a negative %, and that run's tokens) among the runs of this
    checkpointing and loss at a similar batch: within a factor of 2 of `tokens`, else at the nearest token count
    recorded. Against the step's need (mlx_constants.json, refitted 2026-12-06 with the adapters' fp32 inputs) the
    chunked runs go to -10.1% (checkpointed) and -8.2% (not) at 16,384 tokens and -11.9% at 2,048 without
    checkpointing; the full-logits runs to -8.3%. None when none of those runs needed more than its estimate."""
    same = [(run, error) for run, error in recorded_errors(fitted)
            if run["grad_checkpointing"] == checkpointed and run.get("chunked_loss", False) == chunked]
    if not same:
        return None
    sizes = {run["batch_size"] * run["seq_len"] for run, _ in same}
    near = {size for size in sizes if tokens / 2 <= size <= tokens * 2} or {
        min(sizes, key=lambda size: abs(math.log(size / tokens)))}
    run, error = min(((run, error) for run, error in same if run["batch_size"] * run["seq_len"] in near),
                     key=lambda pair: pair[1])
    return (error, run["batch_size"] * run["seq_len"]) if error < 0 else None


def _recorded_caution(checkpointed: bool, chunked: bool, error: float, at_tokens: int) -> str:
    """What the runs the coefficients come from say about an estimate of this kind (`worst_under`): MLX's order of
    evaluation keeps a varying share of the chunked loss's and the recomputed layers' arrays live at large batches
    (docs/mlx.md), which no term of the fitted form follows, so the estimate is an expectation there, not a
    ceiling."""
    kind = ("checkpointing" if checkpointed else "no checkpointing") + (", the chunked loss" if chunked else
                                                                         ", the full logits")
    return (f"estimates of this kind were up to {-error:.0f}% under the measured need ({kind}, {at_tokens:,} tokens: "
            "mlx_constants.json's runs); run `memfit probe --engine mlx` before a long run near the limit")


def _notes(config: TrainConfig, hardware: Hardware, dtype: str, breakdown: dict[str, int], measured_on: str,
           chunk: int, unchunked_tokens: int) -> list[str]:
    """The estimate's notes: the layout, what the step needs of MLX arrays, the chunked loss (`chunk` tokens at a
    time, or `unchunked_tokens` too few to chunk), a Mac's budget."""
    runtime = breakdown["runtime"]
    notes = [f"MLX engine: {dtype} compute" + (f", base quantized to {config.quant}-bit (affine, group "
                                               f"{GROUP_SIZE}, {dtype} scales and biases; embeddings and lm_head "
                                               "too)" if config.quant != "none" else "")
             + "; LoRA adapters and their Adam states in fp32" * config.uses_adapters,
             f"the step needs {format_gb(sum(breakdown.values()) - runtime)} of MLX arrays (mx.get_peak_memory() with "
             "nothing run ahead: MLX waits for running ops above its memory limit, which memfit sets under the "
             f"guard's threshold; with no limit near, it allocates ahead and reads more); runtime "
             f"{format_gb(runtime)} is the process around them (measured: {measured_on})"]
    if chunk:
        at_peak = (f"{format_gb(breakdown['logits'])} of them at the peak" if breakdown["logits"] else
                   "the peak is a layer's recomputation, after they are freed")
        notes.append(f"chunked loss: the head's logits {chunk:,} tokens at a time ({at_peak}; --no-chunked-loss "
                     "holds all of them at once)")
    elif unchunked_tokens:
        notes.append(f"chunked loss: the micro-batch's {unchunked_tokens:,} tokens make fewer than {MLX_MIN_CHUNKS} "
                     "chunks, so the head runs whole (on MLX fewer chunks hold more than the full logits)")
    if hardware.device == "mps":
        notes.append(f"unified memory: the GPU may use {format_gb(hardware.memory_bytes)} (macOS's recommended "
                     "working set; `sudo sysctl iogpu.wired_limit_mb=N` raises it, and memfit sets MLX's wired "
                     "limit up to it)")
    return notes


def max_batch_mlx(hf_config, config: TrainConfig, hardware: Hardware, limit: int = 65536) -> int:
    """The largest micro-batch whose MLX estimate fits (0: not even 1). The estimate grows with the batch, but not
    quite linearly (the chunked loss's chunk grows in powers of two with the tokens: chunk_tokens; with
    checkpointing the peak is the larger of two sides: peak_parts), so a line through batches 1 and 2 can miss the
    answer by thousands (smollm2-135m at 1 x 128 on a 23 GB CPU: 63,724 estimates, 40 s, when this walked from
    that line one batch at a time): memfit.estimate.solve's search (lines where the curve is straight, doubling
    and bisection where it is not) settles it in a few dozen."""
    from memfit.estimate.solve import largest_fitting

    def total(batch: int) -> int:
        return estimate_mlx(hf_config, config, hardware, batch_size=batch).total_bytes

    return largest_fitting(total, hardware.memory_bytes, limit).batch


# --- what macOS lets the GPU use ------------------------------------------------------------------------------------

def recommended_working_set_bytes(ram_bytes: int) -> int:
    """Metal's recommendedMaxWorkingSetSize for a Mac of `ram_bytes`, when it cannot be read (planning for another
    Mac, or from Linux). Apple does not document the rule; what has been read from Macs: about two thirds of RAM up
    to 36 GB and three quarters above (gpustack/gpustack#1375: "75% of total RAM"; an 8 GB Mac's ceiling "~5.3 GB",
    SceneWorks/SceneWorks#1552), and more on the largest (107.52 GiB of 128 GiB on two M-series Max machines,
    antirez/ds4#893). This takes the lower, documented-by-observation fractions: a plan that fits here fits there.
    On the Mac itself MLX reads the real value (mx.device_info()["max_recommended_working_set_size"];
    memfit.mlx.memory.recommended_working_set_bytes), and `sudo sysctl iogpu.wired_limit_mb=N` raises it."""
    fraction = 2 / 3 if ram_bytes <= 36 * GB else 3 / 4
    return int(ram_bytes * fraction)


def mlx_hardware(device: str | None, memory_gb: float | None) -> tuple[Hardware, int]:
    """(Hardware, RAM) an MLX estimate plans for. mps: a Mac whose RAM is `memory_gb` (default this Mac's), of
    which the GPU may use its recommended working set; cpu: what memfit.estimate.hardware plans for a CPU."""
    from memfit.estimate.hardware import planned_hardware
    from memfit.mlx import apple_silicon, available

    if device is None:
        device = "mps" if apple_silicon() else "cpu"
    if device not in ("mps", "cpu"):
        raise UserError(f"--engine mlx runs on a Mac's GPU or a CPU, not --device {device}",
                        hint="use --device mps (a Mac) or cpu, or --engine torch")
    if device == "cpu":
        return planned_hardware("cpu", memory_gb), 0
    if memory_gb is not None and memory_gb <= 0:
        raise UserError(f"--memory-gb must be > 0 (got {memory_gb})", hint="give the Mac's memory (RAM) in GB")
    if memory_gb is not None:
        ram = int(memory_gb * GB)
        return Hardware("mps", recommended_working_set_bytes(ram)), ram
    from memfit.system import detect

    ram = detect().ram_total_bytes
    usable = None
    if apple_silicon() and available():
        from memfit.mlx.memory import recommended_working_set_bytes as read_working_set

        usable = read_working_set()  # this Mac's own figure, read from Metal
    return Hardware("mps", usable or recommended_working_set_bytes(ram)), ram


def working_set_rule() -> str:
    return ("macOS lets the GPU use its recommended working set: about 2/3 of RAM up to 36 GB, 3/4 above "
            "(more on 128 GB machines); `sudo sysctl iogpu.wired_limit_mb=N` raises it, and memfit's MLX engine sets "
            "mx.set_wired_limit up to it")


__all__ = ["GROUP_SIZE", "MlxEstimate", "Shape", "TERMS", "compute_dtype", "constants", "estimate_mlx",
           "max_batch_mlx", "recommended_working_set_bytes", "term_bytes", "weight_bytes", "working_set_rule"]




# --- recommend for a Mac: both engines --------------------------------------------------------------------------------

# What each engine can train on a Mac, said plainly (recommend prints it; the JSON carries it).
MAC_SUPPORT = {
    "torch": ("PyTorch on MPS: full and LoRA fine-tuning; QLoRA only through bitsandbytes' MPS backend "
              "(bitsandbytes-foundation/bitsandbytes#1983, merged 2026-07-01: 4-bit and LLM.int8 work on MPS with "
              "torch >= 2.9, on slower fallback kernels unless macOS 26's Hub kernels load; in releases after it, "
              "e.g. 0.50.x) and not yet tested by memfit on a Mac; --optimizer adamw8bit not on MPS (bitsandbytes' "
              "8-bit optimizers are not ported to MPS yet)"),
    "mlx": ("MLX (mlx-lm): full, LoRA and DoRA fine-tuning; QLoRA as --quant 4|8 (MLX's own affine quantization, "
            "group 64, no bitsandbytes); adamw, adafactor or sgd (no adamw8bit); one process, one device"),
}


def recommend_mac(config: TrainConfig, memory_gb: float | None, methods: tuple[str, ...],
                  engines: tuple[str, ...] = ("torch", "mlx")) -> dict:
    """`memfit recommend --device mps`: for a Mac of `memory_gb` RAM (default this one), each engine's table
    within what macOS lets the GPU use (its recommended working set), and what each engine supports there."""
    from memfit.estimate.recommend import recommend, sizes_table

    hardware, ram = mlx_hardware("mps", memory_gb)
    tables = {}
    for engine in engines:
        # The same table for each engine, from its own estimator (MLX's is arithmetic only: no trace).
        if engine == "mlx":
            tables["mlx"] = {"engine": "mlx", **sizes_table(config, hardware, methods, estimate_mlx, max_batch_mlx)}
        else:
            tables["torch"] = {"engine": "torch", **recommend(config, hardware, methods=methods)}
    return {"device": "mps", "unified_memory_bytes": ram, "usable_bytes": hardware.memory_bytes,
            "working_set": working_set_rule(), "engines": tables,
            "support": {engine: MAC_SUPPORT[engine] for engine in engines}}
