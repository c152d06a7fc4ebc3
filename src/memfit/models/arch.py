"""What a model is made of, counted exactly by building it on the meta device (no memory, no weights).

Everything the memory model needs from an architecture is read off the real module tree, not from a formula:
parameters per group (embeddings, decoder layers, lm_head, norms), which linear layers bnb would quantize, the
in/out features of every LoRA target, and the shapes the activation model needs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from memfit import cache
from memfit.errors import MemfitError, UserError

if TYPE_CHECKING:
    import torch

# model.layers.3 (most), transformer.h.3 (GPT-2), encoder.layer.3 (BERT-style decoders), blocks.3
# mlx-lm architectures whose Model.__call__ is exactly `head(self.model(inputs))`, the head being `lm_head` or, with
# tied embeddings, `model.embed_tokens.as_linear` (mlx_lm/models/llama.py, qwen2.py, qwen3.py; mistral loads as
# llama): the MLX engine's chunked loss runs on these (memfit.mlx.loss), and the MLX estimate counts it there.
MLX_PLAIN_HEAD_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def decoder_layer_index(module_name: str) -> int | None:
    """Index of the decoder layer a module belongs to (`model.layers.3.mlp.up_proj` -> 3), None outside layers."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layer modules, in order (`model.layers.0`, `transformer.h.1`, ...)."""
    layers = {}
    for name, module in model.named_modules():
        index = decoder_layer_index(name)
        # The first match is the layer itself (named_modules goes parents first); a deeper module whose name ends
        # in the same number (a parametrization list's `.0`) is not.
        if index is not None and name.endswith(f".{index}"):
            layers.setdefault(index, module)
    return [layers[index] for index in sorted(layers)]


def fused_expert_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """A mixture-of-experts module's fused weights (transformers 5: `experts.gate_up_proj` and `down_proj`, experts
    x out x in): its own 3-D parameters whose first dimension is its `num_experts`. Other 3-D parameters (a
    convolution's, mamba's) are not experts."""
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or "expert" not in type(module).__name__.lower():
        return []
    return [(name, param) for name, param in module.named_parameters(recurse=False)
            if param.dim() == 3 and param.shape[0] == experts]


