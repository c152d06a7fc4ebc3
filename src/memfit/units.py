"""Byte units and the one way memfit prints a size ("1.23 GB": GiB, two decimals)."""

MB = 1024**2
GB = 1024**3


def format_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"
