"""Load a model for MLX training: mlx_lm.utils.load_model, the compute dtype, MLX quantization of the base
(`--quant 4|8`), the adapters (`linear_to_lora_layers`: LoRA or DoRA) or a full fine-tune, and gradient
checkpointing (as mlx-lm's, with the backward pass ordered: ordered_checkpoint).

memfit's adapter settings map onto mlx-lm's as follows: rank -> `rank`; alpha -> `scale = alpha / rank` (PEFT's
scaling; mlx-lm's `scale` multiplies the low-rank product directly, its default 20 is alpha = 20 x rank); dropout ->
`dropout`; `--lora-layers N` -> `num_layers` (the last N decoder layers; default all); `--lora-targets` -> `keys`,
the module paths inside a decoder layer (`self_attn.q_proj`, `mlp.down_proj`, ...): all-linear takes every linear
layer of the decoder layers, as PEFT's all-linear does (the lm_head and embeddings are not adapted).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from memfit.config import TrainConfig
from memfit.errors import UserError
from memfit.train.chunk_size import MLX_MIN_CHUNK_TOKENS, MLX_MIN_CHUNKS

DEFAULT_GROUP_SIZE = 64  # MLX's (and mlx_lm.convert's) default quantization group


@dataclass
class LoadedModel:
    model: Any  # the mlx_lm model (nn.Module)
    config: dict[str, Any]  # its config.json as mlx-lm read it (with "quantization" once quantized)
    dtype: str  # the compute dtype's name (float32, bfloat16, float16)
    adapter_config: dict[str, Any] | None  # mlx-lm's adapter_config.json content (None for a full fine-tune)
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self):
        return self.model.layers

    def trainable(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; a quantized weight counts its logical elements."""
        trainable = sum(value.size for value in self.trainable().values())
        total = 0
        for _, module in self.model.named_modules():
            quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            for name, value in module.items():
                if not isinstance(value, mx.array):
                    continue
                if quantized and name == "weight":
                    total += value.size * 32 // module.bits
                elif not (quantized and name in ("scales", "biases")):
                    total += value.size
        return trainable, total


_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16, "bf16-pure": mx.bfloat16}


def compute_dtype(config: TrainConfig, stored: str | None, on_metal: bool):
    """auto: the checkpoint's own dtype on a Metal GPU (bf16/fp16 as published), fp32 on a CPU (as the torch engine
    does there: CPUs have no fast bf16 matmul). Otherwise what --dtype names (MLX has no mixed precision: bf16 and
    bf16-pure both compute in bf16; the adapters stay fp32 either way, as mlx-lm creates them)."""
    if config.dtype == "auto":
        if on_metal and stored in ("bfloat16", "float16"):
            return getattr(mx, stored)
        return mx.float32
    return _DTYPES[config.dtype]


def _linear_types():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def layer_linear_keys(layer) -> list[str]:
    """The paths of the linear modules inside one decoder layer (`self_attn.q_proj`, ...), as mlx-lm's keys."""
    types = _linear_types()
    return sorted(path for path, module in layer.named_modules()
                  if path and (isinstance(module, types) or hasattr(module, "to_lora")))


def lora_keys(model, targets: str) -> list[str]:
    """`--lora-targets` as mlx-lm's keys: all-linear, or the leaf names asked for (q_proj,v_proj)."""
    available = sorted({key for layer in model.layers for key in layer_linear_keys(layer)})
    if targets.strip() in ("all-linear", "all", ""):
        return available
    wanted = [name.strip() for name in targets.split(",") if name.strip()]
    keys = [key for key in available if key.rsplit(".", 1)[-1] in wanted or key in wanted]
    missing = [name for name in wanted if not any(key.rsplit(".", 1)[-1] == name or key == name for key in keys)]
    if missing:
        leaves = sorted({key.rsplit(".", 1)[-1] for key in available})
        raise UserError(f"--lora-targets {','.join(missing)}: no such linear layer in this model's decoder layers",
                        hint=f"choose from {','.join(leaves)} or all-linear")
    return keys


def adapter_settings(config: TrainConfig, model, use_dora: bool = False) -> dict[str, Any]:
    """mlx-lm's adapter_config.json for memfit's adapter flags (what load_adapters reads back)."""
    layers = len(model.layers)
    num_layers = layers if config.lora_layers is None else config.lora_layers
    if num_layers > layers:
        raise UserError(f"--lora-layers {num_layers}: this model has {layers} decoder layers",
                        hint=f"choose at most {layers}")
    return {
        "fine_tune_type": "dora" if use_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": config.lora_rank, "scale": config.effective_lora_alpha / config.lora_rank,
                            "dropout": config.lora_dropout, "keys": lora_keys(model, config.lora_targets)},
    }


_CHECKPOINTED = "_memfit_grad_checkpoint"


def grad_checkpoint(layer) -> None:
    """Gradient checkpointing for every instance of the layer's class (patched once per class in a process, as
    mlx-lm's `grad_checkpoint` does), through `ordered_checkpoint`."""
    cls = type(layer)
    if not getattr(cls, _CHECKPOINTED, False):
        cls.__call__ = ordered_checkpoint(cls.__call__)
        setattr(cls, _CHECKPOINTED, True)


