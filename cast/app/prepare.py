"""Download or generate the data of one LRA task into data/ (or --out).

    python scripts/prepare_data.py listops --out data/listops            # generate (LRA's procedure)
    python scripts/prepare_data.py pathfinder --out data/pathfinder      # generate stimuli
    python scripts/prepare_data.py text                                   # IMDb via `datasets`
    python scripts/prepare_data.py image                                  # CIFAR-10 via `datasets`
    python scripts/prepare_data.py lra_release                            # the 8 GB LRA archive

Each subcommand lives with its task: the module named below defines ``add_arguments(parser)``
and ``prepare(args)``; ``python scripts/prepare_data.py NAME --help`` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys


PREPARERS = {
    "listops": ("tasks.listops_generator", "generate ListOps in the release's TSV layout"),
    "pathfinder": ("tasks.pathfinder_generator", "generate Pathfinder / Path-X stimuli"),
    "text": ("tasks.text", "download IMDb (byte-level text classification)"),
    "image": ("tasks.image", "download CIFAR-10 (grayscale image classification)"),
    "lra_release": ("tasks.download", "download and unpack lra_release.gz (ListOps, AAN, Pathfinder)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True, metavar="TASK")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in PREPARERS.items():
        task_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen task's module: the others may need extras
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(task_parser)
    args = parser.parse_args(argv)
    return modules[args.name].prepare(args) or 0


if __name__ == "__main__":
    sys.exit(main())
