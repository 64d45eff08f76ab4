"""JPEG decoding and preprocessing on the GPU, for ``--inputs jpeg --decode gpu`` (torch workers).

Per image: the same structural checks as the CPU path (an empty or truncated file is an
``ImageDecodeError`` naming it), nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``, then the
CPU path's preprocessing on the device: the same centre crop (``images.dataset.rgb_crop``), a bilinear
resize (antialiased where the CPU path uses ``INTER_AREA``, a shrink of 2x or more) and the per-channel
scale and shift.  It runs on a CUDA stream of the calling thread and waits for it, so the time it returns
after is the decode's.  The result is a float32 device tensor of shape (1, *input_shape) that
``TorchModel.predict`` takes as it is (a device-to-device copy into its input).

``many`` decodes a group's JPEGs in one batched nvJPEG call (``decode_jpeg`` of a list) and waits once;
a file that nvJPEG refuses makes it decode that batch one by one, so only that image fails.

Not JPEG (a PNG), or a model whose input is not 'rgb': decoded on the CPU as ``--decode cpu`` would, then
copied to the device, so every file the CPU path takes is taken here too.  nvJPEG and libjpeg round
differently (a pixel may differ by one or two levels), so answers may differ from ``--decode cpu`` in
near-ties.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cortexbench.errors import ImageDecodeError
from cortexbench.images.dataset import check_encoded, decode, preprocess, rgb_crop
from cortexbench.models.backends.base import parse_device
from cortexbench.models.registry import ModelSpec


class GpuDecoder:
    """``decoder(data, path, spec) -> torch.Tensor`` on ``device`` (see the module docstring).  Thread-safe:
    each calling thread gets its own CUDA stream."""

    def __init__(self, device: str) -> None:
        kind, index = parse_device(device)
        if kind != "gpu" or not torch.cuda.is_available():
            raise ValueError(f"a GPU decoder needs a CUDA device, not {device}")
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self._cuda = torch.device("cuda", index)
        self._local = threading.local()
        self._consts: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(device=self._cuda)
        return s

    def __call__(self, data: bytes, path: Path | str, spec: ModelSpec) -> torch.Tensor:
        jpeg = check_encoded(data, path)
        if not jpeg or spec.input_kind != "rgb":
            return self._on_cpu(data, path, spec)
        stream = self._stream()
        with torch.cuda.device(self._cuda), torch.cuda.stream(stream):
            x = preprocess_tensor(self._one(data, path), spec, self._consts)
        stream.synchronize()
        return x

    def many(self, items: Sequence[tuple[bytes, Path | str, ModelSpec]]) -> list[torch.Tensor | ImageDecodeError]:
        """Each item's input as ``__call__`` makes it, or the ImageDecodeError of its file, in order."""
        out: list[Any] = [None] * len(items)
        jpegs: list[int] = []
        for i, (data, path, spec) in enumerate(items):
            try:
                if check_encoded(data, path) and spec.input_kind == "rgb":
                    jpegs.append(i)
                else:
                    out[i] = self._on_cpu(data, path, spec)
            except ImageDecodeError as e:
                out[i] = e
        if not jpegs:
            return out
        stream = self._stream()
        with torch.cuda.device(self._cuda), torch.cuda.stream(stream):
            bufs = [torch.frombuffer(bytearray(items[i][0]), dtype=torch.uint8) for i in jpegs]
            try:
                imgs: list[Any] = list(self._decode_jpeg(bufs, mode=self._rgb, device=self._cuda))
            except RuntimeError:  # one file spoils the batch: find it
                imgs = []
                for i in jpegs:
                    try:
                        imgs.append(self._one(items[i][0], items[i][1]))
                    except ImageDecodeError as e:
                        imgs.append(e)
            for i, img in zip(jpegs, imgs, strict=True):
                out[i] = img if isinstance(img, ImageDecodeError) else preprocess_tensor(img, items[i][2], self._consts)
        stream.synchronize()
        return out

    def _one(self, data: bytes, path: Path | str) -> torch.Tensor:
        try:
            return self._decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self._rgb,
                                     device=self._cuda)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise ImageDecodeError(f"{path}: nvJPEG cannot decode it ({msg})") from None

    def _on_cpu(self, data: bytes, path: Path | str, spec: ModelSpec) -> torch.Tensor:
        return torch.from_numpy(preprocess(decode(data, path), spec)[None]).to(self._cuda)


def preprocess_tensor(img: torch.Tensor, spec: ModelSpec,
                      cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """(3, H, W) uint8 RGB on any device -> (1, 3, h, w) float32 as ``images.dataset.preprocess`` makes it
    from the same pixels; ``cache`` keeps the scale and shift tensors on the device between calls."""
    _, h, w = img.shape
    y0, x0, ch, cw, scale, shift = rgb_crop(h, w, spec)
    _, oh, ow = spec.input_shape
    crop = img[:, y0:y0 + ch, x0:x0 + cw].unsqueeze(0).float()
    if (ch, cw) != (oh, ow):
        crop = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False,
                             antialias=ch >= 2 * oh or cw >= 2 * ow)
    key = (img.device, *scale, *shift)
    consts = cache.get(key) if cache is not None else None
    if consts is None:  # a dict write under the GIL: two threads may both make it, either is right
        consts = (torch.tensor(scale, dtype=torch.float32, device=img.device).view(1, 3, 1, 1),
                  torch.tensor(shift, dtype=torch.float32, device=img.device).view(1, 3, 1, 1))
        if cache is not None:
            cache[key] = consts
    return torch.addcmul(consts[1], crop, consts[0]).contiguous()
