"""The memory estimator: exact parameter counts from a config, and the per-component breakdown."""
