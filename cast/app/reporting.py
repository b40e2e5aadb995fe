"""Finished runs -> accuracy tables: the LRA layout (model × task) and CAST against cluster count.

Everything comes from the run directories (results.json, and .hydra/config.yaml when present);
nothing is fetched from a network service. Vocabulary:

- a *run* is one results.json;
- a *model* is the row label: the attention's name plus the settings that tell its runs on one
  task apart, e.g. ``cast (clustering=sa_topk)`` or ``vanilla (model.n_layers=2)``; runs of one
  model on one task that differ only in the seed are the samples of one *cell*;
- a cell shows mean ± sample standard deviation (n − 1) over its finished runs, in percent.

Tables hold finished runs only: failed and unfinished ones (``status`` ``failed`` / ``running``) never
make a row, column or point; :func:`unfinished` lists them apart. Row and column order: cast.app.registry.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cast.app import registry
from cast.app.results import read_results

METRICS = ("test_acc", "val_acc_best")
MAJORITY = "test_majority_acc"   # results.json: the rate of the test set's most frequent class

# Reported test accuracy in percent, as lra.md lists it: Transformer, Reformer, Performer and
# BigBird from the LRA paper (Tay et al., ICLR 2021, Table 1), Luna-256 and S4 from their papers,
# CAST (van Engelenhoven et al., 2024) publishes its average only. "avg" is the reported five-task
# average; S4 reports a six-task one (86.09, with Path-X), so its average here is computed.
PAPER: dict[str, dict[str, float]] = {
    "Transformer (reported)": dict(listops=36.37, text=64.27, retrieval=57.46, image=42.44, pathfinder=71.40,
                                   avg=54.39),
    "Reformer (reported)": dict(listops=37.27, text=56.10, retrieval=53.40, image=38.07, pathfinder=68.50, avg=50.67),
    "Performer (reported)": dict(listops=18.01, text=65.40, retrieval=53.82, image=42.77, pathfinder=77.05, avg=51.41),
    "BigBird (reported)": dict(listops=36.05, text=64.02, retrieval=59.29, image=40.83, pathfinder=74.87, avg=55.01),
    "Luna-256 (reported)": dict(listops=37.25, text=64.57, retrieval=79.29, image=47.38, pathfinder=77.72, avg=59.37),
    "CAST (reported, average only)": dict(avg=59.32),
    "S4 (reported; not attention)": dict(listops=59.60, text=86.82, retrieval=90.90, image=88.65, pathfinder=94.20,
                                         pathx=96.35),
}

# Settings that do not change what a run learns; they never split runs into different models.
IGNORED = ("seed", "num_clusters", "data_root", "paths", "progress", "ckpt_path", "logger", "callbacks",
           "test", "compile", "optimized_metric", "attention", "hydra", "task.data_dir", "task.num_workers",
           "task.seed", "task.generate", "task.eval_batch_size", "trainer.devices", "trainer.accelerator",
           "trainer.strategy", "trainer.num_nodes", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps",
           "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.deterministic")


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    task: str
    attention: str
    settings: dict[str, Any]          # attention options (plain keys) and config values (dotted keys)
    parts: dict[str, Any] = field(default_factory=dict)  # the settings that name its model

    @property
    def status(self) -> str:
        return self.results.get("status") or "?"

    @property
    def model(self) -> str:
        return model_label(self.attention, self.parts)

    @property
    def readable(self) -> bool:
        """False for a results.json that could not be read: listed as failed, kept out of tables."""
        return "task" in self.results


@dataclass
class Cell:
    values: list[float]               # one per finished run, in percent
    mean_override: float | None = None  # one given number: an average of cells, a reported result

    @property
    def mean(self) -> float | None:
        if self.mean_override is not None:
            return self.mean_override
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    label: str
    cells: list[Cell | None]
    seeds: list[int] = field(default_factory=list)
    reference: bool = False           # a paper row: shown for comparison, never marked best
    source: str = ""                  # what its numbers are: runs, reported, data (default: by ``reference``)

    @property
    def origin(self) -> str:
        return self.source or ("reported" if self.reference else "runs")


@dataclass
class Table:
    title: str
    columns: list[str]
    keys: list[str]                   # machine names of the columns (task names, cluster counts)
    rows: list[Row]
    label_header: str = "Model"
    best_per: str = "column"          # column: best model per task | row: best cluster count per task | none

    def marked(self) -> set[tuple[int, int]]:
        """(row, column) of every best cell; reported rows never compete."""
        if self.best_per == "none":
            return set()
        means = {(i, j): c.mean for i, r in enumerate(self.rows) if not r.reference
                 for j, c in enumerate(r.cells) if c is not None and c.mean is not None}
        line = 1 if self.best_per == "column" else 0
        best: dict[int, float] = {}
        for at, mean in means.items():
            best[at[line]] = max(mean, best.get(at[line], mean))
        return {at for at, mean in means.items() if math.isclose(mean, best[at[line]])}


def model_label(attention: str, parts: dict[str, Any]) -> str:
    if not parts:
        return attention
    return f"{attention} ({', '.join(f'{k}={_short(v)}' for k, v in parts.items())})"


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def natural_key(text: str) -> list:
    """Sort 'cast (num_clusters=8)' before 'cast (num_clusters=16)'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED)


