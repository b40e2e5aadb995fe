"""Download or generate the data of one LRA task into data/ (or --out).

    python scripts/prepare_data.py listops --out data/listops            # generate (LRA's procedure)
    python scripts/prepare_data.py pathfinder --out data/pathfinder      # generate stimuli
    python scripts/prepare_data.py text                                   # IMDb via `datasets`
    python scripts/prepare_data.py image                                  # CIFAR-10 via `datasets`
    python scripts/prepare_data.py lra_release                            # the 8 GB LRA archive

``python scripts/prepare_data.py NAME --help`` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import DataFormatError, DataNotFoundError


@dataclass(frozen=True)
class Subcommand:
    """One data source (Path-X is ``pathfinder --resolution 128``, Retrieval comes with
    ``lra_release``): ``options`` adds its arguments, ``run`` calls the generator or downloader in
    tasks/, each importing its modules only when chosen (the others may need extras)."""

    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def listops_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/listops", help="folder that receives listops-1000/")
    parser.add_argument("--num-train", type=int, default=96_000)
    parser.add_argument("--num-val", type=int, default=2_000)
    parser.add_argument("--num-test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0, help="generator seed: the same seed and settings, the same data")
    parser.add_argument("--min-length", type=int, default=500, help="keep trees longer than this")
    parser.add_argument("--max-length", type=int, default=2000, help="keep trees shorter than this")
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def listops(args: argparse.Namespace) -> int:
    from tasks import listops_generator

    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    settings = listops_generator.manifest(sizes, args.seed, args.min_length, args.max_length, args.max_depth,
                                          args.max_args)
    folder = Path(args.out) / listops_generator.FOLDER
    try:
        listops_generator.check_settings(args.min_length, args.max_length, args.max_depth, args.max_args)
        if _already(folder, settings, "ListOps"):
            return 0
        listops_generator.write_release(args.out, sizes, seed=args.seed, min_length=args.min_length,
                                        max_length=args.max_length, max_depth=args.max_depth,
                                        max_args=args.max_args, workers=args.workers)
    except ValueError as error:
        if isinstance(error, DataFormatError):
            raise
        print(f"error: {error}", file=sys.stderr)  # settings that give no trees, or too few distinct ones
        return 2
    print(f"wrote {sum(sizes.values()):,} ListOps samples to {folder}")
    return 0


def pathfinder_options(parser: argparse.ArgumentParser) -> None:
    from tasks.pathfinder_generator import DIFFICULTIES, RESOLUTIONS

    parser.add_argument("--out", default="data/pathfinder", help="folder that receives pathfinder<R>/")
    parser.add_argument("--resolution", type=int, default=32, choices=sorted(RESOLUTIONS),
                        help="image side: 32 = LRA Pathfinder, 128 = Path-X")
    parser.add_argument("--difficulty", default="hard", choices=list(DIFFICULTIES),
                        help="contour length 6 / 9 / 14 (curv_baseline / curv_contour_length_9 / _14)")
    parser.add_argument("--count", type=int, default=200_000, help="images (the release has 200,000)")
    parser.add_argument("--distractors", type=_count, default=None,
                        help="distractor snakes per image (default: the release's, 10 / 6 / 5 at 32 pixels)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed: the same seed and settings, the same data")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per imgs/<batch> folder")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def pathfinder(args: argparse.Namespace) -> int:
    from tasks import pathfinder_generator as generator

    final = Path(args.out) / generator.folder_name(args.resolution, args.difficulty)
    settings = generator.manifest(generator.Settings.release(args.resolution, args.difficulty, args.distractors),
                                  args.seed, args.count, args.batch_size)
    if _already(final, settings, "Pathfinder"):
        return 0
    start = time.time()
    generator.write_release(args.out, args.resolution, args.difficulty, args.count, args.seed, args.batch_size,
                            args.workers, distractors=args.distractors)
    elapsed = time.time() - start
    print(f"wrote {args.count:,} images to {final} in {elapsed:.0f} s ({args.count / elapsed:.1f} images/s)")
    return 0


def _already(folder: Path, settings: dict, what: str) -> bool:
    """Whether ``folder`` holds ``what`` generated with ``settings`` (said on stdout); raises for
    data without a manifest, which is never overwritten."""
    from tasks.generated import is_current

    if is_current(folder, settings, what):
        print(f"{folder} already exists with these settings; delete it to generate again")
        return True
    return False


def hub_options(task: str) -> Callable[[argparse.ArgumentParser], None]:
    """Options of a task whose data set is on the Hugging Face hub (or tfds): where, which source."""

    def options(parser: argparse.ArgumentParser) -> None:
        hub_name = importlib.import_module(f"tasks.{task}").HUB_NAME
        parser.add_argument("--out", default=f"data/{task}", help="the task's data_dir")
        parser.add_argument("--source", choices=("hf", "tfds"), default="hf", help="Hugging Face hub (default) or tfds")
        parser.add_argument("--hub-name", default=hub_name, help="Hugging Face data set id")
        parser.add_argument("--keep-cache", action="store_true", help="keep the hub download cache (OUT/hf_cache)")

    return options


def hub_download(task: str) -> Callable[[argparse.Namespace], int]:
    """Fetch a task's hub or tfds data set into ``args.out``: where it is and the training overrides."""

    def run(args: argparse.Namespace) -> int:
        from tasks.sources import fetch_hub, fetch_tfds

        module, out = importlib.import_module(f"tasks.{task}"), Path(args.out)
        if args.source == "tfds":
            where = fetch_tfds(module.TFDS_NAME, out, module.TFDS_URL)
        else:
            where = fetch_hub(args.hub_name, out, args.keep_cache)
        print(f"{task} data ready in {where}; train with task={task} task.data_dir={out} task.source={args.source}")
        return 0

    return run


