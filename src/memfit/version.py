"""memfit's version (pyproject.toml says the same): in a module of its own, so that what records it (the cache's
keys) need not import the package's face."""

__version__ = "0.1.0"
