"""memfit: fine-tune LLMs that fit — estimate, probe, train with a memory guard, report."""

__version__ = "0.1.0"
