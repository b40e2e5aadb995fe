"""scripts/visualize.py: cluster pictures of a trained CAST run, and sample grids of a task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cast.app import registry
from cast.app.run import load_run, train
from tests.conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

import cast.app.visualize as visualize


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes().startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_memberships_drop_the_cls_token_and_invalid_slots():
    index = torch.tensor([[0, 1, 2], [3, 3, 4]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    member = visualize.memberships(index, valid, length=4, offset=1)
    np.testing.assert_array_equal(member, [[1, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(visualize.memberships(index, valid, 5, 0), [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0]])


def test_image_side_only_for_square_image_tasks():
    facts = {t.name: t.is_image for t in registry.tasks()}
    assert {name for name, image in facts.items() if image} == {"image", "pathfinder", "pathx"}
    assert visualize.image_side(facts["image"], 1024) == 32
    assert visualize.image_side(facts["pathx"], 128 * 128) == 128
    assert visualize.image_side(facts["listops"], 1024) is None
    assert visualize.image_side(False, 64, layout="image") == 8
    assert visualize.image_side(True, 1000) is None
    with pytest.raises(SystemExit, match="not a square"):
        visualize.image_side(False, 60, layout="image")


def test_cluster_matrix_ticks_are_whole_clusters():
    member = (np.random.default_rng(0).random((16, 64)) < 0.2).astype(np.float32)
    fig = visualize.text_clusters_figure(member, np.ones(64, bool), "t")
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    plt.close(fig)
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks), ticks


def test_samples_land_under_outputs_visualize(listops_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert visualize.main(["samples", "task=listops", f"task.data_dir={listops_dir}", "task.max_length=64",
                           "--n", "2"]) == 0
    assert list(tmp_path.glob("*.png")) == []
    png_size(tmp_path / "outputs" / "visualize" / "samples_listops_train.png")


def test_drawings_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    member = (rng.random((6, 64)) < 0.2).astype(np.float32)
    visualize.draw_image_clusters(rng.integers(0, 256, (8, 8)), member, rng.random(64), "t", tmp_path / "c.png")
    visualize.draw_text_clusters(member, rng.random(64) < 0.8, "t", tmp_path / "t.png")
    visualize.draw_samples(rng.integers(0, 256, (5, 64)), np.arange(5), 8, "t", tmp_path / "s.png")
    visualize.draw_samples(rng.integers(0, 20, (3, 64)), np.arange(3), None, "t", tmp_path / "strips.png")
    for name in ("c", "t", "s", "strips"):
        assert min(png_size(tmp_path / f"{name}.png")) > 100


@pytest.mark.slow
def test_samples_of_generated_pathfinder_from_the_command_line(tmp_path):
    out = tmp_path / "samples.png"
    done = subprocess.run(
        [sys.executable, "scripts/visualize.py", "samples", "task=pathfinder", f"task.data_dir={tmp_path / 'pf'}",
         "task.generate=true", "task.generate_count=30", "task.decode_workers=1", "--n", "9", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    width, height = png_size(out)
    assert 0.7 < width / height < 1.4  # a 3 × 3 grid of square images, not a column of strips


def trained(tiny_cfg, tmp_path, attention: str) -> Path:
    """A tiny trained run with its .hydra/config.yaml, as train.py leaves it."""
    run_dir = tmp_path / attention
    cfg = tiny_cfg(f"attention={attention}", run_dir=run_dir)
    assert train(cfg)["status"] == "ok"
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.mark.slow
def test_clusters_of_a_trained_cast_run(tiny_cfg, tmp_path):
    run_dir = trained(tiny_cfg, tmp_path, "cast")
    _, datamodule, lit, checkpoint = load_run(run_dir)
    assert checkpoint.name == "best.ckpt"
    batch = visualize.first_batch(datamodule, "test", 2)
    layers = visualize.record(lit.model, batch, run_dir)
    clusters = layers[0].last_clusters
    assert clusters.index.shape[:3] == (2, 2, 4)  # B, h, Nc (TINY: num_clusters=4)
    assert layers[0].last_gates.shape == (2, 2, 65)  # CLS + 64 tokens

    text, image = tmp_path / "text.png", tmp_path / "image.png"
    assert visualize.main(["clusters", str(run_dir), "--out", str(text)]) == 0
    # TINY truncates ListOps to 64 tokens, an 8 × 8 grid: the image drawing on real clusters.
    assert visualize.main(["clusters", str(run_dir), "--layout", "image", "--out", str(image), "--sample", "1"]) == 0
    png_size(text), png_size(image)


@pytest.mark.slow
def test_clusters_of_a_run_without_clusters_says_so(tiny_cfg, tmp_path):
    run_dir = trained(tiny_cfg, tmp_path, "vanilla")
    with pytest.raises(SystemExit, match="only CAST runs"):
        visualize.main(["clusters", str(run_dir), "--out", str(tmp_path / "x.png")])
