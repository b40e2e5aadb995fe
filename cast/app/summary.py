"""The table printed at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_summary(results: dict[str, Any]) -> None:
    table = Table(title=f"{results['task']} / {results['attention']} (seed {results['seed']})")
    for column in ("val acc (best)", "test acc", "majority class", "steps", "samples/s", "params"):
        table.add_column(column, justify="right")
    rate = results.get("samples_per_s")
    table.add_row(
        _pct(results.get("val_acc_best")),
        _pct(results.get("test_acc")),
        _pct(results.get("test_majority_acc")),
        str(results.get("steps")),
        "-" if rate is None else f"{rate:.1f}",
        f"{results.get('params') or 0:,}",
    )
    Console().print(table)
    print(f"results: {results['run_dir']}/results.json")
