"""A synthetic ImageNet-like JPEG set made from real photographs that installed packages ship.

``python -m cortexbench.images synth --count N --out DIR`` writes ``DIR/<nnnn>/img_<index>.jpg`` (1000 files
per sub-directory).  The pictures are random crops of sample photos (matplotlib's ``grace_hopper.jpg`` and
``Minduka_Present_Blue_Pack.png``, plus scikit-image's colour photos when it is installed) at random
scales, flips and small rotations, with colour, brightness and contrast jitter and mild sensor-like
noise.  Sizes and JPEG qualities follow ImageNet's: mostly 500 x 375, 375 x 500 and 500 x 333 with a tail
of other aspect ratios, about 100 KB a file on average.

File ``i`` depends only on the seed and ``i`` (and on which sample photos are installed), so a set can be
made in parallel, interrupted and resumed: every file is written to a temporary name and renamed, and
files already there are skipped.  One picture is one ``resize`` of a crop (plus a flip), or for a third
of them one ``warpAffine`` (crop + scale + rotation + flip); then one ``cv2.transform`` (all the colour
jitter), one ``addWeighted`` with a slice of a precomputed noise field and one ``imencode``.  Each source
photo is kept at a few scales (Lanczos-enlarged or area-shrunk once per process) so that the per-image
resample never magnifies or shrinks by more than about 1.4x.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cortexbench.errors import DatasetError, UsageError
from cortexbench.progress import Progress

PER_DIR = 1000
CHUNK = 50  # images per task handed to a worker process

# (width, height) and weight; the rest of the weight goes to other aspect ratios (see _pick_size).
_SIZES = (((500, 375), 0.40), ((375, 500), 0.12), ((500, 333), 0.14), ((333, 500), 0.05),
          ((500, 334), 0.04), ((500, 500), 0.06), ((500, 400), 0.03), ((400, 500), 0.02))
_QUALITIES = (85, 90, 92, 94, 95, 96, 97)
_QUALITY_P = (0.04, 0.08, 0.10, 0.16, 0.20, 0.20, 0.22)
_NOISE_SIGMA = (5.0, 12.0)
_TILTED = 1 / 3
_BANK_SIGMA = 16.0
_BANK_SIDE = 1024
_LUMA_BGR = np.array([0.114, 0.587, 0.299])

_MPL_SAMPLES = (("grace_hopper.jpg", 1.0), ("Minduka_Present_Blue_Pack.png", 0.25))
_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


@dataclass(frozen=True)
class SynthSummary:
    """What one ``synthesize`` call did."""

    out: Path
    count: int
    written: int
    skipped: int  # already there (resume)
    size_bytes: int  # of the files written by this call
    seconds: float
    sources: tuple[str, ...]  # the sample photos used

    @property
    def mean_size_bytes(self) -> float:
        return self.size_bytes / self.written if self.written else 0.0

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"{self.out}: {self.written} written, {self.skipped} already there, {self.count} in all"]
        if self.written:
            out.append(f"mean file size {self.mean_size_bytes / 1e3:,.1f} KB, {self.size_bytes / 1e6:,.1f} MB "
                       f"written in {self.seconds:,.1f} s ({self.images_per_s:,.0f} images/s)")
        out.append(f"from {len(self.sources)} sample photos: {', '.join(self.sources)}")
        return out


def image_path(out: Path, index: int) -> Path:
    """Where image ``index`` of a set lives: ``out/<index // 1000, 4 digits>/img_<index, 6 digits>.jpg``."""
    return Path(out) / f"{index // PER_DIR:04d}" / f"img_{index:06d}.jpg"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_photos() -> list[tuple[Path, float]]:
    """The sample photos installed packages ship (path, weight), found through the packages' locations."""
    found: list[tuple[Path, float]] = []
    mpl = _package_dir("matplotlib")
    if mpl is not None:
        for name, weight in _MPL_SAMPLES:
            p = mpl / "mpl-data" / "sample_data" / name
            if p.is_file():
                found.append((p, weight))
    sk = _package_dir("skimage")
    if sk is not None:
        for name in _SKIMAGE_PHOTOS:
            p = sk / "data" / name
            if p.is_file():
                found.append((p, 1.0))
    return found


