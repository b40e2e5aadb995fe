"""Fetching the data sets: resumable HTTP downloads and archive unpacking.

- :func:`download` fetches a URL into ``<dest>.part`` and resumes an interrupted download with an
  HTTP Range request; the finished file is checked (its size against the server's, its MD5
  against Google Cloud Storage's ``x-goog-hash`` header when the server sends one, a given
  sha256) and only then renamed to ``dest``, so a half-written file never carries the final name.
- :func:`extract` unpacks a (gzipped) tar into a hidden staging folder and moves its top-level
  entries into place when complete.
- :func:`locate` finds the folders that ``lra_release.gz`` (ListOps, Retrieval/AAN, Pathfinder)
  unpacks to, for ``prepare_data.py lra_release`` (:mod:`cast.app.prepare`).
- The hub and tfds sources of Text and Image are in :mod:`tasks.sources`.

A network failure (also inside the hub's or tfds's own download: :func:`is_network_error`)
raises :class:`DownloadError` whose one-line message names what to fetch by hand and where to
put it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path

import rich.progress
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tasks.base import DataFormatError

LRA_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
CHUNK = 1 << 20
# What the LRA archive holds, by the folder each task's reader looks for.
RELEASE_FOLDERS = {
    "ListOps": "listops-1000",
    "Retrieval (AAN)": "tsv_data",
    "Pathfinder": "pathfinder32",
    "Path-X": "pathfinder128",
}


class DownloadError(RuntimeError):
    """A download or fetch that failed; the message is one line and says what to do by hand."""


def _by_hand(url: str, dest: Path) -> str:
    return f"download it by hand (e.g. `curl -L -C - -o {dest} {url}`) and put it at {dest}, then run this again"


def _content_total(headers, start: int, status: int) -> int | None:
    """Size of the whole file: ``Content-Range: bytes a-b/TOTAL`` on 206/416, else Content-Length."""
    content_range = headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = headers.get("Content-Length")
    return int(length) + (start if status == 206 else 0) if length is not None else None


def _goog_md5(headers) -> str | None:
    """Base64 MD5 of the whole object from ``x-goog-hash: crc32c=...,md5=...`` (GCS), if sent."""
    for header in headers.get_all("x-goog-hash") or []:
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name == "md5":
                return value
    return None


def _check(part: Path, url: str, dest: Path, total: int | None, md5: str | None, sha256: str | None, progress: bool):
    size = part.stat().st_size
    if total is not None and size < total:
        raise DownloadError(f"{url}: got {size:,} of {total:,} bytes; run this again to resume from {part}")
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"{url}: got {size:,} bytes, more than the server's {total:,}; deleted {part}, run this again")
    if md5 is None and sha256 is None:
        return
    digests = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    with rich.progress.open(part, "rb", description=f"checking {dest.name}", disable=not progress, transient=True) as f:
        while block := f.read(CHUNK):
            for digest in digests.values():
                digest.update(block)
    wrong = (md5 is not None and base64.b64encode(digests["md5"].digest()).decode() != md5) or (
        sha256 is not None and digests["sha256"].hexdigest() != sha256.lower()
    )
    if wrong:
        part.unlink()
        raise DownloadError(f"{url}: checksum mismatch, the download is corrupt; deleted {part}, run this again")


def download(url: str, dest: str | Path, sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), check it, rename it; returns ``dest``.

    An existing ``dest`` is taken as complete: only a checked download is ever renamed to it.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and _content_total(error.headers, start, 416) == start:
            _check(part, url, dest, start, _goog_md5(error.headers), sha256, progress)
            os.replace(part, dest)
            return dest
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; {_by_hand(url, dest)}") from None
    except (urllib.error.URLError, OSError, HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"cannot reach {url} ({reason}); {_by_hand(url, dest)}") from None
    with response:
        if response.status != 206:  # the server ignored the Range header: start afresh
            start = 0
        total = _content_total(response.headers, start, response.status)
        md5 = _goog_md5(response.headers)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        try:
            with open(part, "ab" if start else "wb") as f, Progress(*columns, disable=not progress) as bar:
                task = bar.add_task(dest.name, total=total, completed=start)
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.advance(task, len(block))
        except (OSError, HTTPException) as error:
            raise DownloadError(f"download of {url} interrupted ({error!r}); run this again to resume from {part}") from None
    _check(part, url, dest, total, md5, sha256, progress)
    os.replace(part, dest)
    return dest


def extract(archive: str | Path, out: str | Path, progress: bool = True) -> list[Path]:
    """Unpack a tar/tar.gz into ``out``; returns the top-level entries it created.

    Runs once: a marker ``out/.<archive>.extracted`` records completion. The archive is unpacked
    into ``out/.<archive>.partial/`` first (which a crash leaves behind, never half a data set).
    """
    archive, out = Path(archive), Path(out)
    marker = out / f".{archive.name}.extracted"
    if marker.exists():
        return [out / name for name in marker.read_text().split("\n") if name]
    staging = out / f".{archive.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with rich.progress.open(archive, "rb", description=f"unpacking {archive.name}", disable=not progress) as raw:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataFormatError(
            f"{archive}: cannot unpack ({error}); if the archive is damaged, delete it and run this again"
        ) from None
    entries = sorted(staging.iterdir())
    clash = next((out / e.name for e in entries if (out / e.name).exists()), None)
    if clash is not None:
        raise FileExistsError(f"{clash} already exists; move it away to unpack {archive} (unpacked copy in {staging})")
    for entry in entries:
        os.replace(entry, out / entry.name)
    staging.rmdir()
    marker.write_text("\n".join(e.name for e in entries) + "\n")
    return [out / e.name for e in entries]


NETWORK_ERRNOS = {errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ECONNRESET,
                  errno.ETIMEDOUT}


def is_network_error(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a failure to reach a server."""
    kinds = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError, HTTPException]
    try:
        import requests  # what tfds downloads with

        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, tuple(kinds)) or (isinstance(error, OSError) and error.errno in NETWORK_ERRNOS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def locate(root: str | Path, names, max_depth: int = 4) -> dict[str, Path]:
    """The shallowest folder called each of ``names`` within ``max_depth`` levels below ``root``.

    A matched folder is not entered, so the walk stays cheap next to Pathfinder's ~10^6 images.
    """
    found: dict[str, Path] = {}
    root = Path(root)
    level = [root] if root.is_dir() else []
    for _ in range(max_depth):
        deeper = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                if child.name in names:
                    found.setdefault(child.name, child)
                elif not child.name.startswith("pathfinder"):
                    deeper.append(child)
        level = deeper
    return found
