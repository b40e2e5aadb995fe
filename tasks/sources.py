"""The Hugging Face hub and tensorflow-datasets sources of :mod:`tasks.text` and :mod:`tasks.image`.

:func:`hub_columns` reads a local copy of a Hugging Face data set (``save_to_disk`` or the hub's
parquet files), turning a damaged or undecodable file into DataFormatError naming the file, the row
and the command that downloads it again; :func:`tfds_pairs` reads a prepared tensorflow-datasets
copy. :func:`fetch_hub` and :func:`fetch_tfds` make those copies (``prepare_data.py text|image``);
a network failure raises :class:`tasks.download.DownloadError`, whose one-line message names what
to fetch by hand and where to put it. Offline, :func:`fetch_hub` fails within seconds: a single
short request to the hub comes first, instead of the hub client's retries (about 30 s).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import DataFormatError, DataNotFoundError, find_path
from tasks.download import DownloadError, is_network_error

HUB_CACHE = "hf_cache"
SOURCES = ("hf", "tfds")
PROBE_TIMEOUT = 5.0  # seconds the hub has to answer before a download counts as offline


def check_labels(labels: list, num_classes: int, source: str) -> Tensor:
    """Integer labels 0..num_classes-1 as a tensor; another value names the source and its row."""
    bad = next(((row, x) for row, x in enumerate(labels)
                if not isinstance(x, (int, np.integer)) or not 0 <= x < num_classes), None)
    if bad is not None:
        raise DataFormatError(f"{source}: row {bad[0]}: field 'label' holds {bad[1]!r}, expected an integer "
                              f"0..{num_classes - 1}")
    return torch.tensor([int(x) for x in labels], dtype=torch.long)


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
    """The files that :func:`hub_columns` reads ``split`` from ([] when none holds it)."""
    saved = _saved_dataset(data_dir, split)
    if saved is not None:
        return sorted(p for p in (saved / split).rglob("*") if p.is_file())
    return _parquet_files(data_dir, split)


def _hub_readers(data_dir: Path, split: str, columns: list[str]) -> list[tuple[str, Callable[[], object]]]:
    """A local Hugging Face copy's ``split``: [(source file or folder, function reading it as a
    pyarrow.Table)].

    Accepts a ``save_to_disk`` DatasetDict (a folder holding ``dataset_dict.json`` and one
    sub-folder per split) or the hub's parquet files (``plain_text/train-00000-of-00001.parquet``
    or ``.../train/0000.parquet``) at any depth under ``data_dir``; [] when neither holds the split.
    """
    saved = _saved_dataset(data_dir, split)
    if saved is not None:
        def read_saved():
            import datasets

            return datasets.load_from_disk(str(saved))[split].select_columns(columns).with_format("arrow")[:]

        return [(str(saved), read_saved)]
    import pyarrow.parquet as pq

    return [(str(path), partial(pq.read_table, path, columns=columns)) for path in _parquet_files(data_dir, split)]


def _pylist(table, column: str, source: str, fix: str) -> list:
    """A column's values; text that is not UTF-8 names its row and byte."""
    try:
        return table.column(column).to_pylist()
    except UnicodeDecodeError as error:
        import pyarrow as pa

        raw = table.column(column).cast(pa.binary()).to_pylist()
        row = next(i for i, value in enumerate(raw) if value is not None and not _is_utf8(value))
        raise DataFormatError(f"{source}: row {row}: field '{column}' is not UTF-8 text ({error.reason} at byte "
                              f"{error.start}); {fix}") from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def hub_columns(data_dir: Path, split: str, columns: list[str], task: str, dataset: str,
                hub_name: str) -> list[tuple[str, dict[str, list]]]:
    """``split`` of a local Hugging Face copy as [(source, {column: values})]; a DataNotFoundError
    names the folder, the command that downloads the data and the hub page whose parquet files
    would do, and a file that cannot be read is a DataFormatError naming it and that command."""
    fix = f"download it again with python scripts/prepare_data.py {task} --out {data_dir}"
    import pyarrow as pa

    read = []
    for source, load in _hub_readers(data_dir, split, columns):
        try:
            table = load()
            read.append((source, {column: _pylist(table, column, source, fix) for column in columns}))
        except DataFormatError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:
            reason = " ".join(str(error).split())[:200]
            raise DataFormatError(f"{source}: cannot read {dataset}'s '{split}' split ({type(error).__name__}: "
                                  f"{reason}); {fix}") from None
    if not read:
        raise DataNotFoundError(
            f"{task.capitalize()}: no {dataset} '{split}' split under {data_dir}. Download it with\n"
            f"    python scripts/prepare_data.py {task} --out {data_dir}\n"
            f"or put the parquet files of https://huggingface.co/datasets/{hub_name} there."
        )
    return read


def probe_hub(name: str) -> None:
    """One short request to the hub, so that offline ``load_dataset`` never starts its retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(name, timeout=PROBE_TIMEOUT)
    except HfHubHTTPError:
        return  # the hub answered; load_dataset reports what it said
    except Exception as error:
        if not is_network_error(error):
            raise
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConnectionError(reason) from None


def fetch_hub(name: str, out: Path, keep_cache: bool = False) -> Path:
    """``datasets.load_dataset(name)`` into ``out/hf_dataset`` (save_to_disk); returns that folder."""
    target = out / "hf_dataset"
    if (target / "dataset_dict.json").exists():
        return target
    import datasets

    try:
        if not datasets.config.HF_HUB_OFFLINE:  # offline mode reads the download cache only, at once
            probe_hub(name)
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