def is_adaptable_linear(module: torch.nn.Module) -> bool:
    """A linear layer that LoRA can adapt and bitsandbytes can quantize (nn.Linear, GPT-2's Conv1D, bnb layers)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        # A mixture-of-experts router that subclasses nn.Linear (llama-4, phimoe) returns routing scores, not one
        # tensor: LoRA cannot wrap it, and adapting the routing is not what "all linear layers" means.
        return "router" not in type(module).__name__.lower()
    kind = type(module).__name__
    return kind in ("Conv1D", "Linear4bit", "Linear8bitLt")


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features); GPT-2's Conv1D stores its weight transposed."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


@dataclass(frozen=True)
class LinearInfo:
    name: str
    layer: int
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ExpertWeightInfo:
    """One fused mixture-of-experts weight: transformers 5 keeps a layer's experts as 3-D parameters
    (experts x out x in, e.g. `mlp.experts.gate_up_proj`); see memfit.train.experts."""

    name: str
    layer: int
    num_experts: int
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.num_experts * self.out_features * self.in_features


@dataclass(frozen=True)
class ArchInfo:
    """Parameter counts and shapes of one architecture."""

    model_type: str
    params: int  # unique parameters (tied weights once)
    embedding_params: int  # input embeddings (+ learned position embeddings)
    lm_head_params: int  # 0 when tied to the embeddings
    layer_params: tuple[int, ...]  # per decoder layer
    other_params: int  # final norm and anything outside layers/embeddings/head
    linear_weight_params: int  # weights of linear layers inside decoder layers (what bnb quantizes)
    linears: tuple[LinearInfo, ...] = field(repr=False)
    param_shapes: tuple[tuple[int, ...], ...] = field(repr=False, default=())  # every unique parameter
    vocab_size: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    tie_embeddings: bool = False
    experts: tuple[ExpertWeightInfo, ...] = field(repr=False, default=())
    experts_per_token: int = 0  # top-k of the router; 0 for a dense model
    # Checkpoints of this model type store one tensor per expert, which transformers fuses while loading (its
    # conversion mapping): the fused weights are new memory next to the mapped file.
    experts_fused_at_load: bool = False

    @property
    def expert_params(self) -> int:
        return sum(weight.params for weight in self.experts)

    @property
    def num_experts(self) -> int:
        return max((weight.num_experts for weight in self.experts), default=0)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the experts it is not routed to (top-k of each layer's)."""
        if not self.experts:
            return self.params
        unused = sum(w.params * (w.num_experts - min(self.experts_per_token, w.num_experts)) // w.num_experts
                     for w in self.experts)
        return self.params - unused

    def expert_targets(self, last_layers: int | None = None) -> list[ExpertWeightInfo]:
        first = self.num_layers - last_layers if last_layers else 0
        return [weight for weight in self.experts if weight.layer >= first]

    @property
    def kv_width(self) -> int:
        """Values per token in each of a layer's keys and values: kv heads x head dim (the query heads where the
        config names no kv heads, the hidden size over the heads where it names no head dim)."""
        head_dim = self.head_dim or self.hidden_size // max(1, self.num_heads)
        return (self.num_kv_heads or self.num_heads) * head_dim

    @property
    def largest_layer_params(self) -> int:
        return max(self.layer_params) if self.layer_params else 0

    def lora_targets(self, targets: str = "all-linear", last_layers: int | None = None) -> list[LinearInfo]:
        wanted = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
        first = self.num_layers - last_layers if last_layers else 0
        return [
            linear
            for linear in self.linears
            if linear.layer >= first and (wanted is None or linear.short_name in wanted)
        ]

    def lora_params(self, rank: int, targets: str = "all-linear", last_layers: int | None = None) -> int:
        """Exactly what PEFT adds: A (r x in) and B (out x r) for every target module."""
        return sum(rank * (lin.in_features + lin.out_features) for lin in self.lora_targets(targets, last_layers))

    def linear_names(self) -> list[str]:
        return sorted({linear.short_name for linear in self.linears})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchInfo:
        values = dict(data)
        values["layer_params"] = tuple(values["layer_params"])
        values["linears"] = tuple(LinearInfo(**linear) for linear in values["linears"])
        values["param_shapes"] = tuple(tuple(shape) for shape in values["param_shapes"])
        values["experts"] = tuple(ExpertWeightInfo(**weight) for weight in values.get("experts", ()))
        return cls(**values)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attr(config, *names, default=0):
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - e.g. gemma-4's head_dim, per layer: no single value to read
            value = None
        if value is not None:
            return value
    return default


