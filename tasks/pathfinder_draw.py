"""Drawing one Pathfinder stimulus: geometry, snake growth, rasterisation.

Coordinates are continuous (x, y) in pixel units; the canvas spans [0, size]², and pixel (row i,
column j) covers [j, j+1] × [i, i+1]. A shape is a segment [x0, y0, x1, y1] plus a radius: a paddle
is the set of points within ``thickness / 2`` of its segment, a marker a zero-length segment with
the marker radius. Shape legend: C candidates, M placed shapes, K shapes to draw, W window side.

Anti-aliasing is by supersampling: each pixel holds ``scale × scale`` sample points at offsets
``(a + 0.5) / scale``; a pixel's value is the fraction of its samples inside some shape.
:class:`Scene` grows the snakes (the procedure is described in :mod:`tasks.pathfinder_generator`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.pathfinder_generator import Settings

EPS = 1e-12
ANGLE_STEP = math.radians(4.0)   # spacing of the candidate headings of a paddle
START_DRAWS = 16                 # random start points tried at once for a distractor
BACKTRACK = 2                    # paddles a stuck target gives back before growing again
MAX_BACKTRACKS = 40              # per image, before the image starts over


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points p to segments ab; all (..., 2) and broadcast against each other."""
    ab = b - a
    ap = p - a
    t = np.minimum(np.maximum((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), EPS), 0.0), 1.0)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1)


def _to_segments(px, py, ax, ay, bx, by):
    """Squared distances from points to segments, and on which side of the segment each point lies."""
    abx, aby, apx, apy = bx - ax, by - ay, px - ax, py - ay
    t = np.minimum(np.maximum((apx * abx + apy * aby) / np.maximum(abx * abx + aby * aby, EPS), 0.0), 1.0)
    dx, dy = apx - t * abx, apy - t * aby
    return dx * dx + dy * dy, abx * apy - aby * apx


def segments_apart(first: np.ndarray, second: np.ndarray, need: np.ndarray) -> np.ndarray:
    """(C, M) whether segments first (C, 4) and second (M, 4) are at least ``need`` (M,) apart.

    Segment distance = the smallest endpoint-to-segment distance, or 0 where the segments cross
    (each one's endpoints on both sides of the other). Written on coordinate columns: the generator
    calls this for every paddle on small arrays, where the number of numpy operations is the cost.
    """
    c = len(first)
    ends_first = first.reshape(-1, 2)[:, None, :]       # (2C, 1, 2): a0, b0, a1, b1, ...
    ends_second = second.reshape(-1, 2)[None, :, :]     # (1, 2M, 2): c0, d0, c1, d1, ...
    sq1, side1 = _to_segments(ends_first[..., 0], ends_first[..., 1],
                              second[None, :, 0], second[None, :, 1], second[None, :, 2], second[None, :, 3])
    sq2, side2 = _to_segments(ends_second[..., 0], ends_second[..., 1],
                              first[:, None, 0], first[:, None, 1], first[:, None, 2], first[:, None, 3])
    sq1, side1 = sq1.reshape(c, 2, -1), side1.reshape(c, 2, -1)     # (C, a|b, M)
    sq2, side2 = sq2.reshape(c, -1, 2), side2.reshape(c, -1, 2)     # (C, M, c|d)
    squared = np.minimum(sq1.min(axis=1), sq2.min(axis=2))
    crossing = (side1[:, 0] * side1[:, 1] < 0) & (side2[..., 0] * side2[..., 1] < 0)
    return ~crossing & (squared >= np.maximum(need, 0.0) ** 2)


