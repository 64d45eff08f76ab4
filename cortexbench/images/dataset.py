"""The image set on disk: find the files, read and decode one, turn it into a model's input.

This is the per-image hot path of the stream workers, so it stays lean: one read, one ``cv2.imdecode``,
one resize of the centre crop, and a per-channel scale-and-shift straight into the float32 output.

How an image becomes a model input depends on ``ModelSpec.input_kind``:

* ``rgb`` (3, S, S): the short side is resized to round(S / 0.875) (256 for 224), the centre S x S is
  cut out, BGR becomes RGB, values are scaled to [0, 1] and normalised with the ImageNet mean and std.
  The crop is taken in source pixels first and resized once, which is the same picture as resizing the
  whole image and then cropping, at a fraction of the cost.
* ``gray`` (1, H, W): grayscale, short side resized to H, centre crop, (x / 255 - 0.5) / 0.5.
* ``flat`` (N,): grayscale, the whole image resized to sqrt(N) x sqrt(N) (784 -> 28 x 28), flattened,
  normalised like ``gray``.
* ``features`` (k,): k summary features in [0, 1] (see ``FEATURE_NAMES``): the mean and standard
  deviation of the grayscale image first, then per-channel means and stds, edge strength, and after
  those the fractions of a k-9 bin grayscale histogram.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cortexbench.errors import DatasetError, ImageDecodeError

if TYPE_CHECKING:
    from cortexbench.models.registry import ModelSpec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # 224 of 256
FEATURE_NAMES = ("gray_mean", "gray_std", "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "edge_mean")

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _make_cmd(img_dir: Path) -> str:
    return f"python -m cortexbench.images synth --count 500 --out {img_dir}"


def _find_images(img_dir: Path) -> list[Path]:
    root = os.path.abspath(img_dir)
    found: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(dirpath, name))
    found.sort()
    return [Path(f) for f in found]


def list_images(img_dir: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png file under ``img_dir`` (recursively, any case), sorted, as absolute paths.
    Hidden files (names starting with '.', such as the temporary files of an interrupted write) are left out.

    Raises DatasetError naming the directory and the command that makes a set when there is none."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        what = "is not a directory" if img_dir.exists() else "does not exist"
        raise DatasetError(f"image directory {img_dir} {what}; make a set with '{_make_cmd(img_dir)}'")
    files = _find_images(img_dir)
    if not files:
        raise DatasetError(f"no images (.jpg, .jpeg, .png) in {img_dir}; make a set with '{_make_cmd(img_dir)}'")
    return files


def read_bytes(path: Path) -> bytes:
    """The file's bytes (a real read from disk); ImageDecodeError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageDecodeError(f"cannot read image {path}: {e.strerror or e}; check the file's permissions") from None


def _bad(path: Path | str, why: str) -> ImageDecodeError:
    return ImageDecodeError(f"image {path or '<bytes>'} does not decode: {why}; delete or replace the file")


