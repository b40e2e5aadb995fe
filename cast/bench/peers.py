"""Peers mode of scripts/bench.py: each mechanism against its public reference implementation.

    python scripts/bench.py --peers                          # 1K, 4K, 16K; every installed reference
    python scripts/bench.py --peers --mechanisms performer --lengths 1K

A pair is our layer (its configs/attention/*.yaml with its defaults) and the reference's layer
built with the same options and our weights copied into it (``Peer.matched`` says what else was
matched). Both run one forward + backward of the attention layer on the same inputs; per length
they are warmed up, then timed in turn with the order alternating (cast.bench.benchmark.time_ms),
and their peak memory is measured in a subprocess (cast.bench.benchmark.cpu_peak_mb on CPU).
Agreement: one forward pass of each, compared with exact attention through our projections and
with each other (relative Frobenius error). A reference whose package is missing is a
``skipped`` row. Outputs in --out: peers.csv and peers.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from cast.bench.benchmark import (CONFIG_DIR, MMAP_THRESHOLD, RESULT, VANILLA, Shape, Spec, _cap_address_space,
                                  cpu_peak_mb, cuda_peak_mb, failure, load_attention, time_ms)
from cast.bench.fidelity import shared_qk_attention
from cast.bench.references import PEERS, Peer, resolve

PEER_LENGTHS = [1024, 4096, 16384]
COLUMNS = ["mechanism", "reference", "length", "batch", "ours_ms", "ref_ms", "speed_ref_over_ours", "ours_mb",
           "ref_mb", "mem_ref_over_ours", "err_ours", "err_ref", "err_between", "exact", "matched", "status"]


def build_pair(peer: Peer, shape: Shape, device: str, config_dir: Path = CONFIG_DIR, seed: int = 0):
    """Our layer and the reference's, on ``device``, in training mode."""
    torch.manual_seed(seed)
    d_model = shape.heads * shape.head_dim
    ours = load_attention(Spec(peer.mechanism), config_dir)(d_model=d_model, n_heads=shape.heads, dropout=0.0,
                                                            qkv_dim=d_model)
    ref = resolve(peer.build)(ours)
    return ours.to(device).train(), ref.to(device).train()


