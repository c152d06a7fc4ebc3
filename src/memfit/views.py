"""The read commands' answers on a terminal: `memfit system`, `models`, `estimate` and `recommend` as tables
(memfit.render draws the events of the commands that run something)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memfit.units import format_gb


def _sized(nbytes: float) -> str:
    return format_gb(nbytes, mb_below_gb=True)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


# --- memfit system -------------------------------------------------------------------------------------------------


def render_system(console: Console, info, context=None) -> None:
    """`memfit system` (`info`: memfit.system.detect()'s; `context`: the CUDA context measured with NVML, a
    memfit.cuda_context.ContextMeasurement, or None)."""
    table = Table(title="memfit system", show_header=False)
    table.add_row("platform", f"{info.platform} (python {info.python}, torch {info.torch})")
    table.add_row("CPUs", str(info.cpu_count))
    table.add_row("RAM", f"{_sized(info.ram_available_bytes)} available of {_sized(info.ram_total_bytes)}")
    if info.cgroup_limit_bytes:
        table.add_row("cgroup limit", f"{_sized(info.cgroup_limit_bytes)} (this process's memory cgroup: the "
                      "available RAM above is what it has left)")
    table.add_row("swap", f"{_sized(info.swap_used_bytes)} used of {_sized(info.swap_total_bytes)}")
    for gpu in info.gpus:
        table.add_row(f"GPU {gpu.index}", f"{gpu.name}: {_sized(gpu.free_bytes)} free of {_sized(gpu.total_bytes)} "
                      f"(limit {_sized(gpu.suggested_limit_bytes)}, via {gpu.source})")
    if context is not None:
        table.add_row("CUDA context", f"{_sized(context.context_bytes)} (measured with NVML on {context.gpu_name})")
    if not info.gpus:
        table.add_row("GPUs", "none (CUDA not available)")
    table.add_row("MPS", "available" if info.mps_available else "no")
    table.add_row("suggested limit", f"{_sized(info.suggested_limit_bytes)} (80% of available RAM)")
    table.add_row("default device", info.default_device())
    console.print(table)


# --- memfit models -------------------------------------------------------------------------------------------------


def _models_rows() -> tuple[list[tuple[str, list[str], list[list[str]]]], str]:
    """`memfit models`'s two tables as plain strings: (title, columns, rows) each, and the HF cache line."""
    from memfit.models import ALIASES, ARCHITECTURES
    from memfit.models.resolve import hf_hub_cache

    architectures = ("built-in architectures (--model NAME)",
                     ["name", "size", "type", "experts", "vocab", "hidden", "inter", "layers", "heads/kv", "tied",
                      "HF id"],
                     [[a.name, a.size_label, a.model_type, a.experts_label or "-", f"{a.vocab_size:,}",
                       str(a.hidden_size), str(a.intermediate_size), str(a.num_layers),
                       f"{a.num_heads}/{a.num_kv_heads}", "yes" if a.tie_embeddings else "no", a.hf_id or "-"]
                      for a in ARCHITECTURES.values()])
    aliases = ("aliases (--model ALIAS: the fine-tune in the HF repo, its architecture's shapes until downloaded)",
               ["alias", "HF id", "architecture"],
               [[alias.name, alias.hf_id, alias.architecture] for alias in ALIASES.values()])
    return [architectures, aliases], f"HF cache searched for HF ids: {hf_hub_cache()}"


