"""`memfit eval`: loss and perplexity of a model (optionally with a LoRA adapter) on validation data, and
generation, with generated code run against its tests only inside a sandbox (memfit.eval.sandbox)."""

from memfit.eval.evaluate import EvalJob, EvalResult, run_eval

__all__ = ["EvalJob", "EvalResult", "run_eval"]
