"""One greedy continuation of a prompt, from a base model or a run's final/: what `memfit demo` shows before and
after training, so a newcomer sees what the loss going down means."""

from __future__ import annotations

from pathlib import Path


def continue_prompt(model_dir: Path, prompt: str, *, adapter: Path | None = None, max_new_tokens: int = 24,
                    device: str = "cpu") -> str:
    """The greedy continuation (decoded, special tokens left out) of `prompt` by the model in `model_dir`, with a
    PEFT adapter on top when given. A full fine-tune's final/ is a model dir of its own."""
    from transformers import AutoTokenizer

    from memfit.eval.evaluate import load_for_eval
    from memfit.eval.generate import generate, text_prompt_ids
    from memfit.precision import resolve_precision

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = load_for_eval(model_dir, adapter, resolve_precision("auto", device), device)
    (completion,) = generate(model, tokenizer, [text_prompt_ids(prompt, tokenizer)], max_new_tokens=max_new_tokens,
                             temperature=0.0, batch_size=1, device=device)
    return " ".join(completion.split())  # one line: the demo prints it beside the prompt
