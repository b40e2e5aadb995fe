"""ListOps generator, following the procedure of the LRA release (lra_benchmarks/data/listops.py).

A node below the maximum depth becomes an operator with probability 0.25, otherwise a digit 0-9
(a node at the maximum depth is always a digit); an operator (MIN, MAX, MED = integer part of
the median, SM = sum mod 10) takes 2..max_args arguments, drawn uniformly. Length counts an
operator twice (``[MAX`` and ``]``) and a digit once; parentheses are not counted. Trees with
``min_length < length < max_length`` are kept, duplicates dropped, and the rest split into
train/val/test in generation order.

The output reproduces the release layout: ``OUT/listops-1000/basic_{train,val,test}.tsv`` with
header ``Source<TAB>Target`` and expressions written with the release's parentheses, e.g.
``( ( ( [MAX 4 ) 3 ) ] )``.

Speed: a tree is abandoned as soon as its running length reaches ``max_length`` (such a tree
would be rejected anyway, so the accepted distribution is unchanged), and chunks of samples are
drawn in parallel, each from its own seed, so the output does not depend on the worker count.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from multiprocessing import Pool
from pathlib import Path

from rich.progress import Progress

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25
CHUNK = 500


class _TooLong(Exception):
    pass


def apply_op(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(statistics.median(args))
    return sum(args) % 10


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]):
    """Returns (string, value); ``budget[0]`` counts down the remaining allowed length."""
    if depth < max_depth and rng.random() <= VALUE_P:
        budget[0] -= 2
        if budget[0] <= 0:
            raise _TooLong
        op = rng.choice(OPERATORS)
        parts, values = [], []
        for _ in range(rng.randint(2, max_args)):
            s, v = _tree(rng, depth + 1, max_depth, max_args, budget)
            parts.append(s)
            values.append(v)
        # The release nests pairs left to right: ( ( ( [OP a ) b ) ] )
        text = f"( {op} {parts[0]} )"
        for part in parts[1:]:
            text = f"( {text} {part} )"
        return f"( {text} {END} )", apply_op(op, values)
    budget[0] -= 1
    if budget[0] <= 0:
        raise _TooLong
    value = rng.randrange(10)
    return str(value), value


def sample(rng: random.Random, min_length: int, max_length: int, max_depth: int = 10, max_args: int = 10):
    """Draw trees until one has min_length < length < max_length; returns (source, target)."""
    while True:
        budget = [max_length]
        try:
            source, value = _tree(rng, 1, max_depth, max_args, budget)
        except _TooLong:
            continue
        if max_length - budget[0] > min_length:
            return source, value


def _chunk(args) -> list[tuple[str, int]]:
    seed, chunk_index, count, min_length, max_length, max_depth, max_args = args
    rng = random.Random(f"{seed}-{chunk_index}")
    return [sample(rng, min_length, max_length, max_depth, max_args) for _ in range(count)]


def generate(
    num_samples: int,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    workers: int | None = None,
    progress: bool = True,
) -> list[tuple[str, int]]:
    """``num_samples`` distinct (source, target) pairs, identical for a seed whatever ``workers``."""
    workers = workers or os.cpu_count() or 1
    unique: dict[str, int] = {}
    chunk_index = 0
    with Progress(disable=not progress, transient=True) as bar, Pool(workers) as pool:
        task = bar.add_task("ListOps", total=num_samples)
        while len(unique) < num_samples:
            missing = num_samples - len(unique)
            jobs = [
                (seed, chunk_index + i, CHUNK, min_length, max_length, max_depth, max_args)
                for i in range(max(1, -(-missing // CHUNK)))
            ]
            chunk_index += len(jobs)
            for rows in pool.imap(_chunk, jobs):
                for source, target in rows:
                    if len(unique) < num_samples:
                        unique.setdefault(source, target)
                bar.update(task, completed=len(unique))
    return list(unique.items())


def write_release(out: str | Path, sizes: dict[str, int], **kw) -> Path:
    """Generate and write ``out/listops-1000/basic_{split}.tsv``; returns the folder."""
    rows = generate(sum(sizes.values()), **kw)
    folder = Path(out) / "listops-1000"
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in sizes.items():
        path = folder / f"basic_{split}.tsv"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{source}\t{target}\n" for source, target in rows[start : start + n])
        os.replace(tmp, path)
        start += n
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/listops", help="folder that receives listops-1000/")
    parser.add_argument("--num-train", type=int, default=96_000)
    parser.add_argument("--num-val", type=int, default=2_000)
    parser.add_argument("--num-test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-length", type=int, default=500, help="keep trees longer than this")
    parser.add_argument("--max-length", type=int, default=2000, help="keep trees shorter than this")
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def prepare(args: argparse.Namespace) -> int:
    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    folder = write_release(
        args.out, sizes, seed=args.seed, min_length=args.min_length, max_length=args.max_length,
        max_depth=args.max_depth, max_args=args.max_args, workers=args.workers,
    )
    print(f"wrote {sum(sizes.values()):,} ListOps samples to {folder}")
    return 0