def check_encoded(data: bytes, path: Path | str = "") -> bool:
    """Refuse (ImageDecodeError) empty files and a JPEG or PNG cut short, even where a decoder would fill
    in the missing rows with grey; True for a JPEG."""
    if not data:
        raise _bad(path, "the file is empty")
    if data.startswith(_JPEG_SOI):
        # Entropy-coded data cannot contain FF D9, so a whole JPEG has an end-of-image marker after its
        # last start-of-scan (one in an EXIF thumbnail comes before the first scan).
        eoi = data.rfind(_JPEG_EOI)
        if eoi < 0 or data.find(_JPEG_SOS, eoi) >= 0:
            raise _bad(path, "truncated JPEG (no end-of-image marker after the last scan)")
        return True
    if data.startswith(_PNG_SIG) and data.rfind(b"IEND") < 0:
        raise _bad(path, "truncated PNG (no IEND chunk)")
    return False


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, read without decoding anything (to refuse
    a decompression bomb before it is decoded); None when the header is not found."""
    if data.startswith(_PNG_SIG) and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(_JPEG_SOI):
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def decode(data: bytes, path: Path | str = "") -> np.ndarray:
    """Decode JPEG/PNG bytes to a BGR uint8 H x W x 3 array; ImageDecodeError naming ``path`` on failure
    (``check_encoded`` first)."""
    check_encoded(data, path)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise _bad(path, f"OpenCV: {str(e).strip().splitlines()[-1][:120]}") from None
    if img is None or img.size == 0:
        raise _bad(path, "not a JPEG or PNG image OpenCV can read")
    return img


# --- preprocessing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    kind: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]  # per output channel: out = x * scale + shift
    shift: tuple[float, ...]
    short: int = 0  # rgb: the short side the image is notionally resized to
    side: int = 0  # flat: the square side


@functools.lru_cache(maxsize=64)
def _plan(kind: str, shape: tuple[int, ...]) -> _Plan:
    if kind == "rgb":
        if len(shape) != 3 or shape[0] != 3:
            raise DatasetError(f"an 'rgb' input must have the shape (3, H, W), not {shape}")
        scale = tuple(1.0 / (255.0 * s) for s in IMAGENET_STD)
        shift = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
        return _Plan(kind, shape, scale, shift, short=round(max(shape[1:]) / CROP_FRACTION))
    if kind == "gray":
        return _Plan(kind, shape, (1.0 / 127.5,), (-1.0,))
    if kind == "flat":
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise DatasetError(f"a 'flat' input of {shape[0]} values is not a square image (like 784 = 28 x 28)")
        return _Plan(kind, shape, (1.0 / 127.5,), (-1.0,), side=side)
    if kind == "features":
        return _Plan(kind, shape, (), ())
    raise DatasetError(f"unknown input kind '{kind}' (rgb, gray, flat or features)")


def rgb_crop(h: int, w: int, spec: ModelSpec) -> tuple[int, int, int, int, tuple[float, ...], tuple[float, ...]]:
    """For an 'rgb' model and an h x w image: the centre crop (y0, x0, height, width) that preprocessing
    resizes to the input, and the per-channel (RGB) scale and shift after it (GPU decoders use this)."""
    plan = _plan(spec.input_kind, tuple(spec.input_shape))
    _, oh, ow = plan.shape
    y0, x0, ch, cw = _centre(h, w, oh, ow, plan.short / min(h, w))
    return y0, x0, ch, cw, plan.scale, plan.shift


def _centre(h: int, w: int, out_h: int, out_w: int, scale: float) -> tuple[int, int, int, int]:
    ch = min(h, max(1, round(out_h / scale)))
    cw = min(w, max(1, round(out_w / scale)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _crop_resize(img: np.ndarray, out_h: int, out_w: int, scale: float, gray: bool = False) -> np.ndarray:
    """The centre region of ``img`` that, scaled by ``scale``, is out_h x out_w; resized to that size (and
    made grayscale first when ``gray``: one channel is cheaper to resize)."""
    h, w = img.shape[:2]
    y0, x0, ch, cw = _centre(h, w, out_h, out_w, scale)
    crop = img[y0:y0 + ch, x0:x0 + cw]
    if gray:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    if ch == out_h and cw == out_w:
        return crop
    # INTER_LINEAR is alias-free enough below a factor of 2 and six times faster than INTER_AREA.
    interp = cv2.INTER_AREA if ch >= 2 * out_h or cw >= 2 * out_w else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_w, out_h), interpolation=interp)


def _scale_into(src: np.ndarray, scale: float, shift: float, out: np.ndarray) -> None:
    np.multiply(src, np.float32(scale), out=out, casting="unsafe")
    out += np.float32(shift)


def _fill(img: np.ndarray, plan: _Plan, out: np.ndarray) -> None:
    """Write the model input made from the BGR image ``img`` into ``out`` (float32, plan.shape)."""
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    if plan.kind == "rgb":
        _, oh, ow = plan.shape
        small = _crop_resize(img, oh, ow, plan.short / min(h, w))
        for c in range(3):  # output channel c is RGB, input channel 2 - c is BGR
            _scale_into(small[:, :, 2 - c], plan.scale[c], plan.shift[c], out[c])
    elif plan.kind == "gray":
        _, oh, ow = plan.shape
        small = _crop_resize(img, oh, ow, max(oh / h, ow / w), gray=True)
        _scale_into(small, plan.scale[0], plan.shift[0], out[0])
    elif plan.kind == "flat":
        s = plan.side
        interp = cv2.INTER_AREA if min(h, w) >= 2 * s else cv2.INTER_LINEAR
        small = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (s, s), interpolation=interp)
        _scale_into(small, plan.scale[0], plan.shift[0], out.reshape(s, s))
    else:
        out[:] = image_features(img, plan.shape[0])


def image_features(img: np.ndarray, k: int) -> np.ndarray:
    """``k`` summary features of a BGR image, each in [0, 1]: FEATURE_NAMES, then a (k-9)-bin gray histogram."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    g_mean, g_std = cv2.meanStdDev(gray)
    feats = [float(g_mean[0, 0]) / 255.0, float(g_std[0, 0]) / 255.0]
    if k > 2:
        c_mean, c_std = cv2.meanStdDev(img)
        m, s = c_mean[::-1, 0] / 255.0, c_std[::-1, 0] / 255.0  # RGB order
        grad = cv2.Laplacian(gray, cv2.CV_16S, ksize=1)
        edge = min(1.0, float(cv2.mean(cv2.convertScaleAbs(grad))[0]) / 255.0 * 4.0)
        feats += [*m.tolist(), *s.tolist(), edge]
    if k > len(FEATURE_NAMES):
        bins = k - len(FEATURE_NAMES)
        hist = cv2.calcHist([gray], [0], None, [bins], [0, 256]).ravel()
        feats += (hist / max(1.0, float(hist.sum()))).tolist()
    return np.asarray(feats[:k], dtype=np.float32)


