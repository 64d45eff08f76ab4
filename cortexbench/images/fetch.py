"""Download an image set from an ImageNet-style URL list (``id<TAB>url`` per line).

``python -m cortexbench.images fetch --urls FILE --out DIR --count N`` downloads with one
``httpx.AsyncClient``, at most ``concurrency`` requests at a time, each attempt limited to ``timeout_s``;
connection errors, time-outs, 429 and 5xx are retried ``retries`` times with exponential backoff (a 404
is not).  Redirects are followed.  A body that does not decode as an image is skipped, like a dead link.
Each good image is written atomically as ``DIR/<id>.jpg`` (``.png`` for PNG bodies; other formats are
re-encoded to JPEG), and it stops as soon as ``DIR`` holds N images: the images already there count,
and their ids are not downloaded again, so running the same command again resumes an interrupted run.  Ctrl-C cancels the requests in flight, keeps
the finished files and returns the summary with ``interrupted`` set (the command exits 130).

The URL list is read lazily, so a list of millions of lines (ImageNet's fall11_urls.txt) costs no memory.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx

from cortexbench.errors import DatasetError, ImageDecodeError, UsageError
from cortexbench.images.dataset import decode
from cortexbench.progress import Progress

MAX_BODY_BYTES = 32 * 1024 * 1024
USER_AGENT = "cortexbench-fetch/0.1 (+https://github.com/cortexbench)"
_SAVED_SUFFIXES = (".jpg", ".png")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class FetchSummary:
    """What one ``fetch`` call did.  ``dead`` counts the skipped URLs by reason: 'http 404', 'timeout',
    'connection', 'not-an-image', 'too-large', 'bad-url', 'too-many-redirects'."""

    out: Path
    requested: int
    ok: int  # downloaded and saved by this call
    existing: int  # images already in out when the call started (resume); they count towards requested
    dead: dict[str, int] = field(default_factory=dict)
    malformed: int = 0  # lines that are not 'id<TAB>url'
    duplicates: int = 0  # ids seen before in the list
    retries: int = 0
    size_bytes: int = 0  # of the files saved by this call
    seconds: float = 0.0
    lines_read: int = 0
    interrupted: bool = False

    @property
    def dead_total(self) -> int:
        return sum(self.dead.values())

    @property
    def have(self) -> int:
        return self.ok + self.existing

    def lines(self) -> list[str]:
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        dead = ", ".join(f"{k} {v}" for k, v in sorted(self.dead.items())) or "none"
        out = [
            f"{self.out}: {self.have} of {self.requested} images ({self.ok} downloaded, {self.existing} already there)",
            f"dead links    {self.dead_total} ({dead})",
            f"retries       {self.retries}",
            f"malformed     {self.malformed} lines" + (f", {self.duplicates} duplicate ids" if self.duplicates else ""),
            f"downloaded    {self.size_bytes / 1e6:,.1f} MB in {self.seconds:,.1f} s ({rate:,.1f} images/s)",
        ]
        if self.interrupted:
            out.append(f"interrupted after {self.lines_read} lines of the list; run the same command again to resume")
        elif self.have < self.requested:
            out.append(f"the list ran out after {self.lines_read} lines with {self.have} of {self.requested} images")
        return out


@dataclass
class _Tally:
    ok: int = 0
    existing: int = 0
    dead: collections.Counter[str] = field(default_factory=collections.Counter)
    malformed: int = 0
    duplicates: int = 0
    retries: int = 0
    size_bytes: int = 0
    lines_read: int = 0


class _TooLarge(Exception):
    pass


def safe_id(raw: str) -> str:
    """An id usable as a file name: characters other than letters, digits, '.', '_', '-' become '_'."""
    return _UNSAFE.sub("_", raw).lstrip(".")[:200]


def read_url_list(path: Path, tally: _Tally) -> Iterator[tuple[str, str]]:
    """(id, url) for each good line of an ImageNet-style list; counts the malformed ones in ``tally``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            tally.lines_read += 1
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                tally.malformed += 1
                continue
            image_id, url = safe_id(parts[0]), parts[1].strip()
            if not image_id or not url.lower().startswith(("http://", "https://")):
                tally.malformed += 1
                continue
            yield image_id, url


def foreign_images(out: Path) -> int:
    """How many images lie in sub-directories of ``out`` (fetch writes only ``out/<id>.<ext>``): another set,
    such as the synthetic one (``<nnnn>/img_<i>.jpg``), that a stream over ``out`` would mix in."""
    from cortexbench.images.dataset import list_images

    if not out.is_dir():
        return 0
    root = out.resolve()
    try:
        return sum(1 for p in list_images(out) if p.parent != root)
    except DatasetError:  # no images at all
        return 0


def _existing_ids(out: Path) -> set[str]:
    ids = set()
    for entry in os.scandir(out):
        name = entry.name
        if name.startswith("."):
            if name.endswith(".part"):  # an interrupted write
                os.unlink(entry.path)
            continue
        stem, ext = os.path.splitext(name)
        if ext.lower() in _SAVED_SUFFIXES and entry.is_file():
            ids.add(stem)
    return ids


def _as_image_file(data: bytes, url: str) -> tuple[str, bytes] | None:
    """('.jpg' or '.png', bytes to save) when ``data`` decodes as an image, else None (runs in a thread)."""
    try:
        img = decode(data, url)
    except ImageDecodeError:
        return None
    if data.startswith(b"\xff\xd8"):
        return ".jpg", data
    if data.startswith(b"\x89PNG"):
        return ".png", data
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return (".jpg", buf.tobytes()) if ok else None


