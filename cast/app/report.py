"""Tables and plots from finished runs: the LRA table, CAST against cluster count, failures.

    python scripts/report.py outputs/multirun/2026-11-22/10-00-00_lra [more run dirs ...]
    python scripts/report.py DIR --metric val_acc_best --out reports/lra
    python scripts/report.py DIR --wandb --wandb-project cast-lra     # + a W&B leaderboard (offline)

Reads every results.json below the given run or multirun directories (no network) and writes
into --out (default: DIR/report/ of the first DIR): report.md (all tables), lra.csv, lra.tex,
clusters.csv, clusters.tex, clusters.png (accuracy against number of clusters, log2 axis, error
bars over seeds) and runs.csv (every run, failed and unfinished ones included). Tables and plots
hold finished runs only; failed and unfinished ones are listed apart, with their errors. Cells are
mean ± sample std over seeds in percent; the best of each column is bold (Markdown, LaTeX) or
starred (terminal). With --wandb the same tables go to a W&B run of job type ``report``, offline
unless --wandb-online; sync later with ``wandb sync OUT/wandb/offline-run-*``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cast.app import tables
from cast.app.reporting import METRICS, Run, Table, cluster_table, collect, fmt, lra_table, time_table, unfinished

RUN_FIELDS = ("task", "model", "attention", "seed", "status", "val_acc_best", "test_acc", "steps", "wall_time_s",
              "samples_per_s", "peak_mem_mb", "params", "run_dir", "error")


def _cells(table: Table, i: int, wrap) -> list[str]:
    """Row i's cells as text, the mean of each best cell passed through wrap (bold, star)."""
    marked = table.marked()
    texts = []
    for j, cell in enumerate(table.rows[i].cells):
        text = fmt(cell)
        if (i, j) in marked:
            mean = f"{cell.mean:.2f}"
            text = wrap(mean) + text[len(mean):]
        texts.append(text)
    return texts


def markdown(table: Table) -> str:
    head = [table.label_header, *table.columns, "Seeds"]
    body = [[f"*{row.label}*" if row.reference else row.label, *_cells(table, i, lambda s: f"**{s}**"),
             ",".join(map(str, row.seeds))] for i, row in enumerate(table.rows)]
    return "\n".join(tables.markdown(head, body, right=range(1, len(head) - 1))) + "\n"


def latex(table: Table) -> str:
    body = [[f"*{row.label}*" if row.reference else row.label, *_cells(table, i, lambda s: f"**{s}**")]
            for i, row in enumerate(table.rows)]
    first_reference = next((i for i, row in enumerate(table.rows) if row.reference), None)
    return tables.latex([table.label_header, *table.columns], body, table.title,
                        rule_before=() if first_reference is None else (first_reference,))


def write_csv(table: Table, path: Path) -> None:
    """One line per row; per column its mean, std and number of finished runs."""
    fields = ("mean", "std", "n")
    body = []
    for row in table.rows:
        values: list = [row.label, row.origin]
        for cell in row.cells:
            if cell is None:
                values += [""] * len(fields)
                continue
            derived = cell.mean_override is not None  # an average or a reported number: no run counts
            values += [_blank(cell.mean), _blank(cell.std), "" if derived else len(cell.values)]
        body.append(values + [" ".join(map(str, row.seeds))])
    header = [f"{key}_{field}" for key in table.keys for field in fields]
    tables.write_csv(path, [table.label_header.lower(), "source", *header, "seeds"], body)


def _blank(value):
    return "" if value is None else repr(value)


def write_runs(runs: list[Run], path: Path) -> None:
    records = [{**{k: run.results.get(k) for k in RUN_FIELDS}, "task": run.task, "model": run.model,
                "run_dir": str(run.path.parent)} for run in runs]
    tables.write_records(path, records, RUN_FIELDS)


def print_table(table: Table) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    shown = RichTable(title=table.title, title_justify="left")
    shown.add_column(table.label_header)
    for name in table.columns:
        shown.add_column(name, justify="right")
    for i, row in enumerate(table.rows):
        shown.add_row(row.label, *_cells(table, i, lambda s: f"{s}*"), style="dim" if row.reference else None)
    Console(width=None if sys.stdout.isatty() else 200).print(shown)