# --- per-process state ------------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    levels: list[tuple[float, np.ndarray]]  # (factor relative to the original, image)
    height: int
    width: int


@dataclass
class _State:
    sources: list[_Source]
    weights: np.ndarray
    bank: np.ndarray  # uint8 noise around 128, _BANK_SIDE x _BANK_SIDE x 3


_STATE: _State | None = None


def _load_source(path: Path) -> _Source | None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim not in (2, 3) or min(img.shape[:2]) < 32:
        return None
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1.0, float(img.max())))
    if img.shape[2] == 4:  # composite over a soft studio-like gradient
        h, w = img.shape[:2]
        ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        bg = (np.array([235, 225, 215], np.float32) * (1 - ramp) + np.array([170, 160, 150], np.float32) * ramp)
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3] * alpha + bg * (1 - alpha)).astype(np.uint8)
    elif img.shape[2] != 3:
        return None
    h, w = img.shape[:2]
    levels = [(1.0, img)]
    f = 1.0
    while min(h, w) * f < 700 and f < 8:
        f *= 2
        levels.append((f, cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_LANCZOS4)))
    f = 1.0
    while max(h, w) * f > 1400:
        f /= 2
        levels.append((f, cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)))
    return _Source(path.name, levels, h, w)


def _state() -> _State:
    global _STATE
    if _STATE is None:
        sources, weights = [], []
        for path, weight in source_photos():
            src = _load_source(path)
            if src is not None:
                sources.append(src)
                weights.append(weight)
        if not sources:
            raise DatasetError("no sample photos found to synthesise images from: install matplotlib "
                               "(pip install matplotlib), which ships mpl-data/sample_data/grace_hopper.jpg")
        rng = np.random.default_rng(0x5EED)
        noise = rng.normal(128.0, _BANK_SIGMA, (_BANK_SIDE, _BANK_SIDE, 3))
        bank = np.clip(noise, 0, 255).astype(np.uint8)
        w = np.asarray(weights, dtype=np.float64)
        _STATE = _State(sources, w / w.sum(), bank)
    return _STATE


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    cv2.setNumThreads(1)
    _state()


# --- one image --------------------------------------------------------------------------------------


def _pick_size(rng: np.random.Generator) -> tuple[int, int]:
    u = rng.random()
    for (w, h), p in _SIZES:
        if u < p:
            return w, h
        u -= p
    long_side = 500 if rng.random() < 0.8 else int(rng.integers(300, 500))
    short_side = max(64, round(long_side * rng.uniform(0.5, 1.0)))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def render(index: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """The BGR picture of image ``index`` and its JPEG quality; depends only on ``seed`` and ``index``."""
    st = _state()
    rng = np.random.default_rng([seed, index])
    out_w, out_h = _pick_size(rng)
    src = st.sources[int(rng.choice(len(st.sources), p=st.weights))]
    # A third of the pictures are tilted (a warpAffine); the rest are a crop and one resize (3x faster).
    tilted = rng.random() < _TILTED
    angle = math.radians(rng.uniform(-8.0, 8.0)) if tilted else 0.0
    cos, sin = math.cos(angle), math.sin(angle)
    ca, sa = abs(cos), abs(sin)
    # k: source pixels per output pixel (at the original scale), as large as fits the rotated window.
    k_max = min(src.width / (out_w * ca + out_h * sa), src.height / (out_w * sa + out_h * ca))
    k = k_max * rng.uniform(0.45, 1.0)
    half_x = (out_w * ca + out_h * sa) * k / 2
    half_y = (out_w * sa + out_h * ca) * k / 2
    cx = rng.uniform(half_x, max(half_x, src.width - half_x))
    cy = rng.uniform(half_y, max(half_y, src.height - half_y))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    factor, img = min(src.levels, key=lambda lv: abs(math.log2(k * lv[0])))
    kf = k * factor
    if tilted:
        a = np.array([[cos * kf * flip, -sin * kf], [sin * kf * flip, cos * kf]])
        t = np.array([cx * factor, cy * factor]) - a @ np.array([out_w / 2, out_h / 2])
        warp = np.hstack([a, t[:, None]])
        pic = cv2.warpAffine(img, warp, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT_101)
    else:
        lh, lw = img.shape[:2]
        cw, ch = min(lw, max(1, round(out_w * kf))), min(lh, max(1, round(out_h * kf)))
        x0 = min(max(0, round(cx * factor - cw / 2)), lw - cw)
        y0 = min(max(0, round(cy * factor - ch / 2)), lh - ch)
        pic = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        if flip < 0:
            pic = cv2.flip(pic, 1)

    gains = rng.uniform(0.9, 1.1, 3)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-20.0, 20.0)
    saturation = rng.uniform(0.7, 1.3)
    sat = saturation * np.eye(3) + (1 - saturation) * _LUMA_BGR[None, :]
    colour = contrast * (np.diag(gains) @ sat)
    offset = (1 - contrast) * 118.0 + brightness
    pic = cv2.transform(pic, np.hstack([colour, np.full((3, 1), offset)]).astype(np.float32))

    alpha = rng.uniform(*_NOISE_SIGMA) / _BANK_SIGMA
    oy = int(rng.integers(0, _BANK_SIDE - out_h + 1))
    ox = int(rng.integers(0, _BANK_SIDE - out_w + 1))
    pic = cv2.addWeighted(pic, 1.0, st.bank[oy:oy + out_h, ox:ox + out_w], alpha, -128.0 * alpha)
    quality = int(rng.choice(_QUALITIES, p=_QUALITY_P))
    return pic, quality


