"""scripts/bench.py --peers: the table logic with a stand-in reference (no package needed), a
missing package and a broken reference; the pure-Python references where installed."""

from __future__ import annotations

import argparse

import pytest
import torch

import cast.bench.cli as bench
import cast.bench.peers as peers
from cast.attention.vanilla import VanillaAttention
from cast.bench.benchmark import CONFIG_DIR
from cast.bench.peers import agreement, inputs, peer_rows, peers_markdown
from cast.bench.references import PEERS, Peer, resolve

TINY = dict(lengths=[128], batch=1, heads=2, head_dim=8, repeats=2, warmup=1, min_time_ms=1.0, device="cpu",
            threads=1, configs=CONFIG_DIR, seed=0, mechanisms=None)


def twin_reference(ours):
    """A stand-in reference: vanilla attention with our weights, so everything must agree."""
    twin = VanillaAttention(ours.d_model, ours.n_heads)
    twin.load_state_dict(ours.state_dict())
    return twin


def broken_reference(ours):
    raise RuntimeError("deliberately broken")


TWIN = Peer("vanilla", "torch", "torch", "twin", "tests.bench.test_peers:twin_reference", "same weights")
MISSING = Peer("vanilla", "no-such-package", "no_such_module_for_peers", "absent", TWIN.build, "n/a")
BROKEN = Peer("vanilla", "torch", "torch", "broken", "tests.bench.test_peers:broken_reference", "n/a")


def test_rows_hold_ratios_memory_and_agreement_and_missing_packages_are_skipped():
    twin, missing, broken = peer_rows(argparse.Namespace(**TINY), [TWIN, MISSING, BROKEN])
    assert twin["status"] == "ok"
    assert twin["err_ours"] == twin["err_ref"] == twin["err_between"] == 0
    assert twin["speed_ref_over_ours"] == pytest.approx(twin["ref_ms"] / twin["ours_ms"])
    # Peak memory from the worker process: the same layer twice needs the same memory.
    assert twin["ours_mb"] > 0 and 0.5 < twin["mem_ref_over_ours"] < 2
    assert missing["status"] == "skipped: no-such-package not installed" and missing["speed_ref_over_ours"] is None
    assert broken["status"].startswith("error: RuntimeError: deliberately broken")
    table = peers_markdown([twin, missing, broken], ["# header", ""])
    assert "| vanilla | twin | 128 |" in table and "skipped: no-such-package not installed" in table
    assert table.count("\n| vanilla |") == 3


def test_cli_writes_the_peers_table_and_refuses_unknown_pairs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "PEERS", [TWIN, MISSING])
    monkeypatch.setattr(peers, "cpu_memory", lambda *args: {})  # the test above runs the memory worker
    argv = ["--peers", "--lengths", "64", "--batch", "1", "--heads", "2", "--head-dim", "8", "--repeats", "1",
            "--threads", "1", "--min-time-ms", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    csv_text = (tmp_path / "peers.csv").read_text()
    assert csv_text.startswith(",".join(peers.COLUMNS)) and "skipped: no-such-package not installed" in csv_text
    table = (tmp_path / "peers.md").read_text()
    assert "| vanilla | twin | 64 |" in table and "- model:" not in table  # the layer only, no model line
    assert bench.main(argv + ["--mechanisms", "cast"]) == 2
    assert "['cast'] have no reference implementation" in capsys.readouterr().err


def pair(name: str, n: int, **options):
    """Our layer with ``options`` and the named reference built from it, with inputs of length n."""
    peer = next(p for p in PEERS if p.mechanism == name)
    torch.manual_seed(0)
    cls = {"performer": "cast.attention.performer:PerformerAttention",
           "reformer": "cast.attention.reformer:ReformerAttention"}[name]
    ours = resolve(cls)(64, 2, **options)
    ref = resolve(peer.build)(ours)
    x, mask, _ = inputs(peers.Shape(2, 2, 32), n, "cpu", 0)
    return agreement(peer, ours, ref, x.detach(), mask, 0)


def test_reformer_reference_hashes_like_ours():
    pytest.importorskip("reformer_pytorch")
    # One round: the same rotations give the same buckets, chunks and outputs.
    assert pair("reformer", 256, bucket_size=32, n_hashes=1)["err_between"] < 1e-5
    # Two rounds: it also looks back from each round's first chunk into the round before.
    two = pair("reformer", 256, bucket_size=32, n_hashes=2)
    assert 1e-4 < two["err_between"] and abs(two["err_ours"] - two["err_ref"]) < 0.05


def test_performer_reference_with_our_features_is_close():
    pytest.importorskip("performer_pytorch")
    # The same features: only its stabiliser (1e-4 against our 1e-6) and its key shift differ.
    errors = pair("performer", 256, num_features=256)
    assert errors["err_between"] < 0.1 and abs(errors["err_ours"] - errors["err_ref"]) < 0.05