def cluster_figure(table: Table, metric: str):
    """Accuracy against number of clusters, one line per task (variant), std error bars; the
    counts on a log2 axis labelled with the integers themselves (4, 8, 16, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(k) for k in table.keys]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table.rows:
        points = [(x, c) for x, c in zip(counts, row.cells) if c is not None and c.mean is not None]
        if points:
            ax.errorbar([x for x, _ in points], [c.mean for _, c in points], yerr=[c.std or 0.0 for _, c in points],
                        marker="o", capsize=3, label=row.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("number of clusters (surrogate tokens)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_clusters(table: Table, metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = cluster_figure(table, metric)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def unfinished_markdown(runs: list[Run]) -> str:
    head = ["Task", "Model", "Seed", "Status", "Error", "Run directory"]
    body = [[run.task, run.model, str(run.results.get("seed")), run.status,
             " ".join((run.results.get("error") or "").split())[:300], str(run.path.parent)] for run in runs]
    return "\n".join(tables.markdown(head, body)) + "\n"


def wandb_tables(table: Table):
    """The table as a wandb.Table: numeric mean and std columns (percent), one line per row."""
    import wandb

    columns = ["model", "source"] + [x for name in table.columns for x in (name, f"{name} std")] + ["seeds"]
    data = []
    for row in table.rows:
        line: list = [row.label, row.origin]
        for cell in row.cells:
            line += [None, None] if cell is None else [cell.mean, cell.std]
        data.append(line + [" ".join(map(str, row.seeds))])
    return wandb.Table(columns=columns, data=data)


def log_wandb(args, lra: Table, clusters: Table | None, runs: list[Run], plot: Path | None) -> tuple[Path, bool]:
    """One W&B run holding the leaderboard; offline unless asked, never waiting for a login.

    Returns the local run directory and whether the run went online.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from cast.app.wandb_utils import has_credentials

    online = args.wandb_online and has_credentials()
    if args.wandb_online and not online:
        print("W&B: --wandb-online without credentials (WANDB_API_KEY or `wandb login`); logging offline.",
              file=sys.stderr)
    run = wandb.init(project=args.wandb_project, dir=str(args.out), job_type="report",
                     mode="online" if online else "offline", name=f"leaderboard-{args.metric}",
                     config={"metric": args.metric, "dirs": [str(d) for d in args.dirs]})
    logged = {"leaderboard": wandb_tables(lra)}
    if clusters is not None:
        logged["clusters"] = wandb_tables(clusters)
    if plot is not None:
        logged["clusters_plot"] = wandb.Image(str(plot))
    run.log(logged)
    run.summary.update({"runs": len(runs), "runs_failed": sum(r.status == "failed" for r in runs),
                        "runs_running": sum(r.status == "running" for r in runs)})
    directory = Path(run.dir).parent
    run.finish()
    return directory, online


def write_files(out: Path, metric: str, runs: list[Run], lra: Table, clusters: Table | None,
                times: Table) -> Path | None:
    """Every output file; returns the cluster plot's path when there is one."""
    out.mkdir(parents=True, exist_ok=True)
    ok = sum(r.status == "ok" for r in runs)
    sections = [f"# Report: {metric}\n", f"{len(runs)} runs: {ok} finished, {len(runs) - ok} failed or unfinished.\n",
                f"## {lra.title}\n", markdown(lra), f"## {times.title}\n", markdown(times)]
    write_csv(lra, out / "lra.csv")
    write_csv(times, out / "time.csv")
    (out / "lra.tex").write_text(latex(lra))
    plot = None
    if clusters is not None:
        plot = out / "clusters.png"
        plot_clusters(clusters, metric, plot)
        write_csv(clusters, out / "clusters.csv")
        (out / "clusters.tex").write_text(latex(clusters))
        sections += [f"## {clusters.title}\n", markdown(clusters), "![accuracy against clusters](clusters.png)\n"]
    if unfinished(runs):
        sections += ["## Failed or unfinished runs\n", unfinished_markdown(unfinished(runs))]
    write_runs(runs, out / "runs.csv")
    (out / "report.md").write_text("\n".join(sections))
    return plot


def report(args) -> int:
    runs = collect(args.dirs)
    if not runs:
        print(f"no results.json below {' '.join(map(str, args.dirs))}; pass directories made by train.py",
              file=sys.stderr)
        return 1
    lra = lra_table(runs, args.metric, paper=not args.no_paper)
    clusters = cluster_table(runs, args.metric)
    times = time_table(runs)
    plot = write_files(args.out, args.metric, runs, lra, clusters, times)
    print_table(lra)
    print_table(times)
    if clusters is not None:
        print_table(clusters)
    broken = unfinished(runs)
    if broken:
        print(f"\n{len(broken)} failed or unfinished runs:")
        for run in broken:
            print(f"  {run.status:8s} {run.task} / {run.model} seed {run.results.get('seed')}: "
                  f"{run.results.get('error') or 'no error recorded (still running or killed)'}  [{run.path.parent}]")
    print(f"\nreport: {args.out}/report.md (+ lra.csv, time.csv, .tex{', clusters.png' if plot else ''})")
    if args.wandb:
        where, online = log_wandb(args, lra, clusters, runs, plot)
        print(f"W&B: {where}" + ("" if online else f"  (offline; upload with: wandb sync {where})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run or multirun directories")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR/report of the first DIR)")
    parser.add_argument("--metric", choices=METRICS, default="test_acc")
    parser.add_argument("--no-paper", action="store_true", help="leave out the reported reference rows")
    parser.add_argument("--wandb", action="store_true", help="log the leaderboard to Weights & Biases")
    parser.add_argument("--wandb-project", default="cast-lra")
    parser.add_argument("--wandb-online", action="store_true", help="log online (needs credentials)")
    args = parser.parse_args(argv)
    args.out = args.out or args.dirs[0] / "report"
    try:
        return report(args)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