def preprocess(img: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The model input made from a decoded BGR image: float32, C-contiguous, exactly ``spec.input_shape``."""
    plan = _plan(spec.input_kind, tuple(spec.input_shape))
    out = np.empty(plan.shape, dtype=np.float32)
    _fill(img, plan, out)
    return out


def load_input(path: Path, spec: ModelSpec) -> np.ndarray:
    """Read, decode and preprocess one file; ImageDecodeError naming it when it does not decode."""
    return preprocess(decode(read_bytes(path), path), spec)


def load_batch(paths: Sequence[Path], spec: ModelSpec) -> tuple[np.ndarray, list[Path]]:
    """(N, *input_shape) float32 of the files that decode, and the list of those that do not (never raises
    for a bad file)."""
    plan = _plan(spec.input_kind, tuple(spec.input_shape))
    out = np.empty((len(paths), *plan.shape), dtype=np.float32)
    bad: list[Path] = []
    n = 0
    for p in paths:
        try:
            _fill(decode(read_bytes(p), p), plan, out[n])
        except ImageDecodeError:
            bad.append(p)
            continue
        n += 1
    return out[:n], bad


def ensure_images(img_dir: Path, count: int, *, seed: int = 0, create: bool, progress: bool = True) -> list[Path]:
    """The images of ``img_dir``; when there are none and ``create`` is True, synthesise ``count`` first."""
    img_dir = Path(img_dir)
    if img_dir.is_dir():
        files = _find_images(img_dir)
        if files:
            return files
    if not create or (img_dir.exists() and not img_dir.is_dir()):
        return list_images(img_dir)  # raises the DatasetError that says what to do
    from cortexbench.images.synth import synthesize

    synthesize(img_dir, count, seed=seed, progress=progress,
               label=f"no images in {img_dir}: synthesising an ImageNet-like set")
    return list_images(img_dir)


# --- summary for `python -m cortexbench.images info` ---------------------------------------------


@dataclass(frozen=True)
class DatasetSummary:
    """What ``scan`` found in an image directory."""

    img_dir: Path
    files: int
    size_bytes: int
    decoded_ok: int
    decode_bad: int
    mean_width: float
    mean_height: float
    bad_files: tuple[Path, ...] = ()  # the first few that did not decode

    @property
    def mean_size_bytes(self) -> float:
        return self.size_bytes / self.files if self.files else 0.0

    def lines(self) -> list[str]:
        out = [
            f"directory     {self.img_dir}",
            f"files         {self.files}",
            f"total size    {self.size_bytes / 1e6:,.1f} MB",
            f"mean size     {self.mean_size_bytes / 1e3:,.1f} KB",
            f"decode ok     {self.decoded_ok}",
            f"decode bad    {self.decode_bad}",
            f"mean size px  {self.mean_width:.0f} x {self.mean_height:.0f} (width x height)",
        ]
        out += [f"  bad: {p}" for p in self.bad_files]
        return out


def _probe(path: Path) -> tuple[int, int, int] | None:
    """(size_bytes, width, height), or (size_bytes, 0, 0) for a file that does not decode."""
    try:
        data = read_bytes(path)
    except ImageDecodeError:
        return None
    try:
        img = decode(data, path)
    except ImageDecodeError:
        return len(data), 0, 0
    return len(data), img.shape[1], img.shape[0]


def scan(img_dir: Path, *, workers: int | None = None) -> DatasetSummary:
    """Decode every image of ``img_dir`` (threads; OpenCV releases the GIL) and summarise the set."""
    files = list_images(img_dir)
    size = ok = 0
    widths = heights = 0
    bad: list[Path] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for path, res in zip(files, pool.map(_probe, files), strict=True):
            if res is None or res[1] == 0:
                bad.append(path)
                size += res[0] if res else 0
                continue
            size += res[0]
            ok += 1
            widths += res[1]
            heights += res[2]
    return DatasetSummary(Path(img_dir), len(files), size, ok, len(bad), widths / ok if ok else 0.0,
                          heights / ok if ok else 0.0, tuple(bad[:10]))
