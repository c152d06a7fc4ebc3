"""Loss and perplexity with an MLX model: the MLX trainer's validation and `memfit eval --engine mlx`.

The same rows, scored tokens and cross-entropy as training (memfit.mlx.batches, memfit.mlx.loss), without a
gradient: each row's hidden states go through the head a chunk of tokens at a time (memfit.train.chunk_size), each
chunk's loss evaluated before the next, so no more than one chunk's logits is ever held (architectures without a
plain head: one row's full logits at a time)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from memfit.errors import UserError
from memfit.mlx.batches import MicroBatch, micro_batch
from memfit.mlx.loss import plain_head, weighted_sum
from memfit.train.chunk_size import chunk_tokens

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def row_losses(model, batch: MicroBatch) -> list[tuple[float, float]]:
    """(sum_t w_t * CE_t, sum_t w_t) of each row, evaluated chunk by chunk."""
    found = []
    plain = plain_head(model)
    hidden = model.model(batch.inputs) if plain is not None else None
    for row in range(batch.inputs.shape[0]):
        targets, weights = batch.targets[row], batch.weights[row]
        if plain is None:
            total = weighted_sum(model(batch.inputs[row:row + 1])[0], targets, weights)
            mx.eval(total)
            found.append((total.item(), weights.sum().item()))
            continue
        module, apply = plain
        width, size = hidden.shape[1], hidden.shape[2]
        # Each chunk is evaluated on its own here (no gradient graph keeps several alive), so the training floor's
        # reason (memfit.train.chunk_size.MLX_MIN_CHUNK_TOKENS) does not apply: fewer, larger chunks, fewer syncs.
        step = chunk_tokens(width, model.args.vocab_size, size)
        total = 0.0
        for start in range(0, width, step):
            part = weighted_sum(apply(module, hidden[row, start:start + step]), targets[start:start + step],
                                 weights[start:start + step])
            mx.eval(part)
            total += part.item()
        found.append((total, weights.sum().item()))
    return found


def dataset_loss(model, dataset, pad_id: int, batch_size: int,
                 on_batch: Callable[[int, int, int], None] | None = None) -> tuple[float, int, list[dict[str, Any]]]:
    """(mean CE per scored token, scored tokens, per-sample loss and tokens) of an unpacked dataset's rows, in
    batches of `batch_size`; `on_batch(done, total, tokens)` after each batch."""
    rows = dataset.rows
    starts = list(range(0, len(rows), batch_size))
    loss_sum, tokens, samples = 0.0, 0, []
    for number, start in enumerate(starts, 1):
        chunk = rows[start:start + batch_size]
        for row, (row_sum, row_tokens) in zip(chunk, row_losses(model, micro_batch(chunk, dataset.samples,
                                                                                    pad_id))):
            record = dataset.samples[row.segments[0][2]]
            samples.append({"line": record.line, "loss": row_sum / max(row_tokens, 1), "tokens": int(row_tokens)})
            loss_sum += row_sum
            tokens += int(row_tokens)
        if on_batch is not None:
            on_batch(number, len(starts), tokens)
    return loss_sum / max(tokens, 1), tokens, samples


def resolve_adapter(path: Path) -> Path:
    """mlx-lm's adapter directory (adapters.safetensors + adapter_config.json): `path`, or a run directory's final/."""
    if not path.exists():
        raise UserError(f"--adapter {path}: no such directory", hint="pass an MLX run's final/ dir (or the run dir)")
    for candidate in (path, path / "final"):
        if all((candidate / name).is_file() for name in ADAPTER_FILES):
            return candidate
    raise UserError(f"--adapter {path}: not an mlx-lm adapter (no {' + '.join(ADAPTER_FILES)} in it or its final/)",
                    hint="pass the final/ dir of a `memfit train --engine mlx` run, or use --engine torch for a "
                         "PEFT adapter")


def load_for_eval(model_dir: Path, adapter: Path | None, dtype: str, quant: str, on_metal: bool):
    """The base as the MLX trainer loads it (cast; quantized with --quant, or as the adapter's run quantized it)
    with the adapter on top (mlx-lm's load_adapters), evaluated, in eval mode."""
    import json

    from mlx_lm.tuner.utils import load_adapters

    from memfit.config import TrainConfig
    from memfit.mlx.memory import set_eval_width
    from memfit.mlx.model import evaluate_by_module, load_base

    group_size = 64
    if adapter is not None and quant == "none":  # a QLoRA run's adapter: its base quantized as in training
        trained = json.loads((adapter / "adapter_config.json").read_text()).get("quantization") or {}
        if trained.get("bits") in (4, 8):
            quant, group_size = str(trained["bits"]), int(trained.get("group_size", 64))
    config = TrainConfig(method="qlora" if quant != "none" else "lora", quant=quant, dtype=dtype)
    set_eval_width()  # the trainer's order of evaluation (memfit.mlx.memory)
    model, _config, _dtype, notes = load_base(model_dir, config, group_size=group_size, on_metal=on_metal)
    model.freeze()
    if adapter is not None:
        try:
            model = load_adapters(model, str(adapter))
        except (ValueError, KeyError) as error:  # shapes or module names of another base model
            raise UserError(f"--adapter {adapter} does not fit --model {model_dir}: "
                            f"{' '.join(str(error).split())[:200]}",
                            hint="use the base model the adapter was trained on") from None
    model.eval()
    evaluate_by_module(model)  # the base read one module at a time, as for training (its docstring says why)
    return model, notes
