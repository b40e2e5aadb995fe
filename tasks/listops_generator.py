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

Settings that cannot give trees (min_length >= max_length - 1, or lengths the grammar rarely or
never reaches, such as ``min_length=500`` with ``max_depth=5``) fail at once: :func:`check_settings`
computes the exact probability that a drawn tree is kept, from the distribution of tree lengths.
A folder is written with its settings in ``generator.json`` (:mod:`tasks.generated`), and one
generated with other settings is replaced.

Speed: a tree is abandoned as soon as its running length reaches ``max_length`` (such a tree
would be rejected anyway, so the accepted distribution is unchanged), and chunks of samples are
drawn in parallel, each from its own seed, so the output does not depend on the worker count.
"""

from __future__ import annotations

import os
import random
import statistics
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from rich.progress import Progress

from tasks import generated

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25
CHUNK = 500
FOLDER = "listops-1000"
MAX_DRAWS = 1000  # drawn trees per kept one beyond which settings are refused as impractical
NAMES = {"min_length": "--min-length", "max_length": "--max-length", "max_depth": "--max-depth",
         "max_args": "--max-args"}


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


def keep_probability(min_length: int, max_length: int, max_depth: int = 10, max_args: int = 10) -> float:
    """The probability that one drawn tree has min_length < length < max_length.

    Exact, from the distribution of the length of a tree rooted at each depth: a digit (length
    1) with probability 1 - VALUE_P, else an operator (length 2) over k = 2..max_args uniformly
    drawn subtrees one level deeper, whose lengths add: a convolution, cut at max_length.
    """
    lengths = np.zeros(max_length)
    lengths[1] = 1.0  # a node at max_depth is a digit
    for _ in range(max_depth - 1):
        children, power = np.zeros(max_length), lengths
        for _ in range(2, max_args + 1):
            power = np.convolve(power, lengths)[:max_length]
            children += power
        lengths = np.zeros(max_length)
        lengths[2:] = children[:-2] * VALUE_P / (max_args - 1)
        lengths[1] += 1 - VALUE_P
    return float(lengths[min_length + 1 :].sum())


def check_settings(min_length: int, max_length: int, max_depth: int = 10, max_args: int = 10,
                   names: dict[str, str] = NAMES) -> None:
    """ValueError naming the setting when these settings give no trees, or too rarely to wait for."""
    values = {"min_length": min_length, "max_length": max_length, "max_depth": max_depth, "max_args": max_args}
    shown = {key: f"{names[key]}={value}" for key, value in values.items()}
    if max_depth < 1 or max_args < 2 or min_length < 0:
        raise ValueError(f"{shown['max_depth']}, {shown['max_args']}, {shown['min_length']}: "
                         "need a depth >= 1, at least 2 arguments and a length >= 0")
    if max_length - min_length < 2:
        raise ValueError(f"{shown['min_length']} and {shown['max_length']}: trees are kept when "
                         "min < length < max, so max must exceed min by at least 2")
    draws = 1 / p if (p := keep_probability(min_length, max_length, max_depth, max_args)) > 0 else float("inf")
    if draws > MAX_DRAWS:
        raise ValueError(
            f"{shown['min_length']}, {shown['max_length']} with {shown['max_depth']} and {shown['max_args']}: "
            f"only one tree in {draws:.3g} has such a length (at most {MAX_DRAWS} allowed); "
            f"lower {names['min_length']} or raise {names['max_depth']}"
        )


def manifest(sizes: dict[str, int], seed: int, min_length: int, max_length: int, max_depth: int,
             max_args: int = 10) -> dict:
    """The settings that determine a generated folder, as its generator.json records them."""
    return {"generator": "listops", "sizes": dict(sizes), "seed": seed, "min_length": min_length,
            "max_length": max_length, "max_depth": max_depth, "max_args": max_args}


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
    check_settings(min_length, max_length, max_depth, max_args)
    workers = workers or os.cpu_count() or 1
    unique: dict[str, int] = {}
    chunk_index = 0
    # The pool forks its workers before the progress bar starts its refresh thread: a fork while
    # that thread holds a lock leaves the lock held in the worker, which then hangs.
    with Pool(workers) as pool, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ListOps", total=num_samples)
        while len(unique) < num_samples:
            missing, before = num_samples - len(unique), len(unique)
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
            if len(unique) == before:  # a whole round of draws found nothing new: the lengths allow no more
                raise ValueError(f"min_length={min_length}, max_length={max_length}, max_depth={max_depth} allow "
                                 f"only {before} distinct trees, fewer than the {num_samples} asked for; "
                                 "widen the lengths or ask for fewer samples")
    return list(unique.items())


def write_release(out: str | Path, sizes: dict[str, int], seed: int = 0, min_length: int = 500,
                  max_length: int = 2000, max_depth: int = 10, max_args: int = 10, workers: int | None = None,
                  progress: bool = True) -> Path:
    """Generate ``out/listops-1000/basic_{split}.tsv`` and its generator.json; returns the folder.

    A folder already generated with these settings is kept as it is, one generated with others is
    replaced, and one without generator.json (the LRA release's) raises DataFormatError.
    """
    final = Path(out) / FOLDER
    settings = manifest(sizes, seed, min_length, max_length, max_depth, max_args)
    if generated.is_current(final, settings, "ListOps"):
        return final
    rows = generate(sum(sizes.values()), seed, min_length, max_length, max_depth, max_args, workers, progress)
    work = generated.staging(final)
    work.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in sizes.items():
        with open(work / f"basic_{split}.tsv", "w") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{source}\t{target}\n" for source, target in rows[start : start + n])
        start += n
    return generated.publish(work, final, settings)
