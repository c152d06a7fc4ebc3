"""What memfit asks of the libraries it imports, once per process: quiet, offline, and PEFT without bitsandbytes
where no 4/8-bit layer will be built.

Every entry point (the CLI, a supervised trainer child, a probe trial child) calls `quiet()` first. A process
that will build no bitsandbytes layer calls `hide_bitsandbytes_from_peft()`; memfit imports PEFT with
`import_peft()`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet() -> None:
    """Library chatter (deprecation notices, optional-kernel probes) is not for memfit's users."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Nothing goes online by accident; the user's own setting is kept for the one fetch they may ask for (a Hub id's
    # config.json: memfit.models.hub.USER_OFFLINE_ENV).
    os.environ.setdefault("MEMFIT_USER_HF_HUB_OFFLINE",
                          os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("bitsandbytes", "transformers", "accelerate", "peft", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # PEFT warns (RuntimeWarning) about rank patterns and targets it adapts its own way: chatter, not advice.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"peft\.")
    # DeepSpeed (imported by transformers whenever it is installed) resets its logger's level when it creates it,
    # then warns on every CPU-only import: a filter on the logger outlives that.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


_HIDE_BITSANDBYTES = False


def hide_bitsandbytes_from_peft() -> None:
    """Declare that this process builds no 4/8-bit layer (`--quant none`, or it only estimates): `import_peft`
    will tell PEFT that bitsandbytes is not installed.

    PEFT imports bitsandbytes whenever it is installed (for its quantized LoRA layers), and bitsandbytes imports
    torch's compiler stack: 1-2 s and ~43 MB of RSS in every process (`python benchmarks/figures.py runtime`).
    bitsandbytes itself stays importable (the 8-bit AdamW imports it directly)."""
    global _HIDE_BITSANDBYTES
    _HIDE_BITSANDBYTES = True


def import_peft() -> None:
    """Import PEFT, without bitsandbytes where `hide_bitsandbytes_from_peft` was called. PEFT caches whether
    bitsandbytes exists at its first import: once imported (or bitsandbytes imported), nothing changes it."""
    if not _HIDE_BITSANDBYTES or "peft" in sys.modules or "bitsandbytes" in sys.modules:
        import peft  # noqa: F401

        return
    sys.modules["bitsandbytes"] = None  # importlib.util.find_spec answers None: PEFT sees no bitsandbytes
    try:
        from peft.import_utils import is_bnb_4bit_available, is_bnb_available

        is_bnb_available(), is_bnb_4bit_available()  # cached (lru_cache) as False: LoRA's dispatch imports no bnb
    finally:
        del sys.modules["bitsandbytes"]