_replay_keys: list = []  # the key of the checkpointed layer call whose forward pass is being built, innermost last


class ReplayableDropout(nn.Dropout):
    """nn.Dropout whose masks a checkpointed layer's recomputation draws again: inside `ordered_checkpoint`'s forward
    pass they come from the layer call's key, not from MLX's global random state (which has moved on by the time
    the backward pass recomputes the layer). Elsewhere it is nn.Dropout."""

    def __call__(self, x):
        if self._p_1 == 1 or not self.training or not _replay_keys:
            return super().__call__(x)
        _replay_keys[-1], key = mx.random.split(_replay_keys[-1])
        mask = mx.random.bernoulli(self._p_1, x.shape, key=key)
        return (mask * x) * (1 / self._p_1)


def draw_key(layer):
    """A key of this layer call's own for its ReplayableDropout masks, drawn from MLX's global state; None where the
    layer draws no mask (the global state is then left as it is)."""
    if not any(isinstance(module, ReplayableDropout) and module.training and module._p_1 < 1
               for module in layer.modules()):
        return None
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


@contextmanager
def masks_from(key):
    """ReplayableDropout inside draws its masks from `key` (None: from MLX's global state, as nn.Dropout)."""
    if key is None:
        yield
        return
    _replay_keys.append(key)
    try:
        yield
    finally:
        _replay_keys.pop()


def replayable_dropout(model) -> int:
    """Swap the adapters' nn.Dropout (mlx-lm's LoRALinear and DoRALinear: `self.dropout`) for ReplayableDropout of
    the same rate; returns how many were swapped."""
    swapped = 0
    for _, module in model.named_modules():
        dropout = getattr(module, "dropout", None)
        if type(dropout) is nn.Dropout and dropout._p_1 < 1:
            module.dropout = ReplayableDropout(1 - dropout._p_1)
            swapped += 1
    return swapped


# Steps of fewer tokens than this recompute without the order (ordered_checkpoint): 8 chunks of MLX's 32-token floor,
# below which the MLX loss runs the plain head too (memfit.train.chunk_size.mlx_chunks). Measured with
# `python benchmarks/mlx_checkpoint_order.py MODEL_DIR --batch-size 1 --seq-len 128 --dtype fp32` on the whole
# smollm2-135m (docs/benchmarks.md, "mlx-checkpoint-order-smollm2-135m-1x128").
ORDERED_FROM_TOKENS = MLX_MIN_CHUNKS * MLX_MIN_CHUNK_TOKENS


def ordered_checkpoint(call):
    """`call(layer, x, ...)` with its intermediate values recomputed in the backward pass, as `mx.checkpoint` does
    (mlx-lm's `grad_checkpoint`), and the backward pass held to one layer at a time.

    MLX evaluates a step's graph as a whole, breadth first, and nothing in `mx.checkpoint` orders one layer's
    backward against the next: the recomputations of several layers ran while the weight gradients that read their
    values waited to the end of the step. So the backward pass here (1) recomputes the layer only once the gradient
    from above has arrived and (2) hands the gradient below only once this layer's weight gradients exist
    (`mx.depends`). Same loss; on derive_mlx_constants.py's shape m cut to 6 layers, bf16 64 x 256, the step's need
    went from 404.5 to 257.4 MB (benchmarks/mlx_checkpoint_order.py, docs/benchmarks.md).

    Below ORDERED_FROM_TOKENS tokens a step the two edges are left out (then this is `mx.checkpoint`'s recomputation):
    there the activations are small, the need the same either way, and with the edges MLX ran further ahead of
    the ops running (the whole smollm2-135m, 1 x 128 fp32: ORDERED_FROM_TOKENS's comment).

    The recomputation draws the forward pass's dropout masks again (as torch's checkpoint restores its RNG state):
    each call draws a key of its own, and the adapters' ReplayableDropout takes its masks from it, so --lora-dropout's
    gradients are the loss's own; with `mx.checkpoint` they were another sample's, drawn from MLX's global state
    where the backward pass found it (tests/test_mlx_checkpoint.py)."""

    def checkpointed(layer, x, *args, **kwargs):
        trained = tree_flatten(layer.trainable_parameters())  # none below every adapter (--lora-layers)
        names, values = [name for name, _ in trained], [value for _, value in trained]
        count = len(values)
        key = draw_key(layer)  # the recomputation starts from it again

        def forward(parameters, hidden):
            layer.update(tree_unflatten(list(zip(names, parameters))))
            with masks_from(key):
                return call(layer, hidden, *args, **kwargs)

        @mx.custom_function
        def run(parameters, hidden):
            return forward(parameters, hidden)

        ordered = x.size // x.shape[-1] >= ORDERED_FROM_TOKENS

        @run.vjp
        def run_vjp(primals, cotangent, output):
            parameters, hidden = primals
            cotangents = [value for _, value in tree_flatten(cotangent)]
            after = [value for _, value in tree_flatten(output)] + (cotangents if ordered else [])
            inputs = mx.depends([*parameters, hidden], after)
            _, grads = mx.vjp(lambda *a: [value for _, value in tree_flatten(forward(list(a[:count]), a[count]))],
                              inputs, cotangents)
            parameter_grads, hidden_grad = list(grads[:count]), grads[count]
            if parameter_grads and ordered:
                hidden_grad = mx.depends([hidden_grad], parameter_grads)[0]
            return parameter_grads, hidden_grad

        return run(values, x)

    return checkpointed


