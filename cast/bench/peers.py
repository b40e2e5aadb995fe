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

import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cast.bench.benchmark import (CONFIG_DIR, MMAP_THRESHOLD, RESULT, VANILLA, Shape, Spec, _cap_address_space,
                                  cpu_peak_mb, cuda_peak_mb, failure, load_attention, time_ms)
from cast.bench.fidelity import shared_qk_attention

PEER_LENGTHS = [1024, 4096, 16384]
COLUMNS = ["mechanism", "reference", "length", "batch", "ours_ms", "ref_ms", "speed_ref_over_ours", "ours_mb",
           "ref_mb", "mem_ref_over_ours", "err_ours", "err_ref", "err_between", "exact", "matched", "status"]


@dataclass(frozen=True)
class Peer:
    """One pair. ``build`` ("module:function") takes our layer and returns the reference layer as
    an ``nn.Module`` with ``forward(x, mask)``, our weights copied into it. ``exact`` is what both
    are compared with: "softmax" or "shared-qk" (keys = normalised queries, no self). ``seeded``:
    agreement runs both in training mode from the same RNG state (so they draw the same random
    numbers); otherwise in eval mode."""

    mechanism: str
    package: str
    module: str
    reference: str
    build: str
    matched: str
    exact: str = "softmax"
    seeded: bool = False

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Reference(nn.Module):
    """A reference layer behind our calling convention, ``forward(x, mask) -> y``."""

    def __init__(self, layer: nn.Module, call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.call(self.layer, x, mask)


def copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if target.bias is not None:
            target.bias.copy_(source.bias)


def performer_reference(ours: nn.Module) -> nn.Module:
    from performer_pytorch import SelfAttention

    d = ours.d_head
    layer = SelfAttention(dim=ours.d_model, heads=ours.n_heads, dim_head=d, nb_features=ours.num_features,
                          qkv_bias=True, dropout=0.0)
    for target, source in [("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")]:
        copy_linear(getattr(layer, target), getattr(ours, source))
    with torch.no_grad():
        layer.fast_attention.projection_matrix.copy_(ours.features)
    return Reference(layer, lambda m, x, mask: m(x, mask=mask))


def reformer_reference(ours: nn.Module) -> nn.Module:
    from reformer_pytorch import LSHSelfAttention

    layer = LSHSelfAttention(dim=ours.d_model, heads=ours.n_heads, dim_head=ours.d_head, bucket_size=ours.bucket_size,
                             n_hashes=ours.n_hashes, dropout=0.0)
    with torch.no_grad():  # the reference's projections have no bias: ours lose theirs
        ours.q_proj.bias.zero_()
        ours.v_proj.bias.zero_()
        layer.toqk.weight.copy_(ours.q_proj.weight)
        layer.tov.weight.copy_(ours.v_proj.weight)
    copy_linear(layer.to_out, ours.out_proj)
    return Reference(layer, lambda m, x, mask: m(x, input_mask=mask))


def fast_transformers_reference(ours: nn.Module) -> nn.Module:
    from fast_transformers.attention import AttentionLayer, ClusteredAttention, ImprovedClusteredAttention
    from fast_transformers.masking import FullMask, LengthMask

    options = dict(clusters=ours.num_clusters, iterations=ours.iterations, bits=ours.planes.shape[1],
                   hash_bias=True, attention_dropout=0.0)
    inner = (ImprovedClusteredAttention(topk=ours.topk, **options) if hasattr(ours, "topk")
             else ClusteredAttention(**options))
    layer = AttentionLayer(inner, ours.d_model, ours.n_heads)
    for target, source in [("query_projection", "q_proj"), ("key_projection", "k_proj"),
                           ("value_projection", "v_proj"), ("out_projection", "out_proj")]:
        copy_linear(getattr(layer, target), getattr(ours, source))

    def call(m, x, mask):
        n = x.shape[1]
        lengths = LengthMask(mask.sum(1), max_len=n, device=x.device)
        return m(x, x, x, FullMask(n, device=x.device), lengths, lengths) * mask.unsqueeze(-1).to(x.dtype)

    return Reference(layer, call)


FAST_TRANSFORMERS = ("same q/k/v/out weights; same clusters, bits (with hash bias), iterations{}; "
                     "hash planes differ (each draws its own), so outputs agree in distribution")
PEERS = [
    Peer("performer", "performer-pytorch", "performer_pytorch", "performer_pytorch.SelfAttention",
         "cast.bench.peers:performer_reference",
         "same q/k/v/out weights (qkv_bias=True); our features copied into its projection_matrix; "
         "num_features -> nb_features; its stabiliser eps 1e-4 (ours 1e-6) and key shift differ"),
    Peer("reformer", "reformer-pytorch", "reformer_pytorch", "reformer_pytorch.LSHSelfAttention",
         "cast.bench.peers:reformer_reference",
         "its toqk/tov/to_out = our q/v/out weights (q/v biases zeroed: it has none); bucket_size, "
         "n_hashes; same rotations (same RNG draws); it looks back across rounds at each round's first chunk",
         exact="shared-qk", seeded=True),
    Peer("clustered", "pytorch-fast-transformers", "fast_transformers",
         "fast_transformers ClusteredAttention", "cast.bench.peers:fast_transformers_reference",
         FAST_TRANSFORMERS.format("")),
    Peer("iclustered", "pytorch-fast-transformers", "fast_transformers",
         "fast_transformers ImprovedClusteredAttention", "cast.bench.peers:fast_transformers_reference",
         FAST_TRANSFORMERS.format(", topk")),
]


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


def measure_pair(peer: Peer, length: int, args, shape: Shape, memory: dict) -> dict:
    """One row: interleaved times, peak memory (from ``memory``) and agreement of one pair at one length."""
    row = dict(mechanism=peer.mechanism, reference=peer.reference, length=length, batch=shape.batch,
               exact=peer.exact, matched=peer.matched, status="ok", **memory)
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
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    row["speed_ref_over_ours"] = ratio(row.get("ref_ms"), row.get("ours_ms"))
    row["mem_ref_over_ours"] = ratio(row.get("ref_mb"), row.get("ours_mb"))
    return row


def cpu_memory(peer: Peer, lengths: list[int], shape: Shape, args) -> dict[int, dict]:
    """{length: {"ours_mb", "ref_mb"}} measured in one subprocess (see cast.bench.benchmark)."""
    payload = dict(peer=asdict(peer), lengths=lengths, shape=asdict(shape), configs=str(args.configs),
                   seed=args.seed, threads=args.threads or torch.get_num_threads())
    results = {}
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            [sys.executable, "-m", "cast.bench.peers", json.dumps(payload)], stdout=subprocess.PIPE, stderr=err,
            text=True, env={"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, **os.environ}) as proc:
        for line in proc.stdout:
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
                results[result.pop("length")] = result
    return results


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


def peer_rows(args, peers: list[Peer] = PEERS) -> list[dict]:
    """Every (pair, length) of the run; --mechanisms keeps a subset of the pairs."""
    shape = Shape(args.batch, args.heads, args.head_dim)
    if args.mechanisms:
        keep = set(args.mechanisms.split(","))
        if unknown := keep - {p.mechanism for p in peers}:
            raise ValueError(f"--mechanisms: {sorted(unknown)} have no reference implementation; "
                             f"--peers compares {[p.mechanism for p in peers]}")
        peers = [p for p in peers if p.mechanism in keep]
    rows = []
    for peer in peers:
        memory = cpu_memory(peer, args.lengths, shape, args) if args.device == "cpu" and peer.installed() else {}
        for length in args.lengths:
            rows.append(measure_pair(peer, length, args, shape, memory.get(length, {})))
            r = rows[-1]
            print(f"[peers {length}] {peer.mechanism} vs {peer.reference}: "
                  + (f"ref/ours time {r['speed_ref_over_ours']:.2f}" if r["speed_ref_over_ours"] else r["status"]),
                  flush=True)
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
