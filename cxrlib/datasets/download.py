"""Resumable, checksummed, atomic downloads (the Open-I NLM archives) with a progress bar.

``fetch(url, dest, sha256=None)`` downloads into ``<dest>.part``, resuming an interrupted transfer
with an HTTP ``Range`` request, checks the SHA-256 when given, and renames the file to ``dest``
only when it is complete: ``dest`` is never a partial file. Offline it fails at once (a short
connection probe, no long timeout) with a message naming the alternatives: a local copy via
``OPENI_ROOT`` or ``make demo``. ``download_openi(dest)`` fetches and unpacks the two NLM archives.
Standard library only (urllib), so proxies from the environment apply.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from cxrlib import paths

OPENI_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections/"
OPENI_ARCHIVES = {"NLMCXR_reports.tgz": "ecgen-radiology", "NLMCXR_png.tgz": "NLMCXR_png"}
OFFLINE_HINT = ("set OPENI_ROOT to a local copy of Open-I (NLM or Kaggle layout), or run `make demo` "
                "(the offline profile needs no download)")


class DownloadError(RuntimeError):
    """A download that cannot complete; the message says why and what to do instead."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected SHA-256 (the partial file is removed)."""


def network_available(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``url``'s host (or to the proxy that would carry it) opens in ``timeout`` s."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or 80
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _transfer(url: str, part: Path, timeout: float, chunk_size: int) -> None:
    """One request: resume ``part`` from its size (Range) or start over when the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part file is already complete
            total = re.search(r"/(\d+)", exc.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == offset:
                return
            part.unlink()
            raise DownloadError(f"{url}: server refused to resume at byte {offset}; partial file removed, "
                                f"run again to restart") from exc
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: {getattr(exc, 'reason', exc)}; {OFFLINE_HINT}") from exc
    with resp:
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise DownloadError(f"{url}: server resumed at {m.group(1) if m else '?'} instead of byte {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length else None
        done = offset
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          desc=Path(urlparse(url).path).name, leave=False) as bar:
            try:
                while block := resp.read(chunk_size):
                    fh.write(block)
                    done += len(block)
                    bar.update(len(block))
            except (http.client.IncompleteRead, OSError) as exc:
                raise DownloadError(f"{url}: transfer interrupted after {done} bytes ({exc}); run again to resume") \
                    from exc
        if total is not None and done != total:
            raise DownloadError(f"{url}: transfer interrupted after {done} of {total} bytes; run again to resume")


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, retries: int = 2, timeout: float = 30.0,
          probe_timeout: float = 5.0, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` (resumable, checksummed, atomic); a complete ``dest`` is reused.

    ``retries`` interrupted transfers are resumed automatically; after that the ``.part`` file stays
    and the next call resumes it.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256 is None or sha256_file(dest) == sha256.lower():
            return dest
        dest.unlink()  # a stale or corrupt copy: download again
    if not network_available(url, probe_timeout):
        raise DownloadError(f"cannot reach {urlparse(url).hostname} to download {url} (no network?): {OFFLINE_HINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, chunk_size)
            break
        except DownloadError:
            if attempt == retries or not part.exists():
                raise
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise ChecksumError(f"{url}: SHA-256 {got} != expected {sha256}; the partial file was removed")
    os.replace(part, dest)
    return dest


def extract_tgz(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Unpack ``archive`` into the folder ``target`` atomically (a single top folder is unwrapped).

    Extraction uses tarfile's ``data`` filter (no absolute paths, links out of the tree, devices).
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        entries = list(tmp.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        os.replace(root, target)
    except tarfile.TarError as exc:
        raise DownloadError(f"{archive} is not a readable tar archive ({exc}); delete it and download again") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_openi(dest: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                   base_url: str = OPENI_BASE_URL, checksums: dict[str, str] | None = None) -> Path:
    """Fetch NLMCXR_reports.tgz and NLMCXR_png.tgz into ``cache`` and unpack them into ``dest`` (NLM layout).

    ``dest`` defaults to ``paths.openi_root()``, ``cache`` to ``raw_dir()/downloads``. Returns ``dest``,
    which then holds ``ecgen-radiology/`` and ``NLMCXR_png/``.
    """
    dest = Path(dest) if dest else paths.openi_root()
    cache = Path(cache) if cache else paths.raw_dir() / "downloads"
    for name, folder in OPENI_ARCHIVES.items():
        if (dest / folder).is_dir():
            continue
        archive = fetch(base_url.rstrip("/") + "/" + name, cache / name, (checksums or {}).get(name))
        extract_tgz(archive, dest / folder)
    return dest
