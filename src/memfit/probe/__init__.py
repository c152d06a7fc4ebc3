"""`memfit probe`: real training steps in child processes find the largest settings that fit on this machine;
the answer is saved as a hardware profile that `train --profile` and `estimate` use.

Calling the package, `memfit.probe(...)`, is memfit.api.probe (see memfit/__init__.py); `memfit.probe.probe` runs a
ProbeJob."""

from memfit.probe.runner import ProbeJob, ProbeResult, probe

__all__ = ["ProbeJob", "ProbeResult", "probe"]
