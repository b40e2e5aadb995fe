"""Pathfinder generator: labels are true in the pixels, snakes are smooth, output is reproducible."""

from __future__ import annotations

import collections
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from scripts.prepare_data import main as prepare_main
from tasks import pathfinder_generator as gen
from tasks.generated import MANIFEST
from tasks.pathfinder_draw import ANGLE_STEP, Scene


def components(ink: np.ndarray, link: int) -> tuple[np.ndarray, int]:
    """Label connected inked pixels, linking pixels up to ``link`` apart in each axis (BFS)."""
    labels = np.full(ink.shape, -1)
    count = 0
    for start in zip(*np.nonzero(ink)):
        if labels[start] >= 0:
            continue
        labels[start] = count
        queue = collections.deque([start])
        while queue:
            y, x = queue.popleft()
            for yy in range(max(0, y - link), min(ink.shape[0], y + link + 1)):
                for xx in range(max(0, x - link), min(ink.shape[1], x + link + 1)):
                    if ink[yy, xx] and labels[yy, xx] < 0:
                        labels[yy, xx] = count
                        queue.append((yy, xx))
        count += 1
    return labels, count


@pytest.mark.parametrize(("resolution", "difficulty", "n", "distractors"),
                         [(32, "hard", 40, None), (32, "easy", 12, None), (32, "easy", 12, 0), (128, "hard", 2, None)])
def test_label_is_connectivity_in_the_pixels(resolution, difficulty, n, distractors):
    settings = gen.Settings.release(resolution, difficulty, distractors)
    labels = []
    for number in range(n):
        sample = gen.make_sample(settings, 11, number)
        assert sample.image.shape == (resolution, resolution) and sample.image.dtype == np.uint8
        components_of, count = components(sample.image > 0, math.ceil(sample.margin))
        ends = [components_of[int(y), int(x)] for x, y in sample.markers]
        assert min(ends) >= 0, "each marker is inked"
        assert (ends[0] == ends[1]) == bool(sample.label), f"sample {number}: label disagrees with the pixels"
        assert count == sample.num_snakes, f"sample {number}: snakes touch or one is broken"
        if distractors == 0:
            assert count == 2, "the two targets alone"
        labels.append(sample.label)
    assert 0 < sum(labels) < n


def test_snakes_follow_the_paddle_geometry():
    s = gen.Settings.release(32, "hard")
    rng = np.random.default_rng(0)
    for _ in range(50):  # a scene whose targets get stuck starts over, as in make_sample
        scene = Scene(s, rng, margin=1.0)
        ends = scene.targets()
        if ends is not None:
            break
    table = scene.table[: scene.n]
    for owner in (0, 1):
        rows = table[(table[:, Scene.OWNER] == owner) & (table[:, Scene.STROKE] > 0)]
        rows = rows[np.argsort(rows[:, Scene.INDEX])]
        assert len(rows) == s.contour_length
        seg = rows[:, Scene.SEG]
        direction = seg[:, 2:] - seg[:, :2]
        np.testing.assert_allclose(np.linalg.norm(direction, axis=1), s.paddle_length)
        np.testing.assert_allclose(np.linalg.norm(seg[1:, :2] - seg[:-1, 2:], axis=1), 1.0)
        heading = np.arctan2(direction[:, 1], direction[:, 0])
        turn = np.abs((np.diff(heading) + math.pi) % (2 * math.pi) - math.pi)
        assert turn.max() <= math.pi / 2 / s.continuity + ANGLE_STEP
        np.testing.assert_allclose(ends[owner], [seg[0, :2], seg[-1, 2:]])
    assert np.linalg.norm(ends[0, 0] - ends[1, 0]) == pytest.approx(s.seed_distance)