def encode(index: int, seed: int = 0) -> bytes:
    """The JPEG file of image ``index``."""
    pic, quality = render(index, seed)
    ok, buf = cv2.imencode(".jpg", pic, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
        raise DatasetError(f"OpenCV could not encode synthetic image {index} as JPEG")
    return buf.tobytes()


def _work(task: tuple[str, int, int, int]) -> tuple[int, int, int]:
    """Write images start..stop-1 that are not there yet; (written, skipped, bytes written)."""
    out, seed, start, stop = task
    written = skipped = size = 0
    made_dir = ""
    for i in range(start, stop):
        final = image_path(Path(out), i)
        if final.exists():
            skipped += 1
            continue
        data = encode(i, seed)
        d = str(final.parent)
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        try:
            if d != made_dir:
                os.makedirs(d, exist_ok=True)
                made_dir = d
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as e:
            raise DatasetError(f"cannot write {final}: {e.strerror or e}; check the directory and free space") from None
        written += 1
        size += len(data)
    return written, skipped, size


def _remove_stale_temps(out: Path) -> None:
    """Temporary files an interrupted run left behind (whole files were renamed, these never were)."""
    for sub in out.iterdir():
        if sub.is_dir() and sub.name.isdigit():
            for tmp in sub.glob(".img_*.tmp"):
                tmp.unlink(missing_ok=True)


def synthesize(out: Path, count: int, *, seed: int = 0, workers: int | None = None, progress: bool = True,
               label: str = "synth") -> SynthSummary:
    """Make images 0..count-1 of the synthetic set in ``out`` (those already there are kept)."""
    if count < 1:
        raise UsageError(f"--count must be 1 or more, not {count}")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, not {seed}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {workers}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create the image directory {out}: {e.strerror or e}") from None
    _remove_stale_temps(out)
    sources = tuple(s.name for s in _state().sources)
    tasks = [(str(out), seed, a, min(a + CHUNK, count)) for a in range(0, count, CHUNK)]
    n_workers = min(workers or os.cpu_count() or 1, len(tasks))
    written = skipped = size = 0
    t0 = time.perf_counter()
    with Progress(label, total=count, unit="img", enabled=progress) as bar:
        if n_workers <= 1:
            results = map(_work, tasks)
            for w, s, b in results:
                written, skipped, size = written + w, skipped + s, size + b
                bar.advance(w + s, note=f"{skipped} already there" if skipped else None)
        else:
            # spawn: safe from processes with threads (Ray workers, the stream driver)
            pool = multiprocessing.get_context("spawn").Pool(n_workers, initializer=_init_worker)
            try:
                for w, s, b in pool.imap_unordered(_work, tasks):
                    written, skipped, size = written + w, skipped + s, size + b
                    bar.advance(w + s, note=f"{skipped} already there" if skipped else None)
            except BaseException:
                pool.terminate()
                raise
            else:
                pool.close()
            finally:
                pool.join()
    return SynthSummary(out, count, written, skipped, size, time.perf_counter() - t0, sources)
