"""cortexbench.images.synth: layout, determinism, resume, ImageNet-like sizes."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from cortexbench.errors import UsageError
from cortexbench.images import synth
from cortexbench.images.dataset import list_images
from cortexbench.images.synth import encode, image_path, source_photos, synthesize


def _contents(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in list_images(d)}


def test_layout(tmp_path):
    assert image_path(tmp_path, 1234) == tmp_path / "0001" / "img_001234.jpg"
    assert image_path(tmp_path, 7) == tmp_path / "0000" / "img_000007.jpg"
    s = synthesize(tmp_path, 3, workers=1, progress=False)
    assert sorted(_contents(tmp_path)) == ["0000/img_000000.jpg", "0000/img_000001.jpg", "0000/img_000002.jpg"]
    assert (s.written, s.skipped, s.count) == (3, 0, 3)
    assert s.size_bytes == sum(p.stat().st_size for p in list_images(tmp_path))
    assert s.seconds > 0 and s.images_per_s > 0
    assert not [p for p in (tmp_path / "0000").iterdir() if p.name.startswith(".")]


def test_deterministic_for_a_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK", 2)  # three tasks, so two worker processes really run
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, 5, seed=3, workers=1, progress=False)
    synthesize(b, 5, seed=3, workers=2, progress=False)  # other processes, other chunking: same files
    synthesize(c, 5, seed=4, workers=1, progress=False)
    assert _contents(a) == _contents(b)
    ca, cc = _contents(a), _contents(c)
    assert all(ca[k] != cc[k] for k in ca)
    assert len(set(ca.values())) == 5  # every picture differs


def test_file_depends_only_on_seed_and_index(tmp_path):
    synthesize(tmp_path, 2, seed=9, workers=1, progress=False)
    assert image_path(tmp_path, 1).read_bytes() == encode(1, 9)
    assert encode(1, 9) != encode(2, 9)


def test_resume_skips_existing_and_removes_stale_temps(tmp_path):
    synthesize(tmp_path, 4, workers=1, progress=False)
    keep = image_path(tmp_path, 0)
    keep.write_bytes(b"user's own file")  # existing files are never overwritten
    image_path(tmp_path, 2).unlink()
    stale = tmp_path / "0000" / ".img_000005.jpg.999.tmp"
    stale.write_bytes(b"half")
    s = synthesize(tmp_path, 6, workers=1, progress=False)
    assert (s.written, s.skipped) == (3, 3)
    assert keep.read_bytes() == b"user's own file"
    assert image_path(tmp_path, 2).read_bytes() == encode(2, 0)
    assert not stale.exists()
    assert len(list_images(tmp_path)) == 6


def test_sizes_like_imagenet():
    sizes, shapes = [], collections.Counter()
    for i in range(60):
        data = encode(i, 0)
        sizes.append(len(data))
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        shapes[img.shape[1], img.shape[0]] += 1
    mean = sum(sizes) / len(sizes)
    assert 80_000 <= mean <= 130_000, f"mean file size {mean / 1e3:.1f} KB"
    assert shapes.most_common(1)[0][0] == (500, 375)
    assert all(max(s) <= 500 and min(s) >= 64 for s in shapes)
    assert len(shapes) >= 4  # several aspect ratios


def test_source_photos_found_through_matplotlib():
    names = [p.name for p, _ in source_photos()]
    assert "grace_hopper.jpg" in names
    assert all(p.is_file() and os.path.isabs(p) for p, _ in source_photos())


@pytest.mark.parametrize("kwargs", [{"count": 0}, {"count": 3, "seed": -1}, {"count": 3, "workers": 0}])
def test_bad_arguments(tmp_path, kwargs):
    count = kwargs.pop("count")
    with pytest.raises(UsageError):
        synthesize(tmp_path, count, progress=False, **kwargs)
