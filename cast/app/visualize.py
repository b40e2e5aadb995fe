"""Pictures of what CAST clusters, and of a task's samples.

    python scripts/visualize.py clusters outputs/runs/2026-11-22/10-00-00_image_cast [--layer 0 --head 0]
    python scripts/visualize.py samples task=pathfinder task.data_dir=data/pathfinder [--n 16]

``clusters`` reloads a trained run (its .hydra/config.yaml and best checkpoint, as eval.py does),
runs one batch of the test split with every CAST layer recording, and draws the clusters of one
sample: for image tasks (the datamodule's ``is_image``: Image, Pathfinder, Path-X; the sequence is a side × side grid) one
side × side mask per surrogate token next to the input and the gate map; for text-like tasks a
strip of the tokens coloured by cluster above the cluster × token membership matrix.
``samples`` builds the task's datamodule from configs/ with the given overrides and draws a
grid of samples with their labels (images for image tasks, token strips otherwise) into
outputs/visualize/ (relative to the current directory, as train.py's outputs/runs/).

Shapes: B batch, h heads, Nc clusters, κ slots per cluster, N tokens (N + 1 with a CLS token,
which sits at position 0 and is left out of every picture), side = √N for image-like tasks.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from matplotlib.ticker import MaxNLocator

from cast.app.paths import CONFIG_DIR

OUTPUT_DIR = Path("outputs") / "visualize"  # the samples' default folder, below the current directory


def image_side(is_image: bool, length: int, layout: str = "auto") -> int | None:
    """The grid side of an image task's sequence (is_image: its datamodule's class attribute), None for text-like ones."""
    side = math.isqrt(length)
    if layout == "text" or (layout == "auto" and not is_image):
        return None
    if side * side != length:
        if layout == "image":
            raise SystemExit(f"--layout image: task.max_length={length} is not a square number of pixels")
        return None
    return side


def memberships(index: torch.Tensor, valid: torch.Tensor, length: int, offset: int) -> np.ndarray:
    """Cluster slots (Nc, κ) -> a (Nc, length) 0/1 matrix over the task's own tokens (CLS dropped)."""
    out = np.zeros((index.shape[0], length), dtype=np.float32)
    for c in range(index.shape[0]):
        pos = index[c][valid[c]].numpy() - offset
        out[c, pos[(pos >= 0) & (pos < length)]] = 1.0
    return out


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def draw_image_clusters(pixels: np.ndarray, member: np.ndarray, gates: np.ndarray | None, title: str,
                        path: Path) -> None:
    """pixels (side, side), member (Nc, side²), gates (side²) or None -> one PNG of masks."""
    side = pixels.shape[0]
    panels = [("input", pixels, "gray")]
    if gates is not None:
        panels.append(("gate", gates.reshape(side, side), "viridis"))
    panels += [(f"cluster {c}", m.reshape(side, side), "magma") for c, m in enumerate(member)]
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, image, cmap) in zip(axes.flat, panels):
        ax.imshow(image, cmap=cmap, interpolation="nearest", vmin=0 if name.startswith("cluster") else None,
                  vmax=1 if name.startswith("cluster") else None)
        ax.set_title(name, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_text_clusters(member: np.ndarray, real: np.ndarray, title: str, path: Path) -> None:
    fig = text_clusters_figure(member, real, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def text_clusters_figure(member: np.ndarray, real: np.ndarray, title: str):
    """member (Nc, N), real (N) bool -> a strip coloured by each token's first cluster + the matrix."""
    member = member[:, real]
    first = np.where(member.any(0), member.argmax(0), -1).astype(float)
    fig, (strip, matrix) = plt.subplots(2, 1, figsize=(10, min(12, 2.5 + 0.1 * len(member))),
                                        gridspec_kw={"height_ratios": [1, 4]})
    strip.imshow(np.ma.masked_less(first, 0)[None], aspect="auto", cmap="tab20", interpolation="nearest",
                 vmin=0, vmax=max(len(member) - 1, 1))
    strip.set_yticks([])
    strip.set_title("tokens by cluster (first cluster holding each; blank: in none)", fontsize=8)
    matrix.imshow(member, aspect="auto", cmap="Greys", interpolation="nearest")
    matrix.set_xlabel("token position")
    matrix.set_ylabel("cluster")
    matrix.yaxis.set_major_locator(MaxNLocator(integer=True))  # clusters are whole numbers: no 2.5
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_samples(ids: np.ndarray, labels: np.ndarray, side: int | None, title: str, path: Path) -> None:
    """ids (n, N), labels (n) -> a grid of side × side images, or of token-id strips."""
    n = len(ids)
    rows, cols = _grid(n) if side else (n, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows) if side else (10, 0.6 * n + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, label in zip(axes.flat, ids, labels):
        ax.imshow(row.reshape(side, side) if side else row[None], cmap="gray" if side else "viridis",
                  aspect="equal" if side else "auto", interpolation="nearest")
        ax.set_title(f"label {label}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def first_batch(datamodule, split: str, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows of a split, whole: drawings need every pixel in its place, so a
    ``task.compact`` run is shown its batches with the padding masked instead of taken out (the
    same outputs, padding never being attended)."""
    datamodule.compact = False
    datamodule.setup()
    loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
              "test": datamodule.test_dataloader}[split]()
    return {k: v[:n] for k, v in next(iter(loader)).items()}


def record(model, batch: dict[str, torch.Tensor], source: Path) -> list:
    """Run one batch with every CAST layer recording; returns those layers."""
    layers = [m for m in model.attention_modules() if hasattr(m, "record")]
    if not layers:
        raise SystemExit(f"{source}: its attention records no clusters; only CAST runs (attention=cast) do")
    for layer in layers:
        layer.record = True
    with torch.no_grad():
        model(batch)
    return layers


def clusters(args) -> Path:
    from cast.app.run import load_run

    try:
        _, datamodule, lit, checkpoint = load_run(args.run_dir, args.data_root)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from error
    batch = first_batch(datamodule, args.split, args.sample + 1)
    layers = record(lit.model, batch, args.run_dir)
    if not -len(layers) <= args.layer < len(layers):
        raise SystemExit(f"--layer {args.layer}: the model has {len(layers)} CAST layers (0..{len(layers) - 1})")
    layer = layers[args.layer]
    b, h = args.sample, args.head
    if b >= len(batch["label"]) or not 0 <= h < layer.n_heads:
        raise SystemExit(f"--sample {b} --head {h}: the first {args.split} batch holds {len(batch['label'])} samples "
                         f"and the model has {layer.n_heads} heads")
    ids, real = batch["input_ids"][b], batch["mask"][b]
    offset = int(lit.model.embedding.cls)
    member = memberships(layer.last_clusters.index[b, h], layer.last_clusters.valid[b, h], len(ids), offset)
    side = image_side(datamodule.is_image, len(ids), args.layout)
    title = (f"{datamodule.name}, {args.split} sample {b} (label {int(batch['label'][b])}), layer {args.layer}, "
             f"head {h}: {len(member)} clusters  [{checkpoint.name}]")
    out = args.out or args.run_dir / f"clusters_layer{args.layer}_head{h}_sample{b}.png"
    if side:
        gates = np.where(real.numpy(), layer.last_gates[b, h, offset:].numpy(), np.nan)  # padding left blank
        draw_image_clusters(ids.numpy().reshape(side, side), member, gates, title, out)
    else:
        draw_text_clusters(member, real.numpy(), title, out)
    return out


def samples(args) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=args.overrides)
    datamodule = instantiate(cfg.task)
    batch = first_batch(datamodule, args.split, args.n)
    side = image_side(datamodule.is_image, batch["input_ids"].shape[1], args.layout)
    out = args.out or OUTPUT_DIR / f"samples_{datamodule.name}_{args.split}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_samples(batch["input_ids"].numpy(), batch["label"].numpy(), side,
                 f"{datamodule.name}, {args.split} split, {len(batch['label'])} samples", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clusters", help="draw a trained CAST run's clusters for one test sample")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--layer", type=int, default=0)
    c.add_argument("--head", type=int, default=0)
    c.add_argument("--sample", type=int, default=0, help="position of the sample in the first batch")
    c.add_argument("--data-root", help="override the data_root the run was trained with")
    s = sub.add_parser("samples", help="draw a grid of a task's samples with labels")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. task=pathfinder task.data_dir=...")
    s.add_argument("--n", type=int, default=16)
    for p in (c, s):
        p.add_argument("--split", choices=("train", "val", "test"), default="test" if p is c else "train")
        p.add_argument("--layout", choices=("auto", "image", "text"), default="auto",
                       help="auto: image grid for Image/Pathfinder/Path-X, token strip otherwise")
        p.add_argument("--out", type=Path, help=f"PNG path (default: in the run directory / {OUTPUT_DIR}/)")
    args = parser.parse_args(argv)
    out = clusters(args) if args.command == "clusters" else samples(args)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