async def _get(client: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
    async with client.stream("GET", url) as resp:
        if not 200 <= resp.status_code < 300:
            return resp.status_code, b""
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _TooLarge
            chunks.append(chunk)
        return resp.status_code, b"".join(chunks)


async def _download(client: httpx.AsyncClient, url: str, timeout_s: float, retries: int, backoff_s: float,
                    tally: _Tally) -> bytes | str:
    """The body of ``url``, or the reason it is dead."""
    reason = "connection"
    for attempt in range(retries + 1):
        if attempt:
            tally.retries += 1
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            status, data = await asyncio.wait_for(_get(client, url), timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            reason = "timeout"
            continue
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return "bad-url"
        except httpx.TooManyRedirects:
            return "too-many-redirects"
        except _TooLarge:
            return "too-large"
        except httpx.TransportError:
            reason = "connection"
            continue
        if status >= 500 or status == 429:
            reason = f"http {status}"
            continue
        if status >= 300:
            return f"http {status}"
        return data
    return reason


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise DatasetError(f"cannot write {path}: {e.strerror or e}; check the directory and free space") from None


async def fetch_async(urls_file: Path, out: Path, count: int, *, concurrency: int = 32, timeout_s: float = 10.0,
                      retries: int = 2, progress: bool = True, backoff_s: float = 0.5) -> FetchSummary:
    """The implementation of ``fetch``, for callers that already run an event loop."""
    _check_args(urls_file, count, concurrency, timeout_s, retries)
    try:
        out.mkdir(parents=True, exist_ok=True)
        existing = _existing_ids(out)
    except OSError as e:
        raise DatasetError(f"cannot use {out} as the image directory: {e.strerror or e}") from None
    tally = _Tally(existing=len(existing))
    entries = read_url_list(urls_file, tally)
    seen: set[str] = set()
    finished = asyncio.Event()
    interrupted = False
    if tally.existing >= count:
        finished.set()  # nothing to do: the workers return at once
    t0 = time.perf_counter()

    def have() -> int:
        return tally.ok + tally.existing

    active = concurrency

    async def worker(client: httpx.AsyncClient, bar: Progress) -> None:
        nonlocal active
        try:
            await work(client, bar)
        except Exception:
            finished.set()  # stop the others; the error is raised below
            raise
        finally:
            active -= 1
            if active == 0:  # the list ran out
                finished.set()

    async def work(client: httpx.AsyncClient, bar: Progress) -> None:
        while not finished.is_set():
            entry = next(entries, None)
            if entry is None:
                return
            image_id, url = entry
            if image_id in seen:
                tally.duplicates += 1
                continue
            seen.add(image_id)
            if image_id not in existing:
                body = await _download(client, url, timeout_s, retries, backoff_s, tally)
                if isinstance(body, str):
                    tally.dead[body] += 1
                    bar.set(have(), note=f"{sum(tally.dead.values())} dead")
                    continue
                image = await asyncio.to_thread(_as_image_file, body, url)
                if image is None:
                    tally.dead["not-an-image"] += 1
                    continue
                if finished.is_set():  # the target was reached while this one was in flight
                    return
                ext, data = image
                _write_atomic(out / f"{image_id}{ext}", data)
                tally.ok += 1
                tally.size_bytes += len(data)
            bar.set(have())
            if have() >= count:
                finished.set()

    def on_interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        finished.set()

    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        handled = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        handled = False
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        with Progress("fetch", total=count, unit="img", enabled=progress) as bar:
            bar.set(tally.existing, note=f"{tally.existing} already there" if tally.existing else None)
            async with httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(timeout_s), limits=limits,
                                         headers={"User-Agent": USER_AGENT}) as client:
                tasks = [asyncio.create_task(worker(client, bar)) for _ in range(concurrency)]
                try:
                    await finished.wait()  # target reached, list exhausted, Ctrl-C, or a worker failed
                finally:
                    for t in tasks:
                        t.cancel()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, Exception):
                        raise r
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
        entries.close()
    return FetchSummary(out, count, tally.ok, tally.existing, dict(tally.dead), tally.malformed, tally.duplicates,
                        tally.retries, tally.size_bytes, time.perf_counter() - t0, tally.lines_read, interrupted)


def _check_args(urls_file: Path, count: int, concurrency: int, timeout_s: float, retries: int) -> None:
    if count < 1:
        raise UsageError(f"--count must be 1 or more, not {count}")
    if concurrency < 1:
        raise UsageError(f"--concurrency must be 1 or more, not {concurrency}")
    if timeout_s <= 0:
        raise UsageError(f"--timeout must be more than 0 seconds, not {timeout_s}")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, not {retries}")
    if not Path(urls_file).is_file():
        raise DatasetError(f"--urls {urls_file}: no such file (an ImageNet-style list: one 'id<TAB>url' per line)")


def fetch(urls_file: Path, out: Path, count: int, *, concurrency: int = 32, timeout_s: float = 10.0,
          retries: int = 2, progress: bool = True, backoff_s: float = 0.5) -> FetchSummary:
    """Download images of the list until ``out`` holds ``count`` images (see the module docstring)."""
    return asyncio.run(fetch_async(Path(urls_file), Path(out), count, concurrency=concurrency, timeout_s=timeout_s,
                                   retries=retries, progress=progress, backoff_s=backoff_s))
