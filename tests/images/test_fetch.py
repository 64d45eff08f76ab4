"""cortexbench.images.fetch against a local HTTP server: retries, dead links, resume, stop at N, Ctrl-C."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from cortexbench.errors import DatasetError
from cortexbench.images.dataset import decode
from cortexbench.images.fetch import fetch, read_url_list, safe_id
from cortexbench.images.synth import encode

ROOT = Path(__file__).resolve().parents[2]
JPEGS = [encode(i, 0) for i in range(6)]
PNG = cv2.imencode(".png", np.full((40, 60, 3), (10, 200, 30), np.uint8))[1].tobytes()


class _Server:
    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # lets slow handlers finish at teardown
        self.slow_seen = threading.Semaphore(0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path
                with outer.lock:
                    outer.hits[path] += 1
                    n = outer.hits[path]
                if path.startswith("/good/"):
                    self._send(200, JPEGS[int(path.split("/")[2].split(".")[0])])
                elif path == "/png":
                    self._send(200, PNG, "image/png")
                elif path == "/flaky":
                    self._send(500, b"oops", "text/plain") if n == 1 else self._send(200, JPEGS[5])
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/good/4.jpg")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/slow"):
                    outer.slow_seen.release()
                    if not outer.release.wait(30):
                        self._send(200, JPEGS[0])
                elif path == "/text":
                    self._send(200, b"<html>gone</html>", "text/html")
                else:
                    self._send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that went away
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    s.thread.start()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(5)


def _list(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "urls.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def _saved(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_fetch_counts_every_outcome(tmp_path, server):
    u = server.url
    urls = _list(tmp_path, [
        "# ImageNet-style list", "",
        f"img0\t{u}/good/0.jpg",
        f"img1\t{u}/good/1.jpg",
        f"pic\t{u}/png",
        f"gone\t{u}/missing",
        f"flaky\t{u}/flaky",
        f"slow\t{u}/slow",
        f"html\t{u}/text",
        f"moved\t{u}/redirect",
        "only-one-field",
        "ftp\tftp://example.org/a.jpg",
        f"img0\t{u}/good/0.jpg",
    ])
    out = tmp_path / "out"
    s = fetch(urls, out, 100, concurrency=4, timeout_s=1.0, retries=1, progress=False, backoff_s=0.01)
    assert (s.ok, s.existing, s.malformed, s.duplicates) == (5, 0, 2, 1)
    assert s.dead == {"http 404": 1, "timeout": 1, "not-an-image": 1}
    assert s.retries == 2  # flaky once, slow once
    assert _saved(out) == {"img0.jpg": JPEGS[0], "img1.jpg": JPEGS[1], "pic.png": PNG, "flaky.jpg": JPEGS[5],
                           "moved.jpg": JPEGS[4]}
    assert s.size_bytes == sum(len(b) for b in _saved(out).values())
    assert (server.hits["/missing"], server.hits["/flaky"], server.hits["/slow"]) == (1, 2, 2)
    assert not s.interrupted and s.lines_read == 13
    text = "\n".join(s.lines())
    assert "5 of 100" in text and "the list ran out" in text and "http 404 1" in text


def test_fetch_stops_at_count_and_resumes(tmp_path, server):
    urls = _list(tmp_path, [f"n{i}\t{server.url}/good/{i}.jpg" for i in range(6)])
    out = tmp_path / "out"
    s = fetch(urls, out, 2, concurrency=4, timeout_s=5, progress=False)
    first = set(_saved(out))
    assert s.ok == 2 and len(first) == 2  # exactly N, though four were in flight
    before = collections.Counter(server.hits)
    s = fetch(urls, out, 3, concurrency=1, timeout_s=5, progress=False)
    assert (s.ok, s.existing) == (1, 2) and len(_saved(out)) == 3
    for name, data in _saved(out).items():
        assert data == JPEGS[int(name[1])]
    requested = server.hits - before
    # no image already there was asked for again, and the new one was; requests the first fetch had in
    # flight when it stopped may reach the server after it returned, so other paths are not counted
    (new,) = set(_saved(out)) - first
    assert requested[f"/good/{new[1:]}"] >= 1
    assert not any(requested[f"/good/{name[1:]}"] for name in first)


def test_fetch_needs_the_list(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        fetch(tmp_path / "nope.txt", tmp_path / "out", 3, progress=False)


def test_read_url_list_and_safe_ids(tmp_path):
    from cortexbench.images.fetch import _Tally

    p = _list(tmp_path, ["a\thttp://x/1.jpg", "../evil\thttps://x/2.jpg", "b http://x/3.jpg", "# c", "junk"])
    tally = _Tally()
    assert list(read_url_list(p, tally)) == [("a", "http://x/1.jpg"), ("_evil", "https://x/2.jpg"),
                                             ("b", "http://x/3.jpg")]
    assert tally.malformed == 1 and tally.lines_read == 5
    assert safe_id("n0144/0764 x") == "n0144_0764_x"


def test_ctrl_c_keeps_finished_files_and_exits_130(tmp_path, server):
    u = server.url
    urls = _list(tmp_path, [f"g0\t{u}/good/0.jpg", f"g1\t{u}/good/1.jpg"]
                 + [f"s{i}\t{u}/slow/{i}" for i in range(6)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortexbench.images", "fetch", "--urls", str(urls), "--out", str(out),
         "--count", "8", "--concurrency", "2", "--timeout", "60", "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        # both workers are waiting on slow URLs, so both good images were saved before
        assert server.slow_seen.acquire(timeout=60) and server.slow_seen.acquire(timeout=60)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert "2 of 8" in stdout and "interrupted after" in stdout
    assert _saved(out) == {"g0.jpg": JPEGS[0], "g1.jpg": JPEGS[1]}
    for data in _saved(out).values():
        decode(data)


def test_fetch_with_enough_images_already_requests_nothing(tmp_path, server):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(3):
        (out / f"old{i}.jpg").write_bytes(JPEGS[i])
    (out / ".old9.jpg.part").write_bytes(b"half")  # an interrupted write
    urls = _list(tmp_path, [f"n{i}\t{server.url}/good/{i}.jpg" for i in range(6)])
    s = fetch(urls, out, 3, progress=False)
    assert (s.ok, s.existing, s.have) == (0, 3, 3)
    assert not server.hits
    assert sorted(_saved(out)) == ["old0.jpg", "old1.jpg", "old2.jpg"]


def test_fetch_command_exits_1_and_says_so_when_the_list_runs_out(tmp_path, server, capsys):
    from cortexbench.images.__main__ import main

    urls = _list(tmp_path, [f"n0\t{server.url}/good/0.jpg", f"gone\t{server.url}/missing"])
    out = tmp_path / "out"
    assert main(["fetch", "--urls", str(urls), "--out", str(out), "--count", "3", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "1 of 3 images" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("python -m cortexbench.images fetch: error: --count 3: got 1 image(s)")
    assert "ran out of usable URLs" in line
    assert main(["fetch", "--urls", str(urls), "--out", str(out), "--count", "1", "--quiet"]) == 0  # enough


def test_fetch_command_defaults_to_its_own_directory_and_warns_about_a_mixed_one(tmp_path, server, capsys,
                                                                                    monkeypatch):
    from cortexbench.images.__main__ import FETCH_DIR, main
    from cortexbench.images.synth import synthesize

    monkeypatch.chdir(tmp_path)
    urls = _list(tmp_path, [f"n{i}\t{server.url}/good/{i}.jpg" for i in range(2)])
    assert main(["fetch", "--urls", str(urls), "--count", "2", "--quiet"]) == 0
    assert sorted(_saved(tmp_path / FETCH_DIR)) == ["n0.jpg", "n1.jpg"]
    assert "warning" not in capsys.readouterr().err
    synthesize(tmp_path / "data" / "images", 3, seed=0, workers=1, progress=False)
    assert main(["fetch", "--urls", str(urls), "--out", "data/images", "--count", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: data/images already holds 3 image(s)" in err and str(FETCH_DIR) in err