def build_meta_model(config, attn_implementation: str | None = "eager"):
    """The model with every tensor on the meta device: real module tree, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from memfit.models.attention import check_attn_implementation

    check_attn_implementation(config, attn_implementation)  # one line naming what works, not transformers' raise
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    # init_empty_weights leaves tied embeddings untied under transformers 5; tie them as loading would.
    model.tie_weights()
    return model


_CACHE: dict[str, ArchInfo] = {}


def arch_info(config) -> ArchInfo:
    """Count a config's parameters exactly, by group, on the meta device (cached per config, in this process and
    on disk: memfit.cache)."""
    key = cache.config_key(config)
    if key not in _CACHE:
        disk_key = cache.digest("arch", key)
        stored = cache.load("arch", disk_key)
        try:
            info = ArchInfo.from_json(stored) if stored is not None else None
        except (KeyError, TypeError, ValueError):
            info = None
        if info is None:
            if cache.is_record(config):
                raise cache.CacheMiss("no cached parameter count")
            try:
                info = _count(config)
            except (MemfitError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # noqa: BLE001 - the model's own code failing on the meta device
                import transformers

                first = " ".join(str(error).split())[:160] or type(error).__name__
                raise UserError(
                    f"cannot estimate model_type {getattr(config, 'model_type', '?')!r}: "
                    f"AutoModelForCausalLM.from_config cannot build it on the meta device with transformers "
                    f"{transformers.__version__} ({type(error).__name__}: {first})",
                    hint="`memfit probe` measures what fits by running real steps",
                ) from None
            cache.save("arch", disk_key, info.to_json())
        _CACHE[key] = info
    return _CACHE[key]


def _fused_at_load(model_type: str) -> bool:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion mappings loads the stored layout as it is
        return False
    return bool(get_checkpoint_conversion_mapping(model_type))


def _count(config) -> ArchInfo:
    model = build_meta_model(config)
    text = _text_config(model.config)
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    embedding_ids = {id(p) for p in input_embeddings.parameters()}
    head_ids = {id(p) for p in output_embeddings.parameters()} if output_embeddings is not None else set()
    tied = bool(head_ids) and head_ids <= embedding_ids
    num_layers = _attr(text, "num_hidden_layers", "n_layer")
    embedding, head, layer_params, other = _parameter_groups(model, embedding_ids, head_ids, num_layers)
    linears = _adaptable_linears(model)
    experts = _expert_weights(model)

    hidden = _attr(text, "hidden_size", "n_embd")
    heads = _attr(text, "num_attention_heads", "n_head")
    return ArchInfo(
        model_type=text.model_type,
        params=sum(p.numel() for p in model.parameters()),
        embedding_params=embedding,
        lm_head_params=0 if tied else head,
        layer_params=tuple(layer_params),
        other_params=other,
        linear_weight_params=sum(lin.in_features * lin.out_features for lin in linears),
        linears=tuple(linears),
        param_shapes=tuple(tuple(p.shape) for p in model.parameters()),
        vocab_size=_attr(text, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_attr(text, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=_attr(text, "num_key_value_heads", default=heads),
        head_dim=_attr(text, "head_dim", default=hidden // max(heads, 1)),
        tie_embeddings=tied,
        experts=tuple(experts),
        experts_fused_at_load=bool(experts) and _fused_at_load(text.model_type),
        experts_per_token=_attr(text, "num_experts_per_tok", "experts_per_token", "moe_topk", "top_k") if experts else 0,
    )


def _parameter_groups(model, embedding_ids: set[int], head_ids: set[int],
                      num_layers: int) -> tuple[int, int, list[int], int]:
    """Weights counted once each (tied ones too): (embedding, head, per decoder layer, everything else)."""
    layer_params = [0] * num_layers
    seen: set[int] = set()
    embedding = head = other = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        layer = decoder_layer_index(name)
        if id(param) in embedding_ids or "wpe" in name or "position_embeddings" in name:
            embedding += count
        elif id(param) in head_ids:
            head += count
        elif layer is not None and layer < num_layers:
            layer_params[layer] += count
        else:
            other += count
    return embedding, head, layer_params, other


def _adaptable_linears(model) -> list[LinearInfo]:
    """The decoder layers' linear layers that LoRA can adapt, with their shapes."""
    linears = []
    for name, module in model.named_modules():
        layer = decoder_layer_index(name)
        if layer is None or not is_adaptable_linear(module):
            continue
        in_features, out_features = linear_shape(module)
        linears.append(LinearInfo(name, layer, in_features, out_features, module.bias is not None))
    return linears


def _expert_weights(model) -> list[ExpertWeightInfo]:
    """The decoder layers' fused mixture-of-experts weights (one tensor for all experts)."""
    experts = []
    for module_name, module in model.named_modules():
        layer = decoder_layer_index(module_name)
        for name, param in fused_expert_params(module) if layer is not None else ():
            # Which of the last two dimensions is in and which out does not change a count.
            experts.append(ExpertWeightInfo(f"{module_name}.{name}", layer, *param.shape))
    return experts
