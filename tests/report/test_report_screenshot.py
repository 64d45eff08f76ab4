"""report.html in a real browser: headless Chromium (Debian's chromium-headless-shell) shows the embedded
plots.  A page whose picture is known (four blocks of four colours) must show each block whole; a real
comparison report must show its bars in the plot's colours."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from cortexbench.report.__main__ import main
from cortexbench.report.html import to_html

BROWSER = shutil.which("chromium-headless-shell")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium-headless-shell is not installed (Debian: apt-get "
                                                        "install chromium-headless-shell)")
BLOCKS_BGR = ((176, 114, 76), (82, 132, 221), (104, 168, 85), (82, 78, 196))  # #4C72B0 #DD8452 #55A868 #C44E52
BLOCK = (120, 200)  # height, width of each block


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    """The page at 1200 x 2000 CSS pixels, as a BGR array."""
    shot = tmp_path / "shot.png"
    cmd = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--force-device-scale-factor=1",
           f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (2000, 1200, 3), None if img is None else img.shape
    return img


def _pixels_near(img: np.ndarray, bgr: tuple[int, int, int], tolerance: int = 6) -> int:
    return int(np.count_nonzero(np.all(np.abs(img.astype(np.int16) - np.array(bgr)) <= tolerance, axis=2)))


def test_a_page_whose_picture_is_known_shows_every_block_of_it(tmp_path):
    h, w = BLOCK
    picture = np.zeros((h, 4 * w, 3), np.uint8)
    for k, colour in enumerate(BLOCKS_BGR):
        picture[:, k * w:(k + 1) * w] = colour
    ok, png = cv2.imencode(".png", picture)
    assert ok
    (tmp_path / "known.png").write_bytes(png.tobytes())
    md = "# A known picture\n\n| a | b |\n|:---|---:|\n| 1 | 2 |\n\n![four blocks](known.png)\n"
    page = tmp_path / "page" / "report.html"
    page.parent.mkdir()
    page.write_text(to_html(md, tmp_path, "known"))  # the page alone in its folder: the picture is inside it
    img = screenshot(page, tmp_path)
    for colour in BLOCKS_BGR:
        assert _pixels_near(img, colour) >= 0.95 * h * w, colour  # each block whole, at its size


def test_a_comparison_report_shows_its_plot(stream_runs, tmp_path):
    out = tmp_path / "cmp"
    assert main([str(stream_runs["repeats"]), str(stream_runs["slower"].parent), "--out", str(out)]) == 0
    (tmp_path / "page").mkdir()
    page = Path(shutil.copy(out / "report.html", tmp_path / "page" / "report.html"))  # without compare.png beside it
    img = screenshot(page, tmp_path)
    assert img.std() > 20  # not blank
    plot_colours = [_pixels_near(img, c) for c in BLOCKS_BGR[:2]]  # the baseline's bars and the second run's
    assert min(plot_colours) > 2000, plot_colours
    distinct = len(np.unique(img.reshape(-1, 3), axis=0))
    assert distinct > 500, distinct  # text, tables and a picture, not a blank or an error page