def load_run(path: Path) -> Run:
    """One results.json and what its run directory's .hydra/ says about the run."""
    try:
        results = read_results(path)
    except ValueError as error:
        results = {"status": "failed", "error": f"unreadable results.json: {error}", "attention": "?"}
    hydra_dir = path.parent / ".hydra"
    settings = dict(results.get("attention_options") or {})
    task, attention = results.get("task") or "?", results.get("attention") or "?"
    if (hydra_dir / "config.yaml").exists():
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        settings.update({k: v for k, v in _flatten(config).items() if not _ignored(k)})
    if (hydra_dir / "hydra.yaml").exists():
        # Config names are what the user typed (pathx, not the datamodule's name pathfinder), and
        # they exist even for a run that failed before its datamodule or attention was built.
        choices = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.runtime.choices") or {}
        task, attention = choices.get("task") or task, choices.get("attention") or attention
        experiment = choices.get("experiment")
        if experiment and not experiment.startswith("lra/"):  # quickstart, mini/*: columns of their own
            task = experiment
    return Run(path=path, results=results, task=task, attention=attention, settings=settings)


def collect(dirs: list[str | Path]) -> list[Run]:
    """Every run below the given run or multirun directories, labelled by model: finished runs by
    what tells them apart from each other, the others by what tells them apart from every run."""
    paths: set[Path] = set()
    for d in map(Path, dirs):
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such directory; pass run or multirun directories made by train.py")
        paths.update(p.resolve() for p in ([d] if d.is_file() else d.rglob("results.json")))
    runs = [load_run(p) for p in sorted(paths)]
    name_models(runs)
    name_models(finished(runs))
    return runs