def rasterize(size: int, scale: int, segments: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] (size, size) of the union of shapes (K, 4) with radii (K,).

    Each shape is evaluated only in a W × W window of samples around it (one batched array for
    all shapes), so the cost grows with the ink, not with the canvas.
    """
    fine = size * scale
    canvas = np.zeros(fine * fine, dtype=bool)
    if len(segments):
        lo = np.minimum(segments[:, :2], segments[:, 2:]) - radii[:, None]
        hi = np.maximum(segments[:, :2], segments[:, 2:]) + radii[:, None]
        start = np.floor(lo * scale).astype(np.int64)
        width = int(np.ceil((hi - lo).max() * scale)) + 2
        offsets = np.arange(width)
        cols = start[:, 0, None, None] + offsets[None, None, :]
        rows = start[:, 1, None, None] + offsets[None, :, None]
        points = np.stack(np.broadcast_arrays((cols + 0.5) / scale, (rows + 0.5) / scale), axis=-1)
        inside = point_segment_distance(points, segments[:, None, None, :2], segments[:, None, None, 2:])
        inside = inside <= radii[:, None, None]
        rows, cols = np.broadcast_arrays(rows, cols)
        inside &= (rows >= 0) & (rows < fine) & (cols >= 0) & (cols < fine)
        canvas[rows[inside] * fine + cols[inside]] = True
    return canvas.reshape(size, scale, size, scale).mean(axis=(1, 3))


class Scene:
    """Shapes placed so far, one row each in ``table`` (columns below).

    A row holds the segment, radius, owner snake, index along the owner, whether it is a stroke
    (else a marker) and its bounding box. Markers are zero-length segments with index -1 (origin)
    or the snake's length (far end). Shapes of one snake keep ``margin`` apart (no self-crossing)
    unless they are neighbours along it (index difference 1, or 2 for a marker); shapes of
    different snakes keep ``clearance`` apart.
    """

    SEG, RAD, OWNER, INDEX, STROKE, LO, HI = slice(0, 4), 4, 5, 6, 7, slice(8, 10), slice(10, 12)

    def __init__(self, s: Settings, rng: np.random.Generator, margin: float):
        self.s, self.rng, self.margin = s, rng, margin
        self.clearance = s.clearance(margin)
        self.table = np.zeros((4 + 2 * s.contour_length + s.num_distractors * s.distractor_length, 12))
        self.n = 0

    def add(self, seg: np.ndarray, rad: float, owner: int, index: int, stroke: bool = True) -> None:
        lo, hi = np.minimum(seg[:2], seg[2:]) - rad, np.maximum(seg[:2], seg[2:]) + rad
        self.table[self.n] = np.concatenate([seg, [rad, owner, index, stroke], lo, hi])
        self.n += 1

    def fits(self, cand: np.ndarray, rad: float, owner: int, index: int, stroke: bool = True) -> np.ndarray:
        """(C,) which candidate segments (C, 4) keep their distances to every placed shape."""
        points = cand.reshape(-1, 2)
        placed = self.table[: self.n]
        reach = rad + max(self.margin, self.clearance)  # boxes farther apart than this cannot conflict
        near = ((placed[:, self.LO] <= points.max(axis=0) + reach)
                & (placed[:, self.HI] >= points.min(axis=0) - reach)).all(axis=1)
        placed = placed[near]
        if not len(placed):
            return np.ones(len(cand), dtype=bool)
        same = placed[:, self.OWNER] == owner
        need = rad + placed[:, self.RAD] + np.where(same, self.margin, self.clearance)
        # neighbours along a snake touch by construction; a marker also overlaps the next paddle
        window = 3 - (placed[:, self.STROKE] * stroke)
        need[same & (np.abs(placed[:, self.INDEX] - index) < window)] = -1.0
        return segments_apart(cand, placed[:, self.SEG], need).all(axis=1)

    def allowed(self, cand: np.ndarray, owner: int, index: int, last: bool) -> np.ndarray:
        """(C,) candidates inside the padding and clear of the scene (with their end marker if last)."""
        s = self.s
        ok = ((cand >= s.padding) & (cand <= s.resolution - s.padding)).all(axis=1)
        ok &= self.fits(cand, s.thickness / 2, owner, index)
        if last:
            disks = np.concatenate([cand[:, 2:], cand[:, 2:]], axis=1)
            ok &= self.fits(disks, s.marker_radius, owner, index + 1, stroke=False)
        return ok

    def paddle(self, owner: int, index: int, tip: np.ndarray, heading: float | None, last: bool):
        """Place paddle ``index`` of a snake after ``tip``; returns (new tip, heading) or None.

        Candidates: every turn on a grid of ANGLE_STEP (randomly offset) within 90°/continuity
        (any direction for a first paddle), drawn by the continuity weights among the allowed ones.
        """
        s = self.s
        if heading is None:
            angles = np.arange(0, 2 * math.pi, ANGLE_STEP) + self.rng.uniform(0, ANGLE_STEP)
            weights, gap = np.ones_like(angles), 0.0
        else:
            steps = math.ceil(math.pi / 2 / s.continuity / ANGLE_STEP)
            turns = ANGLE_STEP * (np.arange(-steps, steps + 1) + self.rng.uniform(-0.5, 0.5))
            bent = np.abs(turns) * s.continuity
            weights = np.where(bent < math.pi / 2, np.cos(bent) ** 2, 0.0)
            angles, gap = heading + turns, self.margin
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        start = tip + gap * unit
        cand = np.concatenate([start, start + s.paddle_length * unit], axis=1)
        k = self._draw(weights * self.allowed(cand, owner, index, last))
        if k is None:
            return None
        self.add(cand[k], s.thickness / 2, owner, index)
        end = cand[k, 2:]
        if last:
            self.add(np.concatenate([end, end]), s.marker_radius, owner, index + 1, stroke=False)
        return end, angles[k]

    def _draw(self, weights: np.ndarray) -> int | None:
        cumulative = np.cumsum(weights)
        if cumulative[-1] <= 0:
            return None
        k = int(np.searchsorted(cumulative, self.rng.uniform(0, cumulative[-1]), side="right"))
        return min(k, len(weights) - 1)

    def remove(self, owner: int, first_index: int) -> None:
        """Take away the paddles of ``owner`` from ``first_index`` on (other snakes only get more room)."""
        placed = self.table[: self.n]
        keep = ~((placed[:, self.OWNER] == owner) & (placed[:, self.INDEX] >= first_index))
        kept = int(keep.sum())
        self.table[:kept] = placed[keep]
        self.n = kept

    def targets(self) -> np.ndarray | None:
        """Grow both targets; returns their ends (2 snakes, origin/far end, xy) or None.

        The shorter snake grows next (tandem growth); a stuck snake loses its last BACKTRACK
        paddles and grows again, up to MAX_BACKTRACKS times per image.
        """
        s = self.s
        first = self.rng.uniform(2 * s.seed_distance, s.resolution - 2 * s.seed_distance, size=2)
        phi = self.rng.uniform(0, 2 * math.pi)
        second = first + s.seed_distance * np.array([math.cos(phi), math.sin(phi)])
        path = [[(first, None)], [(second, None)]]  # per snake: (tip, heading) after each paddle
        for owner in (0, 1):
            self.add(np.concatenate([path[owner][0][0]] * 2), s.marker_radius, owner, -1, stroke=False)
        backtracks = 0
        while min(len(path[0]), len(path[1])) <= s.contour_length:
            owner = int(len(path[1]) < len(path[0]))
            index = len(path[owner]) - 1
            placed = self.paddle(owner, index, *path[owner][-1], last=index == s.contour_length - 1)
            if placed is not None:
                path[owner].append(placed)
                continue
            backtracks += 1
            if backtracks > MAX_BACKTRACKS:
                return None
            keep = max(1, index + 1 - BACKTRACK)
            del path[owner][keep:]
            self.remove(owner, keep - 1)
        return np.array([[path[o][0][0], path[o][-1][0]] for o in (0, 1)])

    def distractor(self, owner: int) -> bool:
        """Place one distractor snake, starting at free points; False if it found no room."""
        s = self.s
        for _ in range(s.distractor_tries):
            starts = self.rng.uniform(s.padding, s.resolution - s.padding, size=(START_DRAWS, 2))
            free = self.fits(np.concatenate([starts, starts], axis=1), s.thickness / 2, owner, 0)
            if not free.any():
                continue
            mark, path = self.n, (starts[int(free.argmax())], None)
            for index in range(s.distractor_length):
                path = self.paddle(owner, index, *path, last=False)
                if path is None:
                    self.n = mark
                    break
            else:
                return True
        return False

    def render(self, markers: np.ndarray) -> np.ndarray:
        s, placed = self.s, self.table[: self.n]
        seg = placed[placed[:, self.STROKE] > 0, self.SEG]
        strokes = rasterize(s.resolution, s.antialias, seg, np.full(len(seg), s.thickness / 2))
        disks = rasterize(s.resolution, s.antialias, np.concatenate([markers, markers], axis=1),
                          np.full(2, s.marker_radius))
        value = np.maximum(np.minimum(1.0, s.contrast * strokes), disks)
        return np.round(255 * value).astype(np.uint8)
