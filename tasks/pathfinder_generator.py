"""Pathfinder stimuli (Linsley et al., NeurIPS 2018), from the description of drewlinsley/pathfinder.

A black canvas holds two target snakes of ``contour_length`` paddles, shorter distractor snakes and
two disk markers. Label 1: the markers sit on the two ends of one snake; label 0: on ends of the two
different target snakes. Names of the original code, mapped to the names here:

    paddle                  a short anti-aliased stroke, ``paddle_length`` long, ``thickness`` wide
    paddle_margin_list      ``margins``: the gap between consecutive paddles, drawn per image
    continuity              turn weights cos²(min(|turn| · continuity, 90°)) between paddles
    seed_distance           the distance between the starting points of the two target snakes
    num_distractor_snakes   ``num_distractors`` = budget // distractor_length (the LRA release's rule)

One image: (1) the first target origin is drawn at least 2·seed_distance from every border, the
second exactly seed_distance from it; (2) the two targets grow in tandem, each paddle drawn among
candidate turns by the continuity weights, restricted to those that stay inside the padding and
clear of everything placed; a stuck target gives back two paddles and grows again (the original
restarted the image at once; this image restarts after 40 such retreats); (3) distractors start
at free points, each with a few tries, else left out; (4) a marker goes on the origin of a random
target and on the far end of the same target (label 1) or of the other one (label 0). Every
consecutive pair of sample numbers holds one image of each class.

Settings per resolution (``RESOLUTIONS``, the LRA release's values; distractor length =
contour_length // 3 and num_distractors = budget // distractor_length, as the release computed):

    R    padding paddle thickness margin marker seed_dist continuity budget contrast
    32   1       2      0.5       1      1.5    7         1.0        20     1.5
    64   1       5      1.0       1      2.5    12        1.8        22     0.8
    128  1       5      1.5       2|3    3      20        1.8        35     0.9
    256  22      5      2.0       3      5      27        1.8        30     1.0

Deliberate differences from the original: exact geometry in continuous coordinates instead of
pixel masks, 4× supersampling instead of 2× Lanczos, and separation. The original kept snakes
about two margins apart, so two snakes could look joined. Here shapes of different snakes keep
``clearance`` = √2·(link + 1 − 1/antialias) between their surfaces, with link = ceil(margin), and
all four target ends are kept free for markers. Hence, on pixels > 0 linked within Chebyshev
distance ``link``, every snake with its markers is exactly one component (a gap of length margin
moves at most ``link`` pixels; each pixel containing the centre line is inked since thickness ·
antialias ≥ √2) and different snakes never join (two inked samples ``link`` pixels apart lie
within the clearance). The tests check this on the pixels.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import MofNCompleteColumn, Progress

from tasks import generated
from tasks.generated import MANIFEST, normal, recorded
from tasks.pathfinder_draw import Scene

DIFFICULTIES = {
    "easy": ("curv_baseline", 6),
    "intermediate": ("curv_contour_length_9", 9),
    "hard": ("curv_contour_length_14", 14),
}

# The LRA release's settings (TFDS builder docstrings of google-research/long-range-arena; the
# paddle length and the 256 padding / seed distance are the original code's defaults there);
# contrast = snake contrast x paddle contrast, the marker being 1.
RESOLUTIONS = {
    32: dict(padding=1, paddle_length=2, thickness=0.5, margins=(1,), marker_radius=1.5, seed_distance=7,
             continuity=1.0, distractor_budget=20, contrast=1.5),
    64: dict(padding=1, paddle_length=5, thickness=1.0, margins=(1,), marker_radius=2.5, seed_distance=12,
             continuity=1.8, distractor_budget=22, contrast=0.8),
    128: dict(padding=1, paddle_length=5, thickness=1.5, margins=(2, 3), marker_radius=3, seed_distance=20,
              continuity=1.8, distractor_budget=35, contrast=0.9),
    256: dict(padding=22, paddle_length=5, thickness=2.0, margins=(3,), marker_radius=5, seed_distance=27,
              continuity=1.8, distractor_budget=30, contrast=1.0),
}
CHUNK = 50                      # images per worker job


@dataclass(frozen=True)
class Settings:
    """How one data set is drawn, lengths in pixels; ``Settings.release(R, difficulty)`` gives the release's."""

    resolution: int = 32
    contour_length: int = 14
    padding: float = 1
    paddle_length: float = 2
    thickness: float = 0.5
    margins: tuple = (1,)
    marker_radius: float = 1.5
    seed_distance: float = 7
    continuity: float = 1.0
    distractor_length: int = 4
    num_distractors: int = 5
    contrast: float = 1.5
    antialias: int = 4
    distractor_tries: int = 20
    max_restarts: int = 2000

    @classmethod
    def release(cls, resolution: int = 32, difficulty: str = "hard", distractors: int | None = None) -> Settings:
        """The settings of ``pathfinder{resolution}/<difficulty folder>``; ``distractors`` replaces
        the release's number of distractor snakes (an easier task with fewer)."""
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution={resolution}: choose one of {sorted(RESOLUTIONS)}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty={difficulty!r}: choose one of {sorted(DIFFICULTIES)}")
        if distractors is not None and distractors < 0:
            raise ValueError(f"distractors={distractors}: a number of distractor snakes >= 0, or None for the release's")
        table = dict(RESOLUTIONS[resolution])
        budget = table.pop("distractor_budget")
        length = DIFFICULTIES[difficulty][1]
        short = max(1, length // 3)
        return cls(resolution=resolution, contour_length=length, distractor_length=short,
                   num_distractors=budget // short if distractors is None else distractors, **table)

    def __post_init__(self):
        if self.thickness * self.antialias < math.sqrt(2):
            raise ValueError(f"thickness={self.thickness} x antialias={self.antialias} must be >= sqrt(2) "
                             "so that every pixel on a stroke is inked; raise antialias")
        if self.seed_distance <= 2 * self.marker_radius + self.clearance(max(self.margins)):
            raise ValueError(f"seed_distance={self.seed_distance} leaves the two origin markers too close; "
                             "raise it above 2 x marker_radius + the clearance")
        if self.resolution <= 4 * self.seed_distance:
            raise ValueError(f"resolution={self.resolution} leaves no room for target origins "
                             f"2 x seed_distance={self.seed_distance} from the borders")

    def clearance(self, margin: float) -> float:
        return math.sqrt(2) * (math.ceil(margin) + 1 - 1 / self.antialias) + 1e-3

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Sample:
    image: np.ndarray            # uint8 (resolution, resolution)
    label: int
    markers: np.ndarray          # (2, 2) marker centres as (x, y)
    num_snakes: int              # targets + the distractors that found room
    margin: float


def label_of(seed: int, number: int) -> int:
    """Sample ``number``'s class: each pair (2j, 2j+1) holds one 0 and one 1, in random order."""
    flip = int(np.random.default_rng([seed, number // 2, 1]).integers(2))
    return (number % 2) ^ flip


def make_sample(s: Settings, seed: int, number: int) -> Sample:
    """Sample ``number`` of the stream ``seed``: the same image whatever the batching or workers."""
    rng = np.random.default_rng([seed, number])
    label = label_of(seed, number)
    for _ in range(s.max_restarts):
        scene = Scene(s, rng, float(rng.choice(s.margins)))
        ends = scene.targets()
        if ends is not None:
            break
    else:
        raise RuntimeError(f"no room for two targets after {s.max_restarts} tries with {s}; "
                           "lower contour_length or paddle_length for this resolution")
    placed = sum(scene.distractor(2 + i) for i in range(s.num_distractors))
    a = int(rng.integers(2))
    markers = np.stack([ends[a, 0], ends[a if label else 1 - a, 1]])
    return Sample(scene.render(markers), label, markers, 2 + placed, scene.margin)


def save_png(image: np.ndarray, path) -> None:
    Image.fromarray(image).save(path, format="PNG")  # uint8 (R, R) is 8-bit grayscale ("L")


def folder_name(resolution: int, difficulty: str) -> str:
    """The release's folder of a data set, e.g. ``pathfinder32/curv_contour_length_14``."""
    return f"pathfinder{resolution}/{DIFFICULTIES[difficulty][0]}"


def metadata_line(batch: int, i: int, sample: Sample, s: Settings) -> str:
    """The original's fields: folder, file, index, label, continuity, contour length, distractor
    length, paddle length, thickness, margin, number of paddle contrasts."""
    return (f"imgs/{batch} sample_{i}.png {i} {sample.label} {s.continuity:g} {s.contour_length} "
            f"{s.distractor_length} {s.paddle_length:g} {s.thickness:g} {sample.margin:g} 1")


def _chunk(job: tuple) -> tuple[int, list[tuple[int, str]]]:
    settings, seed, folder, batch, batch_size, start, stop = job
    lines = []
    for i in range(start, stop):
        sample = make_sample(settings, seed, batch * batch_size + i)
        save_png(sample.image, folder / "imgs" / str(batch) / f"sample_{i}.png")
        lines.append((i, metadata_line(batch, i, sample, settings)))
    return batch, lines


def manifest(settings: Settings, seed: int, count: int, batch_size: int = 1000) -> dict:
    """The settings that determine a generated folder, as its generator.json records them."""
    return {"settings": settings.as_dict(), "seed": seed, "count": count, "batch_size": batch_size}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_release(out: str | Path, resolution: int = 32, difficulty: str = "hard", count: int = 200_000,
                  seed: int = 0, batch_size: int = 1000, workers: int | None = None,
                  progress: bool = True, distractors: int | None = None) -> Path:
    """Generate ``out/pathfinder{resolution}/<difficulty folder>/`` in the release layout.

    Images ``imgs/<batch>/sample_<i>.png`` and text ``metadata/<batch>.npy`` are written into a
    hidden ``.<folder>.partial`` sibling, which is renamed once complete, so a reader never sees
    half a data set; an interrupted run with the same arguments resumes at the first unfinished
    batch. A folder already generated with these settings is kept as it is, one generated with
    others is replaced, one without generator.json (the LRA release's) raises DataFormatError.
    Sample number ``batch * batch_size + i`` depends only on ``seed``, so the bytes are the same
    for any ``workers``.
    """
    if seed < 0 or count < 1 or batch_size < 1:
        raise ValueError(f"seed={seed}, count={count}, batch_size={batch_size}: need seed >= 0 and positive sizes")
    settings = Settings.release(resolution, difficulty, distractors)
    final = Path(out) / folder_name(resolution, difficulty)
    wanted = manifest(settings, seed, count, batch_size)
    if generated.is_current(final, wanted, "Pathfinder"):
        return final
    work = generated.staging(final)
    if work.exists() and recorded(work) != normal(wanted):
        shutil.rmtree(work)
    (work / "metadata").mkdir(parents=True, exist_ok=True)
    (work / MANIFEST).write_text(json.dumps(wanted))
    sizes = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    todo = [b for b in range(len(sizes)) if not (work / "metadata" / f"{b}.npy").exists()]
    jobs = []
    for b in todo:
        (work / "imgs" / str(b)).mkdir(parents=True, exist_ok=True)
        jobs += [(settings, seed, work, b, batch_size, i, min(i + CHUNK, sizes[b])) for i in range(0, sizes[b], CHUNK)]
    pending: dict[int, list] = {b: [] for b in todo}
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    columns = (*Progress.get_default_columns(), MofNCompleteColumn())
    # Workers forked before the progress bar's refresh thread starts (see listops_generator.generate).
    with Pool(workers) if workers > 1 else nullcontext() as pool, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"pathfinder{resolution} {difficulty}", total=count,
                            completed=count - sum(sizes[b] for b in todo))
        for b, lines in pool.imap_unordered(_chunk, jobs) if pool else map(_chunk, jobs):
            pending[b] += lines
            if len(pending[b]) == sizes[b]:
                _write_text(work / "metadata" / f"{b}.npy", "".join(line + "\n" for _, line in sorted(pending.pop(b))))
            bar.update(task, advance=len(lines))
    return generated.publish(work, final, wanted)