def inputs(shape: Shape, length: int, device: str, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    d_model = shape.heads * shape.head_dim
    x = torch.randn(shape.batch, length, d_model, generator=g).to(device).requires_grad_()
    grad = torch.randn(shape.batch, length, d_model, generator=g).to(device)
    return x, torch.ones(shape.batch, length, dtype=torch.bool, device=device), grad


def step_of(layer: nn.Module, x: Tensor, mask: Tensor, grad: Tensor):
    def step() -> None:
        layer(x, mask).backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def relative(a: Tensor, b: Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@torch.no_grad()
def agreement(peer: Peer, ours: nn.Module, ref: nn.Module, x: Tensor, mask: Tensor, seed: int) -> dict:
    """Relative errors of ours and the reference against exact attention, and between them."""
    outputs = []
    for layer in (ours, ref):
        layer.train(peer.seeded)
        torch.manual_seed(seed)
        outputs.append(layer(x, mask))
        layer.train()
    if peer.exact == "shared-qk":
        exact = shared_qk_attention(ours, x, mask)
    else:
        vanilla = load_attention(VANILLA)(d_model=ours.d_model, n_heads=ours.n_heads, qkv_dim=ours.qkv_dim)
        vanilla.load_state_dict(ours.state_dict(), strict=False)
        exact = vanilla.to(x.device).eval()(x, mask)
    return dict(err_ours=relative(outputs[0], exact), err_ref=relative(outputs[1], exact),
                err_between=relative(outputs[0], outputs[1]))


def measure_pair(peer: Peer, length: int, args, shape: Shape) -> dict:
    """One row: agreement and interleaved times of one pair at one length (CUDA: peak memory too)."""
    row = dict(mechanism=peer.mechanism, reference=peer.reference, length=length, batch=shape.batch,
               exact=peer.exact, matched=peer.matched, status="ok")
    try:
        if not peer.installed():
            raise ModuleNotFoundError(peer.module)
        ours, ref = build_pair(peer, shape, args.device, args.configs, args.seed)
        x, mask, grad = inputs(shape, length, args.device, args.seed)
        row.update(agreement(peer, ours, ref, x.detach(), mask, args.seed))
        steps = {"ours": step_of(ours, x, mask, grad), "ref": step_of(ref, x, mask, grad)}
        iters = {}
        for name, step in steps.items():
            time_ms(step, args.warmup, args.device)
            iters[name] = max(1, min(100, round(args.min_time_ms / max(time_ms(step, 1, args.device), 1e-3))))
            if args.device != "cpu":
                row[f"{name}_mb"] = cuda_peak_mb(step, args.device)
        times = {name: [] for name in steps}
        for repeat in range(args.repeats):
            for name in (["ours", "ref"] if repeat % 2 == 0 else ["ref", "ours"]):
                steps[name]()  # untimed: the step before belonged to the other layer
                times[name].append(time_ms(steps[name], iters[name], args.device))
        row.update({f"{name}_ms": statistics.median(ts) for name, ts in times.items()})
    except ModuleNotFoundError as exc:
        row["status"] = f"skipped: {peer.package} not installed" if exc.args == (peer.module,) else failure(exc)
    except Exception as exc:
        row["status"] = failure(exc)
    return row


def add_ratios(row: dict) -> None:
    """The reference's time and memory over ours (None where either is missing)."""
    for key, a, b in [("speed_ref_over_ours", "ref_ms", "ours_ms"), ("mem_ref_over_ours", "ref_mb", "ours_mb")]:
        row[key] = row[a] / row[b] if row.get(a) is not None and row.get(b) else None


def cpu_memory(peer: Peer, lengths: list[int], shape: Shape, args) -> dict[int, dict]:
    """{length: {"ours_mb", "ref_mb"}} measured in one subprocess (see cast.bench.benchmark)."""
    payload = dict(peer=asdict(peer), lengths=lengths, shape=asdict(shape), configs=str(args.configs),
                   seed=args.seed, threads=args.threads or torch.get_num_threads())
    # A failure shows in the timing run, so the worker's stderr is not kept.
    with subprocess.Popen([sys.executable, "-m", "cast.bench.peers", json.dumps(payload)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True,
                          env={"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, **os.environ}) as proc:
        lines = [json.loads(line[len(RESULT):]) for line in proc.stdout if line.startswith(RESULT)]
    return {result.pop("length"): result for result in lines}


def worker(payload: dict) -> None:
    """Subprocess side of :func:`cpu_memory`: one result line per length on stdout."""
    _cap_address_space()
    torch.set_num_threads(payload["threads"])
    peer, shape = Peer(**payload["peer"]), Shape(**payload["shape"])
    for length in payload["lengths"]:
        result = {"length": length}
        try:
            ours, ref = build_pair(peer, shape, "cpu", Path(payload["configs"]), payload["seed"])
            x, mask, grad = inputs(shape, length, "cpu", payload["seed"])
            for name, layer in (("ours", ours), ("ref", ref)):
                result[f"{name}_mb"] = cpu_peak_mb(step_of(layer, x, mask, grad))
        except Exception:
            pass  # the timing run records the failure
        ours = ref = x = grad = None
        print(RESULT + json.dumps(result), flush=True)


def peer_rows(args, peers: list[Peer] | None = None) -> list[dict]:
    """Every (pair, length) of the run (default: every pair of PEERS); --mechanisms keeps a subset."""
    shape, peers = Shape(args.batch, args.heads, args.head_dim), peers or PEERS
    if args.mechanisms:
        keep = set(args.mechanisms.split(","))
        if unknown := keep - {p.mechanism for p in peers}:
            raise ValueError(f"--mechanisms: {sorted(unknown)} have no reference implementation; "
                             f"--peers compares {[p.mechanism for p in peers]}")
        peers = [p for p in peers if p.mechanism in keep]
    rows = []
    for peer in peers:
        pair_rows = [measure_pair(peer, length, args, shape) for length in args.lengths]
        measured = [r["length"] for r in pair_rows if r["status"] == "ok"]
        if args.device == "cpu" and measured:
            memory = cpu_memory(peer, measured, shape, args)
            for r in pair_rows:
                r.update(memory.get(r["length"], {}))
        for r in pair_rows:
            add_ratios(r)
            print(f"[peers {r['length']}] {peer.mechanism} vs {peer.reference}: "
                  + (f"ref/ours time {r['speed_ref_over_ours']:.2f}" if r["speed_ref_over_ours"] else r["status"]),
                  flush=True)
        rows += pair_rows
    return rows


def peers_markdown(rows: list[dict], lines: list[str]) -> str:
    """The peers table under the run's header ``lines`` (cast.bench.report.header)."""
    from cast.bench.report import length_label, markdown_table

    def number(value, fmt):
        return "–" if value is None else format(value, fmt)

    head = ["mechanism", "reference", "length", "ours ms", "ref / ours time", "ours MB", "ref / ours memory",
            "error ours", "error ref", "ours vs ref", "matched"]
    body = [[r["mechanism"], r["reference"], length_label(r["length"])]
            + ([number(r.get("ours_ms"), ".1f"), number(r.get("speed_ref_over_ours"), ".2f"),
                number(r.get("ours_mb"), ".1f"), number(r.get("mem_ref_over_ours"), ".2f"),
                number(r.get("err_ours"), ".3g"), number(r.get("err_ref"), ".3g"), number(r.get("err_between"), ".3g")]
               if r["status"] == "ok" else [r["status"]] + [""] * 6) + [r["matched"]] for r in rows]
    note = ("Ratios are the reference's over ours: above 1, ours is faster (leaner). Errors: relative Frobenius "
            "error of one forward pass against exact attention through our projections (softmax, or shared-QK "
            "softmax for reformer), and between the two.")
    return "\n".join(lines + [note, ""] + markdown_table(head, body)) + "\n"


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
