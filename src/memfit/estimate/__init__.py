"""The memory estimator: exact parameter counts from a config, and the per-component breakdown.

Calling the package, `memfit.estimate(...)`, is memfit.api.estimate (memfit.calls)."""

from memfit.calls import make_callable

make_callable(__name__)