def load_base(model_dir: Path, config: TrainConfig, *, group_size: int = DEFAULT_GROUP_SIZE,
              on_metal: bool = False) -> tuple[Any, dict[str, Any], Any, list[str]]:
    """(model, its config, the compute dtype, notes): loaded lazily, cast to the compute dtype and quantized
    (--quant), not yet evaluated."""
    from mlx_lm.utils import load_model, quantize_model

    notes: list[str] = []
    try:
        # load_model, not mlx_lm.load: load also builds a tokenizer, a second one beside the trainer's own.
        model, model_config = load_model(Path(model_dir), lazy=True)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise UserError(f"mlx-lm cannot load {model_dir}: {' '.join(str(error).split())[:200]}",
                        hint="use --engine torch for this architecture") from None
    stored = str(model_config.get("torch_dtype") or model_config.get("dtype") or "float32")
    dtype = compute_dtype(config, stored, on_metal)
    if "quantization" in model_config:
        if config.quant != "none":
            notes.append(f"the base is quantized already ({model_config['quantization'].get('bits')}-bit): "
                         f"--quant {config.quant} is not applied again")
    else:
        model.set_dtype(dtype)
        if config.quant != "none":
            model, model_config = quantize_model(model, model_config, group_size, int(config.quant))
            notes.append(f"base quantized to {config.quant}-bit with MLX (group size {group_size}; "
                         "the embeddings and lm_head too, as mlx_lm.convert does)")
    return model, model_config, dtype, notes


def parameter_groups(model) -> list[list[mx.array]]:
    """The model's parameters in the order they are stored, one group per decoder layer and one per other module
    (the embeddings, the final norm, an untied head): what `evaluate_by_module` reads at a time."""
    groups: dict[str, list[mx.array]] = {}
    for name, value in tree_flatten(model.parameters()):
        parts = name.split(".")
        if "layers" in parts[:-1] and parts[parts.index("layers") + 1].isdigit():
            key = ".".join(parts[:parts.index("layers") + 2])
        else:
            key = name.rsplit(".", 1)[0]
        groups.setdefault(key, []).append(value)
    return list(groups.values())


def evaluate_by_module(model) -> None:
    """Read, cast and quantize the lazily loaded weights one module at a time. Why not one mx.eval of them all, as
    mlx_lm.load does: MLX orders a graph's ops breadth first (mlx/transforms.cpp, the tape's BFS with a width
    limit), so all the checkpoint's reads ran before the casts and quantizations that consume them, and the load's
    peak was the whole base as stored beside what it became (the whole smollm2-135m stored in fp32, trained in
    bf16: 416.0 MB, where the trained weights are 288.6 MB; quantized to 4-bit: 286.4 MB for 95.3 MB; now 302.7
    and 185.8 MB: load_peak_bytes of `python -m memfit.mlx.measure`, 2026-12-06). One module at a time, the peak
    is the modules done plus one module as stored and as it becomes (memfit.estimate.mlx_memory.loading_bytes).
    The largest modules first (by their arrays' bytes once read, known before they are): the embeddings and an
    untied head are each larger than a decoder layer, and read last they would sit on top of all the rest (Llama
    3.1 8B in 4-bit: its bf16 head beside the quantized rest, 5.7 GB, where the loaded model is 4.6 GB)."""
    for group in sorted(parameter_groups(model), key=lambda arrays: -sum(value.nbytes for value in arrays)):
        mx.eval(group)


def load_for_training(model_dir: Path, config: TrainConfig, *, group_size: int = DEFAULT_GROUP_SIZE,
                      use_dora: bool = False, on_metal: bool = False) -> LoadedModel:
    """The model ready to train: loaded lazily, cast, quantized (--quant), adapters added (or unfrozen for a full
    fine-tune), and evaluated (the weights are read here, once in their final dtype and layout)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, model_config, dtype, notes = load_base(model_dir, config, group_size=group_size, on_metal=on_metal)
    model.freeze()
    adapter_config = None
    if config.uses_adapters:
        adapter_config = adapter_settings(config, model, use_dora)
        linear_to_lora_layers(model, adapter_config["num_layers"], adapter_config["lora_parameters"],
                              use_dora=use_dora)
    else:
        if config.lora_layers is None:
            model.unfreeze()
        else:
            for layer in model.layers[-config.lora_layers:]:
                layer.unfreeze()
    if config.grad_checkpointing:
        replayable_dropout(model)
        grad_checkpoint(model.layers[0])
    evaluate_by_module(model)
    loaded = LoadedModel(model, model_config, str(dtype).rsplit(".", 1)[-1], adapter_config, notes)
    if not loaded.trainable():
        raise UserError("nothing to train: no parameter requires a gradient", hint="check --method/--lora-targets")
    return loaded
