"""Downloader against an HTTP server on 127.0.0.1 (Range support, one interrupted transfer); no internet."""

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cxrlib.datasets.download import ChecksumError, DownloadError, download_openi, fetch, network_available
from cxrlib.datasets.fixtures import report_xml


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """Serves ``files``; honours ``Range``; the first GET of a name in ``cut`` stops after that many bytes."""

    def __init__(self, files: dict[str, bytes], cut: dict[str, int] | None = None, ranges: bool = True):
        self.files, self.cut, self.ranges, self.log = files, dict(cut or {}), ranges, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                srv.log.append((name, rng))
                if name not in srv.files:
                    self.send_error(404)
                    return
                data = srv.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng and srv.ranges else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if name in srv.cut:
                    body = body[: srv.cut.pop(name)]
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload():
    return bytes(range(256)) * 4000  # ~1 MB


def test_resume_after_interrupted_transfer(tmp_path, payload):
    srv = Server({"a.bin": payload}, cut={"a.bin": 300_000})
    try:
        dest = tmp_path / "a.bin"
        sha = hashlib.sha256(payload).hexdigest()
        with pytest.raises(DownloadError, match="run again to resume"):
            fetch(srv.url + "a.bin", dest, sha256=sha, retries=0, chunk_size=4096)
        part = tmp_path / "a.bin.part"
        assert not dest.exists() and part.stat().st_size == 300_000
        assert fetch(srv.url + "a.bin", dest, sha256=sha, chunk_size=4096) == dest
        assert dest.read_bytes() == payload and not part.exists()
        assert srv.log == [("a.bin", None), ("a.bin", "bytes=300000-")]
        fetch(srv.url + "a.bin", dest, sha256=sha)  # complete and verified: no request
        assert len(srv.log) == 2
    finally:
        srv.close()


def test_retries_resume_within_one_call(tmp_path, payload):
    srv = Server({"a.bin": payload}, cut={"a.bin": 123_457})
    try:
        fetch(srv.url + "a.bin", tmp_path / "a.bin", retries=1, chunk_size=1000)
        assert (tmp_path / "a.bin").read_bytes() == payload
        assert srv.log[1] == ("a.bin", "bytes=123457-")
    finally:
        srv.close()


def test_server_without_range_restarts(tmp_path, payload):
    srv = Server({"a.bin": payload}, ranges=False)
    try:
        (tmp_path / "a.bin.part").write_bytes(b"garbage from an old attempt")
        fetch(srv.url + "a.bin", tmp_path / "a.bin")
        assert (tmp_path / "a.bin").read_bytes() == payload
    finally:
        srv.close()


def test_checksum_mismatch_and_http_error(tmp_path, payload):
    srv = Server({"a.bin": payload})
    try:
        with pytest.raises(ChecksumError, match="SHA-256"):
            fetch(srv.url + "a.bin", tmp_path / "a.bin", sha256="0" * 64)
        assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.part").exists()
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch(srv.url + "missing.bin", tmp_path / "m.bin")
    finally:
        srv.close()


def test_offline_fails_at_once(tmp_path):
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    assert not network_available(f"http://127.0.0.1:{port}/x", timeout=1)
    t = time.perf_counter()
    with pytest.raises(DownloadError, match="OPENI_ROOT.*make demo"):
        fetch(f"http://127.0.0.1:{port}/NLMCXR_png.tgz", tmp_path / "x.tgz")
    assert time.perf_counter() - t < 5
    assert not list(tmp_path.iterdir())


def test_download_openi_extracts_nlm_layout(tmp_path):
    reports = _tgz({"ecgen-radiology/1.xml": report_xml(1, ["normal"], "Clear.", "Normal.", ["CXR1_IM-0001-1001"])
                    .encode()})
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    images = _tgz({"CXR1_IM-0001-1001.png": png.getvalue()})
    srv = Server({"NLMCXR_reports.tgz": reports, "NLMCXR_png.tgz": images}, cut={"NLMCXR_png.tgz": 100})
    try:
        root = download_openi(tmp_path / "openi", cache=tmp_path / "cache", base_url=srv.url)
        assert (root / "ecgen-radiology" / "1.xml").is_file()
        assert (root / "NLMCXR_png" / "CXR1_IM-0001-1001.png").is_file()
        assert ("NLMCXR_png.tgz", "bytes=100-") in srv.log  # resumed within the call
        from cxrlib.datasets import build_study_table

        table, _ = build_study_table("openi", root=root, val_frac=0, test_frac=0)
        assert table["image_id"].tolist() == ["CXR1_IM-0001-1001"] and table["split"].eq("train").all()
    finally:
        srv.close()


def test_build_downloads_only_into_the_default_folder(workdir, monkeypatch, tmp_path):
    import cxrlib.datasets.download as dl
    from cxrlib.datasets import build_study_table

    calls = []
    monkeypatch.setattr(dl, "download_openi", lambda dest: calls.append(dest) or (_ for _ in ()).throw(
        DownloadError("offline: set OPENI_ROOT ... or run `make demo`")))
    with pytest.raises(DownloadError, match="make demo"):
        build_study_table("openi", download=True)
    assert calls == [workdir / "data" / "raw" / "openi"]
    with pytest.raises(FileNotFoundError, match="holds no Open-I copy"):  # a named root is never downloaded into
        build_study_table("openi", root=tmp_path / "mine", download=True)
    assert len(calls) == 1
