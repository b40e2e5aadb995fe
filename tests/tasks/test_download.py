"""Downloads resume over HTTP Range, are checked before they get their name, and unpack atomically."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import socket
import sys
import tarfile
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts.prepare_data import main as prepare_main
from tasks.base import DataFormatError, find_path
from tasks.download import DownloadError, download, extract, is_network_error, locate

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files from ``server.root`` with Range support; knobs on the server object:
    ``ranges`` (honour Range), ``cut`` (close after that many body bytes), ``md5`` (x-goog-hash)."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") and server.ranges else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if server.md5 is not None:
            self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={server.md5}")
        self.end_headers()
        body = data[start:]
        self.wfile.write(body[: server.cut] if server.cut is not None else body)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    (root / "blob.bin").write_bytes(PAYLOAD)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.ranges, httpd.cut, httpd.md5, httpd.requests = root, True, None, None, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_plain_download_checks_size_and_renames(server, tmp_path):
    dest = download(f"{server.url}/blob.bin", tmp_path / "out" / "blob.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("blob.bin.part").exists()
    assert server.requests == [None]


def test_resumes_a_partial_part_file_with_a_range_request(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD[:3000])
    download(f"{server.url}/blob.bin", dest, progress=False)
    assert server.requests == ["bytes=3000-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"x" * 3000)
    download(f"{server.url}/blob.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_the_part_and_the_next_call_resumes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    server.cut = 4000
    with pytest.raises(DownloadError, match="run this again to resume"):
        download(f"{server.url}/blob.bin", dest, progress=False)
    assert not dest.exists()
    assert dest.with_name("blob.bin.part").stat().st_size == 4000
    server.cut = None
    download(f"{server.url}/blob.bin", dest, progress=False)
    assert server.requests[-1] == "bytes=4000-"
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(PAYLOAD)
    download(f"{server.url}/blob.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_gcs_md5_header_is_verified(server, tmp_path):
    server.md5 = md5_b64(PAYLOAD)
    assert download(f"{server.url}/blob.bin", tmp_path / "good.bin", progress=False).read_bytes() == PAYLOAD
    server.md5 = md5_b64(b"something else")
    dest = tmp_path / "bad.bin"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(f"{server.url}/blob.bin", dest, progress=False)
    assert not dest.exists() and not dest.with_name("bad.bin.part").exists()


def test_sha256_argument_is_verified(server, tmp_path):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    download(f"{server.url}/blob.bin", tmp_path / "a.bin", sha256=good, progress=False)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(f"{server.url}/blob.bin", tmp_path / "b.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "b.bin").exists()


def test_unreachable_server_says_in_one_line_what_to_fetch_by_hand(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/lra_release.gz"
    dest = tmp_path / "data" / "lra_release.gz"
    with pytest.raises(DownloadError) as info:
        download(url, dest, progress=False, timeout=5)
    message = str(info.value)
    assert "\n" not in message and url in message and str(dest) in message and "by hand" in message


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.gz", tmp_path / "missing.gz", progress=False)


def make_release(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


RELEASE = {
    "lra_release/lra_release/tsv_data/new_aan_pairs.train.tsv": b"1\ta\tb\tx\ty\n",
    "lra_release/lra_release/listops-1000/basic_train.tsv": b"Source\tTarget\n",
    "lra_release/lra_release/pathfinder32/curv_baseline/metadata/0.npy": b"imgs/0 sample_0.png 0 1\n",
}


def test_extract_unpacks_nested_folders_once(tmp_path):
    archive = make_release(tmp_path / "lra_release.gz", RELEASE)
    out = tmp_path / "data"
    assert extract(archive, out, progress=False) == [out / "lra_release"]
    for name, data in RELEASE.items():
        assert (out / name).read_bytes() == data
    assert find_path(out, "tsv_data/new_aan_pairs.train.tsv") == out / list(RELEASE)[0]
    assert not list(out.glob(".*.partial"))
    (out / list(RELEASE)[0]).unlink()
    extract(archive, out, progress=False)
    assert not (out / list(RELEASE)[0]).exists(), "a finished extraction must not run again"


def test_damaged_archive_leaves_nothing_behind(tmp_path):
    archive = make_release(tmp_path / "lra_release.gz", RELEASE)
    archive.write_bytes(archive.read_bytes()[:60])
    out = tmp_path / "data"
    with pytest.raises(DataFormatError, match="lra_release.gz: cannot unpack"):
        extract(archive, out, progress=False)
    assert list(out.iterdir()) == []


def test_locate_finds_folders_at_any_depth(tmp_path):
    make_release(tmp_path / "r.gz", RELEASE)
    extract(tmp_path / "r.gz", tmp_path / "data", progress=False)
    found = locate(tmp_path / "data", ["tsv_data", "listops-1000", "pathfinder32", "pathfinder128"])
    assert found["tsv_data"] == tmp_path / "data/lra_release/lra_release/tsv_data"
    assert found["pathfinder32"].name == "pathfinder32" and "pathfinder128" not in found


def test_prepare_lra_release_downloads_unpacks_and_reports(server, tmp_path, capsys):
    make_release(server.root / "lra_release.gz", RELEASE)
    out = tmp_path / "data" / "lra_release"
    assert prepare_main(["lra_release", "--url", f"{server.url}/lra_release.gz", "--out", str(out), "--delete-archive"]) == 0
    assert (out / list(RELEASE)[0]).exists() and not (out / "lra_release.gz").exists()
    printed = capsys.readouterr().out
    assert f"task.data_dir={out / 'lra_release' / 'lra_release'}" in printed
    assert prepare_main(["lra_release", "--url", f"{server.url}/gone.gz", "--out", str(out)]) == 0, "already there"


def test_prepare_lra_release_offline_prints_one_line_and_fails(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert prepare_main(["lra_release", "--url", f"http://127.0.0.1:{port}/lra_release.gz", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "by hand" in err and str(tmp_path / "lra_release.gz") in err


def fake_tfds(monkeypatch, error: Exception) -> list:
    """tensorflow_datasets whose download_and_prepare raises ``error``; records its manual_dir."""
    manual_dirs = []

    class Builder:
        def download_and_prepare(self, download_config):
            manual_dirs.append(download_config.manual_dir)
            raise error

    module = types.SimpleNamespace(builder=lambda name, data_dir: Builder(),
                                   download=types.SimpleNamespace(DownloadConfig=types.SimpleNamespace))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    return manual_dirs


def unreachable() -> Exception:
    """What requests (tfds's downloader) raises offline, from the socket's own error."""
    import requests

    try:
        try:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        except OSError as cause:
            raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='ai.stanford.edu'): "
                                                      "Max retries exceeded") from cause
    except requests.exceptions.ConnectionError as error:
        return error


@pytest.mark.parametrize("task,archive", [("text", "aclImdb_v1.tar.gz"), ("image", "cifar-10-binary.tar.gz")])
def test_prepare_tfds_offline_prints_one_line_with_what_to_fetch(task, archive, tmp_path, monkeypatch, capsys):
    manual_dirs = fake_tfds(monkeypatch, unreachable())
    out = tmp_path / task
    assert prepare_main([task, "--source", "tfds", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    manual = out / "tfds" / "downloads" / "manual"
    assert err.count("\n") == 0 and "cannot reach the network" in err and "by hand" in err
    assert f"/{archive} by hand" in err and f"{manual}/ as {archive}" in err
    assert manual_dirs == [str(manual)], "tfds must look for the hand-fetched archive where the message says"


def test_prepare_tfds_other_errors_are_not_called_offline(tmp_path, monkeypatch):
    fake_tfds(monkeypatch, ValueError("bad checksum"))
    with pytest.raises(ValueError, match="bad checksum"):
        prepare_main(["text", "--source", "tfds", "--out", str(tmp_path)])


def test_network_errors_are_recognised_through_their_causes():
    assert is_network_error(unreachable().__cause__) and is_network_error(unreachable())
    try:
        try:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        except OSError as cause:
            raise RuntimeError("download failed") from cause
    except RuntimeError as wrapped:
        assert is_network_error(wrapped)
    assert not is_network_error(FileNotFoundError(errno.ENOENT, "no such file"))
    assert not is_network_error(ValueError("bad checksum"))

