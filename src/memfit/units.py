"""Byte units and the one way memfit prints a size ("1.23 GB": GiB, two decimals)."""

MB = 1024**2
GB = 1024**3


def format_gb(nbytes: float, *, mb_below_gb: bool = False) -> str:
    """"1.23 GB". With `mb_below_gb` (the estimate's tables, where a component may be a few MB): "512 MB" under
    a GB, and thousands separated above ("1,234.56 GB")."""
    if mb_below_gb:
        return f"{nbytes / MB:,.0f} MB" if abs(nbytes) < GB else f"{nbytes / GB:,.2f} GB"
    return f"{nbytes / GB:.2f} GB"
