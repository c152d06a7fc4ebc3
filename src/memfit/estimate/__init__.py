"""The memory estimator: exact parameter counts from a config, and the per-component breakdown.

Calling the package, `memfit.estimate(...)`, is memfit.api.estimate (see memfit/__init__.py)."""