def lra_release_options(parser: argparse.ArgumentParser) -> None:
    from tasks.download import LRA_URL

    parser.add_argument("--out", default="data/lra_release", help="folder to unpack into (any nesting is found)")
    parser.add_argument("--url", default=LRA_URL)
    parser.add_argument("--archive", default=None, help="where the .gz goes (default: OUT/lra_release.gz)")
    parser.add_argument("--sha256", default=None, help="expected checksum (the server's MD5 is checked when sent)")
    parser.add_argument("--delete-archive", action="store_true", help="delete the .gz once unpacked (frees ~8 GB)")


def lra_release(args: argparse.Namespace) -> int:
    from tasks.download import RELEASE_FOLDERS, download, extract, locate

    out = Path(args.out)
    archive = Path(args.archive) if args.archive else out / "lra_release.gz"
    if "tsv_data" not in locate(out, ["tsv_data"]):
        download(args.url, archive, sha256=args.sha256)
        extract(archive, out)
        if args.delete_archive:
            archive.unlink()
    found = locate(out, RELEASE_FOLDERS.values())
    if "tsv_data" not in found:
        raise DataNotFoundError(f"{archive} unpacked into {out} holds no tsv_data/ folder; is it lra_release.gz?")
    for task, folder in RELEASE_FOLDERS.items():
        where = f"{found[folder]}  (task.data_dir={found[folder].parent})" if folder in found else "not found"
        print(f"{task:16s} {where}")
    return 0


SUBCOMMANDS = {
    "listops": Subcommand("generate ListOps in the release's TSV layout", listops_options, listops),
    "pathfinder": Subcommand("generate Pathfinder / Path-X stimuli", pathfinder_options, pathfinder),
    "text": Subcommand("download IMDb (byte-level text classification)", hub_options("text"), hub_download("text")),
    "image": Subcommand("download CIFAR-10 (grayscale image classification)", hub_options("image"),
                        hub_download("image")),
    "lra_release": Subcommand("download and unpack lra_release.gz (ListOps, AAN, Pathfinder)", lra_release_options,
                              lra_release),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True, metavar="TASK")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in SUBCOMMANDS.items():
        task_parser = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:  # import only the chosen source's modules: the others may need extras
            command.options(task_parser)
    args = parser.parse_args(argv)
    from tasks.download import DownloadError

    try:
        return SUBCOMMANDS[args.name].run(args) or 0
    except (DownloadError, DataNotFoundError, DataFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