def _rich_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        # Names and repo ids are what a user copies: never cut (the plain layout is used when they do not fit).
        identifier = column in ("name", "alias", "HF id", "architecture")
        table.add_column(column, no_wrap=identifier, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _plain_table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, nothing cut: the layout for pipes and narrow terminals."""
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows)]
    lines = [title]
    for cells in (columns, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    return lines


def render_models(console: Console) -> None:
    """`memfit models`: rich tables on a terminal wide enough for them; else a plain layout that never cuts a name
    or repo id."""
    from rich.measure import Measurement

    tables, cache_line = _models_rows()
    rich_tables = [_rich_table(*table) for table in tables]
    unbounded = console.options.update_width(10_000)
    fits = console.is_terminal and all(
        Measurement.get(console, unbounded, table).maximum <= console.width for table in rich_tables)
    if fits:
        for table in rich_tables:
            console.print(table)
        console.print(cache_line, soft_wrap=True, highlight=False, markup=False)
        return
    for number, table in enumerate(tables):
        if number:
            console.print("", soft_wrap=True)
        for line in _plain_table(*table):
            console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)
    console.print("", soft_wrap=True)
    console.print(cache_line, soft_wrap=True, highlight=False, markup=False)


# --- memfit estimate -----------------------------------------------------------------------------------------------


def render_estimate(console: Console, found) -> None:
    """`memfit estimate`: the breakdown table, the verdict, the notes and what to change (`found`: what
    memfit.api.estimate returned)."""
    result = found.estimate
    console.print(_breakdown_table(found))
    console.print(f"trainable params: {result.trainable_params:,} of {result.params:,}")
    if result.hardware.device == "cuda":
        # torch.cuda.max_memory_allocated / max_memory_reserved, and what nvidia-smi shows (README: which to compare)
        console.print(f"peaks: allocated {_sized(result.allocated_peak_bytes)} · reserved "
                      f"{_sized(result.reserved_peak_bytes)} · process (nvidia-smi) {_sized(result.process_bytes)}",
                      highlight=False)
        if result.host is not None:
            _print_host(console, result)
    _print_verdict(console, found)
    if result.host_offload_bytes:
        console.print(f"CPU RAM for offloaded states: {_sized(result.host_offload_bytes)}")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")
    if found.advice:
        _print_advice(console, found.advice)


def _print_host(console: Console, result) -> None:
    """Host RAM beside the GPU (memfit.estimate.host): one process's peak, what --max-host-memory sees, and the
    machine's with every rank on it."""
    host, gpus = result.host, result.hardware.num_gpus
    console.print(f"host RAM: peak {_sized(host.peak_bytes)} ({host.peak_phase}) per process · "
                  f"{_sized(host.machine_peak_bytes)} machine" + (f" ({gpus} ranks)" if gpus > 1 else "")
                  + " · " + ", ".join(f"{name} {_sized(size)}" for name, size in host.phases.items()),
                  highlight=False)


def _breakdown_table(found) -> Table:
    """The per-device components with their shares, the total and the device's memory."""
    result, resolved = found.estimate, found.model
    config, hardware = result.config, result.hardware
    sharding = "FSDP" if hardware.engine == "fsdp" else f"ZeRO-{hardware.zero}"
    where = f"{hardware.device}" + (f" x{hardware.num_gpus}, {sharding}" if hardware.num_gpus > 1 else "")
    title = (f"{resolved.name} ({_count(result.params)} params, {resolved.source}) · {config.method} · "
             f"{result.precision} · batch {config.batch_size} × seq {config.seq_len} · {where}")
    table = Table(title=title)
    table.add_column("component")
    table.add_column("per device", justify="right")
    table.add_column("share", justify="right")
    total = result.total_bytes
    for name, nbytes in result.breakdown.items():
        table.add_row(name, _sized(nbytes), f"{100 * nbytes / total:.0f}%" if total else "-")
    if result.load_peak_bytes:
        table.add_row("training step", _sized(result.training_bytes), "")
        table.add_row("loading peak", _sized(result.load_peak_bytes), "")
    table.add_row("[bold]total[/bold]", f"[bold]{_sized(total)}[/bold]", "")
    table.add_row("device memory", _sized(hardware.memory_bytes), "")
    return table


def _print_verdict(console: Console, found) -> None:
    """Fits or not, the largest batch, and with --target-batch the flags that make it up."""
    result, largest, hardware = found.estimate, found.largest_batch, found.estimate.hardware
    verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
    largest_text = f"largest batch that fits: {largest}" if largest else "[red]not even batch 1 fits[/red]"
    console.print(f"{verdict}: {_sized(result.total_bytes)} of {_sized(hardware.memory_bytes)}; {largest_text}")
    if found.target_batch:
        micro_batch, grad_accum = found.micro_batch, found.grad_accum
        why = (f"the largest micro-batch that fits is {largest}" if largest
               else "not even batch 1 fits: see what to change")
        console.print(f"target batch {found.target_batch}: --batch-size {micro_batch} --grad-accum {grad_accum}"
                      f" × {hardware.num_gpus} device(s) = {micro_batch * grad_accum * hardware.num_gpus} ({why})",
                      highlight=False)


def _print_advice(console: Console, advice: list) -> None:
    """The cheapest change that fits (or that none does), then every change tried, cheapest first."""
    best = advice[0]
    if best.fits:
        console.print(f"[bold]cheapest change that fits:[/bold] {escape(best.change)} → {_sized(best.total_bytes)}, "
                      f"batch up to {best.max_batch_size}", soft_wrap=True, highlight=False)
    else:
        console.print("no change or combination of up to three changes fits: the single changes below save "
                      "the most", soft_wrap=True, highlight=False)
    table = Table(title="what to change (cheapest first: changes that keep the math before those that alter "
                        "the training)")
    for column in ("change", "why", "saves", "total", "fits", "batch up to"):
        table.add_column(column)
    for item in advice:
        table.add_row(escape(item.change), item.why, _sized(item.saving_bytes), _sized(item.total_bytes),
                      "[green]yes[/green]" if item.fits else "no", str(item.max_batch_size) if item.fits else "-")
    console.print(table)


# --- memfit recommend ----------------------------------------------------------------------------------------------


def render_recommend(console: Console, found) -> None:
    """`memfit recommend` (`found`: what memfit.api.recommend returned): one row per built-in size, one column per
    method, then the largest size of each method; on a Mac, that for each engine with what it supports."""
    if found.hardware is None:
        mac = found.sizes
        console.print(f"a Mac with {_sized(mac['unified_memory_bytes'])}: {mac['working_set']}", soft_wrap=True)
        for name, sizes in mac["engines"].items():
            _recommend_table(console, sizes, f"{name} · ", found.config.seq_len)
            console.print(f"[dim]{mac['support'][name]}[/dim]", soft_wrap=True, highlight=False)
        return
    _recommend_table(console, found.sizes, "", found.config.seq_len)


def _recommend_table(console: Console, sizes: dict[str, Any], prefix: str, seq_len: int) -> None:
    table = Table(title=f"{prefix}what fits in {_sized(sizes['memory_bytes'])} on {sizes['device']} "
                        f"(seq {seq_len}, {sizes['precision']})")
    table.add_column("model")
    table.add_column("params", justify="right")
    for method in sizes["methods"]:
        table.add_column(f"{method}: total @ batch 1 → largest batch", justify="right")
    for row in sizes["models"]:
        cells = []
        for method in sizes["methods"]:
            entry: dict[str, Any] = row["methods"][method]
            mark = "[green]✓[/green]" if entry["fits"] else "[red]✗[/red]"
            cells.append(f"{mark} {_sized(entry['total_bytes'])} → {entry['max_batch_size']}")
        table.add_row(row["model"], row["size"], *cells)
    console.print(table)
    for method in sizes["methods"]:
        best = sizes["largest"][method]
        console.print(f"largest for {method}: {best or 'none of the built-in sizes'}")
