"""The Hugging Face hub and tensorflow-datasets sources of :mod:`tasks.text` and :mod:`tasks.image`.

:func:`hub_split_tables` reads a local copy of a Hugging Face data set (``save_to_disk`` or the
hub's parquet files), :func:`tfds_pairs` a prepared tensorflow-datasets one; :func:`fetch_hub`
and :func:`fetch_tfds` make those copies (``prepare_data.py text|image``). A network failure
inside the hub's or tfds's own download raises :class:`tasks.download.DownloadError`, whose
one-line message names what to fetch by hand and where to put it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tasks.base import DataFormatError, DataNotFoundError, find_path
from tasks.download import DownloadError, is_network_error

HUB_CACHE = "hf_cache"


def _saved_dataset(data_dir: Path, split: str) -> Path | None:
    """The ``save_to_disk`` DatasetDict folder under ``data_dir`` that holds ``split``, if any."""
    saved = find_path(data_dir, "dataset_dict.json")
    return saved.parent if saved is not None and (saved.parent / split).is_dir() else None


def _parquet_files(data_dir: Path, split: str) -> list[Path]:
    files = [
        p for p in sorted(data_dir.rglob("*.parquet"))
        if HUB_CACHE not in p.parts and (p.name.startswith((f"{split}-", f"{split}.")) or p.parent.name == split)
    ]
    if len({p.parent for p in files}) > 1:
        raise DataFormatError(
            f"{data_dir}: parquet files of split '{split}' in several folders ({', '.join(map(str, files))}); keep one copy"
        )
    return files


def hub_split_files(data_dir: Path, split: str) -> list[Path]:
    """The files that :func:`hub_split_tables` reads ``split`` from ([] when none holds it)."""
    saved = _saved_dataset(data_dir, split)
    if saved is not None:
        return sorted(p for p in (saved / split).rglob("*") if p.is_file())
    return _parquet_files(data_dir, split)


def hub_split_tables(data_dir: Path, split: str, columns: list[str]):
    """A local Hugging Face copy's ``split`` as [(source file or folder, pyarrow.Table)].

    Accepts a ``save_to_disk`` DatasetDict (a folder holding ``dataset_dict.json`` and one
    sub-folder per split) or the hub's parquet files (``plain_text/train-00000-of-00001.parquet``
    or ``.../train/0000.parquet``) at any depth under ``data_dir``; returns [] when neither holds
    the split.
    """
    saved = _saved_dataset(data_dir, split)
    if saved is not None:
        import datasets

        dataset = datasets.load_from_disk(str(saved))
        return [(str(saved), dataset[split].select_columns(columns).with_format("arrow")[:])]
    import pyarrow.parquet as pq

    return [(str(p), pq.read_table(p, columns=columns)) for p in _parquet_files(data_dir, split)]


def require_hub_tables(data_dir: Path, split: str, columns: list[str], task: str, dataset: str,
                       hub_name: str):
    """:func:`hub_split_tables`, or a DataNotFoundError that names the folder, the command that
    downloads the data and the hub page whose parquet files would do."""
    tables = hub_split_tables(data_dir, split, columns)
    if not tables:
        raise DataNotFoundError(
            f"{task.capitalize()}: no {dataset} '{split}' split under {data_dir}. Download it with\n"
            f"    python scripts/prepare_data.py {task} --out {data_dir}\n"
            f"or put the parquet files of https://huggingface.co/datasets/{hub_name} there."
        )
    return tables


def fetch_hub(name: str, out: Path, keep_cache: bool = False) -> Path:
    """``datasets.load_dataset(name)`` into ``out/hf_dataset`` (save_to_disk); returns that folder."""
    target = out / "hf_dataset"
    if (target / "dataset_dict.json").exists():
        return target
    import datasets

    try:
        dataset = datasets.load_dataset(name, cache_dir=str(out / HUB_CACHE))
    except ConnectionError as error:
        raise DownloadError(
            f"cannot reach the Hugging Face hub for {name} ({error}); download its parquet files by hand from "
            f"https://huggingface.co/datasets/{name}/tree/main and put them under {out}/ "
            "(e.g. plain_text/train-00000-of-00001.parquet); training reads them from there"
        ) from None
    staging = out / ".hf_dataset.partial"
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    os.replace(staging, target)
    if not keep_cache:
        shutil.rmtree(out / HUB_CACHE, ignore_errors=True)
    return target


def import_tfds():
    """tensorflow_datasets, imported only when ``source=tfds`` asks for it."""
    try:
        import tensorflow_datasets
    except ImportError:
        raise ImportError(
            "task.source=tfds needs tensorflow-datasets: pip install -e '.[tfds]' (or use task.source=hf)"
        ) from None
    return tensorflow_datasets


def tfds_pairs(data_dir: Path, name: str, split: str, task: str) -> list[tuple]:
    """(input, label) numpy pairs of tfds ``name`` prepared under ``data_dir/tfds``; never downloads."""
    tfds = import_tfds()
    if not (data_dir / "tfds" / name).is_dir():
        raise DataNotFoundError(
            f"{task}: no tfds {name} under {data_dir / 'tfds'}. Fetch it with\n"
            f"    python scripts/prepare_data.py {task} --source tfds --out {data_dir}"
        )
    dataset = tfds.load(name, split=split, data_dir=str(data_dir / "tfds"), download=False, as_supervised=True)
    return list(tfds.as_numpy(dataset))


def tfds_files(data_dir: Path, name: str) -> list[Path]:
    """The files of tfds ``name`` prepared under ``data_dir/tfds`` (every split's; [] if none)."""
    folder = data_dir / "tfds" / name
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def tfds_offline_message(name: str, url: str, manual_dir: Path, error: BaseException) -> str:
    """One line: tfds could not reach the network, what to fetch by hand, and where it goes."""
    reason = " ".join(str(error).split())[:200]
    return (f"cannot reach the network to prepare tfds {name} ({type(error).__name__}: {reason}); download {url} "
            f"by hand and put it in {manual_dir}/ as {url.rsplit('/', 1)[-1]} (tfds reads it from there), "
            "then run this again")


def fetch_tfds(name: str, out: Path, url: str) -> Path:
    """Download and prepare tfds ``name`` under ``out/tfds`` (what ``source=tfds`` reads).

    ``url`` is the archive tfds downloads; offline, a copy fetched by hand into
    ``out/tfds/downloads/manual/`` under its own file name is used instead.
    """
    tfds = import_tfds()
    manual_dir = out / "tfds" / "downloads" / "manual"
    try:
        builder = tfds.builder(name, data_dir=str(out / "tfds"))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except Exception as error:
        if not is_network_error(error):
            raise
        raise DownloadError(tfds_offline_message(name, url, manual_dir, error)) from None
    return out / "tfds" / name


def add_source_arguments(parser: argparse.ArgumentParser, out: str, hub_name: str) -> None:
    """Options of ``prepare_data.py text|image``: where to put the data and which source to use."""
    parser.add_argument("--out", default=out, help="the task's data_dir")
    parser.add_argument("--source", choices=("hf", "tfds"), default="hf", help="Hugging Face hub (default) or tfds")
    parser.add_argument("--hub-name", default=hub_name, help="Hugging Face data set id")
    parser.add_argument("--keep-cache", action="store_true", help=f"keep the hub download cache (OUT/{HUB_CACHE})")


def prepare_source(args: argparse.Namespace, tfds_name: str, tfds_url: str, task: str) -> int:
    """Fetch a hub or tfds data set into ``args.out``; one line on stderr and 1 when offline."""
    out = Path(args.out)
    try:
        if args.source == "tfds":
            where = fetch_tfds(tfds_name, out, tfds_url)
        else:
            where = fetch_hub(args.hub_name, out, args.keep_cache)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{task} data ready in {where}; train with task={task} task.data_dir={out} task.source={args.source}")
    return 0
