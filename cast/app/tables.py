"""The one writer of tables, as Markdown, LaTeX or CSV, for the report and the benchmark.

A table is a header and rows of cells, all text. Cells may carry Markdown emphasis: ``**best**``
inside a cell, a whole cell in ``*...*`` (a reported row's label); :func:`latex` turns these into
``\\textbf{}`` and ``\\emph{}``, :func:`markdown` keeps them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
       "}": r"\}", "±": r"$\pm$"}


def markdown(head: Sequence[str], body: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """The table's lines; columns whose index is in ``right`` are right-aligned."""
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]


def tex(text: str) -> str:
    """Text with LaTeX's special characters escaped and Markdown emphasis turned into LaTeX's."""
    text = re.sub("|".join(map(re.escape, TEX)), lambda m: TEX[m.group()], text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", text)
    return re.sub(r"^\*(.+)\*$", r"\\emph{\1}", text)


def latex(head: Sequence[str], body: Sequence[Sequence[str]], title: str = "",
          rule_before: Sequence[int] = ()) -> str:
    """A booktabs tabular: the first column left-aligned, the others centred; a rule above each row
    whose index is in ``rule_before``."""
    lines = ([f"% {title}"] if title else []) + [f"\\begin{{tabular}}{{l{'c' * (len(head) - 1)}}}", "\\toprule",
                                                 " & ".join(map(tex, head)) + " \\\\", "\\midrule"]
    for i, row in enumerate(body):
        if i in rule_before:
            lines.append("\\midrule")
        lines.append(" & ".join(map(tex, row)) + " \\\\")
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def write_csv(path: Path, head: Sequence[str], body: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        writer.writerows(body)


def write_records(path: Path, records: Sequence[dict], columns: Sequence[str], digits: int | None = None) -> None:
    """One line per record, the given columns; None is blank, floats to ``digits`` significant digits."""
    def text(value):
        if value is None:
            return ""
        return f"{value:.{digits}g}" if digits is not None and isinstance(value, float) else value

    write_csv(path, columns, [[text(r.get(k)) for k in columns] for r in records])