def test_settings_follow_the_release_rules():
    hard = gen.Settings.release(32, "hard")
    assert (hard.contour_length, hard.distractor_length, hard.num_distractors) == (14, 4, 5)
    assert (hard.paddle_length, hard.thickness, hard.margins, hard.marker_radius) == (2, 0.5, (1,), 1.5)
    assert (hard.padding, hard.seed_distance, hard.continuity) == (1, 7, 1.0)
    easy = gen.Settings.release(32, "easy")
    assert (easy.contour_length, easy.distractor_length, easy.num_distractors) == (6, 2, 10)
    assert gen.Settings.release(128, "hard").margins == (2, 3)
    assert gen.Settings.release(32, "easy", distractors=3).num_distractors == 3
    with pytest.raises(ValueError, match="distractors=-1"):
        gen.Settings.release(32, "easy", distractors=-1)
    with pytest.raises(ValueError, match="resolution=48"):
        gen.Settings.release(48)
    with pytest.raises(ValueError, match="antialias"):
        gen.Settings(antialias=2)


def test_classes_are_balanced_in_every_pair():
    labels = [gen.label_of(5, n) for n in range(400)]
    assert all(labels[i] + labels[i + 1] == 1 for i in range(0, 400, 2))
    assert labels[0::2] != [0] * 200 and labels[0::2] != [1] * 200, "pairs are in random order"


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_release_layout_is_exact_and_reproducible(tmp_path):
    assert prepare_main(["pathfinder", "--out", str(tmp_path / "a"), "--count", "7", "--batch-size", "3",
                         "--seed", "4", "--workers", "1"]) == 0
    folder = tmp_path / "a" / "pathfinder32" / "curv_contour_length_14"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["pathfinder32"]
    files = _files(folder)
    expected_images = {f"imgs/{n // 3}/sample_{n % 3}.png" for n in range(7)}
    assert set(files) == expected_images | {"metadata/0.npy", "metadata/1.npy", "metadata/2.npy", "generator.json"}
    lines = files["metadata/2.npy"].decode().splitlines()
    assert lines == [f"imgs/2 sample_0.png 0 {gen.label_of(4, 6)} 1 14 4 2 0.5 1 1"]
    image = Image.open(folder / "imgs/1/sample_2.png")
    assert image.mode == "L" and image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(image), gen.make_sample(gen.Settings.release(), 4, 5).image)

    again = gen.write_release(tmp_path / "b", count=7, seed=4, batch_size=3, workers=2, progress=False)
    assert _files(again) == files, "same seed, other worker count: identical bytes"
    other = gen.write_release(tmp_path / "c", count=7, seed=5, batch_size=3, workers=1, progress=False)
    assert _files(other) != files


def test_interrupted_generation_resumes(tmp_path):
    done = gen.write_release(tmp_path / "full", count=4, seed=2, batch_size=2, workers=1, progress=False)
    partial = tmp_path / "resumed" / "pathfinder32" / ".curv_contour_length_14.partial"
    shutil.copytree(done, partial)
    (partial / "metadata" / "1.npy").unlink()
    (partial / "imgs" / "1" / "sample_0.png").write_bytes(b"half a png")
    (partial / "imgs" / "0" / "sample_0.png").write_bytes(b"finished batch, kept")
    (partial / MANIFEST).write_text(json.dumps(gen.manifest(gen.Settings.release(), 2, 4, 2)))
    resumed = gen.write_release(tmp_path / "resumed", count=4, seed=2, batch_size=2, workers=1, progress=False)
    assert not partial.exists()
    expected = _files(done) | {"imgs/0/sample_0.png": b"finished batch, kept"}
    assert _files(resumed) == expected, "finished batches are kept, the unfinished one is redone"

    (tmp_path / "stale" / "pathfinder32" / ".curv_contour_length_14.partial" / "imgs").mkdir(parents=True)
    fresh = gen.write_release(tmp_path / "stale", count=4, seed=2, batch_size=2, workers=1, progress=False)
    assert _files(fresh) == _files(done), "a partial folder without a matching manifest starts over"