def name_models(runs: list[Run]) -> None:
    """Label each run by the settings that vary among runs of its attention on one task."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.task, run.attention)].append(run)
    varying: dict[str, set[str]] = defaultdict(set)
    for (_, attention), members in groups.items():
        for key in set().union(*(m.settings for m in members)):
            if len({json.dumps(m.settings.get(key), sort_keys=True) for m in members}) > 1:
                varying[attention].add(key)
    for run in runs:
        keys = sorted(varying[run.attention], key=lambda k: ("." in k, k))  # attention options first
        run.parts = {k: run.settings[k] for k in keys if k in run.settings}


def finished(runs: list[Run]) -> list[Run]:
    """The runs that go into tables and plots."""
    return [r for r in runs if r.status == "ok" and r.readable]


def _cell(runs: list[Run], metric: str, scale: float = 100) -> Cell:
    return Cell([scale * r.results[metric] for r in runs if r.results.get(metric) is not None])


def _seeds(runs: list[Run]) -> list[int]:
    return sorted({r.results["seed"] for r in runs if r.results.get("seed") is not None})


def _index(order, item) -> int:
    return order.index(item) if item in order else len(order)


def _row_order(label: str, mechanisms: list[str]) -> tuple:
    return (_index(mechanisms, label.split(" ", 1)[0]), natural_key(label))


def lra_table(runs: list[Run], metric: str = "test_acc", paper: bool = True) -> Table:
    """Model × task in the LRA paper's layout, with the five-task average, the majority class of
    each column's test set and the paper's rows; the average's tasks always have a column, the
    others when they have runs."""
    runs = finished(runs)
    keys, columns, averaged = _task_columns(runs)
    lra = bool(averaged)                          # no LRA task among the runs: no average, no paper rows
    rows = [Row(label, cells + ([_average(keys, cells, averaged)] if lra else []), seeds)
            for label, cells, seeds in _model_rows(runs, keys, metric, 100)]
    # The rate of the most frequent class in each column's test set (the same for all its runs).
    majority = [_cell([r for r in runs if r.task == t], MAJORITY) for t in keys]
    if any(c.values for c in majority):
        cells = [Cell([], mean_override=c.mean) if c.values else None for c in majority]
        rows.append(Row("majority class", cells + ([None] if lra else []), reference=True, source="data"))
    if paper and lra:
        rows += [_paper_row(name, keys, averaged) for name in PAPER]
    extra = ["Avg"] if lra else []
    return Table(f"LRA accuracy (%), {metric}" if lra else f"Accuracy (%), {metric}", columns + extra,
                 keys + [e.lower() for e in extra], rows)


def time_table(runs: list[Run]) -> Table:
    """Wall time of a run in minutes (training, validation and test), model × task."""
    runs = finished(runs)
    keys, columns, _ = _task_columns(runs)
    rows = [Row(label, cells, seeds) for label, cells, seeds in _model_rows(runs, keys, "wall_time_s", 1 / 60)]
    return Table("Wall time per run (minutes)", columns, keys, rows, best_per="none")


def _task_columns(runs: list[Run]) -> tuple[list[str], list[str], set[str]]:
    """Column keys and labels (registry order, then the CPU protocols: quickstart, mini/*) and the
    tasks of the LRA average: all five have a column when any run is on an LRA task, none when
    every run is on a CPU protocol."""
    known, present = registry.tasks(), {r.task for r in runs}
    lra = any(t.name in present for t in known) or not present
    shown = [t for t in known if (lra and t.lra_average) or t.name in present]
    unknown = sorted(present - {t.name for t in known})
    averaged = {t.name for t in known if t.lra_average} if lra else set()
    return [t.name for t in shown] + unknown, [t.label for t in shown] + unknown, averaged


def _model_rows(runs: list[Run], keys: list[str], metric: str, scale: float):
    """(label, one cell per key, seeds) per model, in registry order."""
    by_model: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_model[run.model].append(run)
    mechanisms = registry.mechanisms()
    for label in sorted(by_model, key=lambda m: _row_order(m, mechanisms)):
        members = by_model[label]
        cells: list[Cell | None] = [
            _cell([r for r in members if r.task == t], metric, scale) if any(r.task == t for r in members) else None
            for t in keys
        ]
        yield label, cells, _seeds(members)


def _average(keys: list[str], cells: list[Cell | None], averaged: set[str]) -> Cell | None:
    means = [c.mean if c else None for t, c in zip(keys, cells) if t in averaged]
    if not means or any(m is None for m in means):
        return None
    return Cell([], mean_override=statistics.fmean(means))


def _paper_row(name: str, keys: list[str], averaged: set[str]) -> Row:
    scores = PAPER[name]
    cells: list[Cell | None] = [Cell([], mean_override=scores[t]) if t in scores else None for t in keys]
    avg = scores.get("avg")
    if avg is None and all(t in scores for t in averaged):
        avg = statistics.fmean(scores[t] for t in averaged)
    return Row(name, cells + [None if avg is None else Cell([], mean_override=avg)], reference=True)


def cluster_table(runs: list[Run], metric: str = "test_acc", attention: str = "cast") -> Table | None:
    """Accuracy per task (and variant) × number of clusters, from finished runs; None without such runs."""
    chosen = [r for r in finished(runs) if r.attention == attention and "num_clusters" in r.settings]
    if not chosen:
        return None
    counts = sorted({int(r.settings["num_clusters"]) for r in chosen})
    labels = {t.name: t.label for t in registry.tasks()}
    task_order = list(labels)
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in chosen:
        rest = {k: v for k, v in run.parts.items() if k != "num_clusters"}
        groups[model_label(labels.get(run.task, run.task), rest)].append(run)
    rows = []
    for label in sorted(groups, key=lambda g: (_index(task_order, groups[g][0].task), natural_key(g))):
        members = groups[label]
        cells: list[Cell | None] = []
        for count in counts:
            at = [r for r in members if int(r.settings["num_clusters"]) == count]
            cells.append(_cell(at, metric) if at else None)
        rows.append(Row(label, cells, _seeds(members)))
    return Table(f"{attention} accuracy (%) by number of clusters, {metric}", [str(c) for c in counts],
                 [str(c) for c in counts], rows, label_header="Task", best_per="row")


def unfinished(runs: list[Run]) -> list[Run]:
    """Runs that failed or never finished, in a stable order."""
    return sorted((r for r in runs if r.status != "ok"), key=lambda r: (r.task, natural_key(r.model), str(r.path)))


def fmt(cell: Cell | None) -> str:
    """A cell as text: '36.37 ± 0.52', '36.37' or '-'."""
    if cell is None or cell.mean is None:
        return "-"
    return f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
