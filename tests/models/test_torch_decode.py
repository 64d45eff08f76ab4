"""GPU JPEG decoding (``--inputs jpeg --decode gpu``): its preprocessing equals the CPU path's, and a torch
model takes the device tensor it makes.  The preprocessing math (crop, resize, scale) runs here on CPU
tensors from OpenCV's decode; nvJPEG itself needs a GPU: those tests are skipped without one and
``bench/gpu.py`` runs the path end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cortexbench.errors import ImageDecodeError  # noqa: E402
from cortexbench.images.dataset import IMAGENET_STD, decode, list_images, preprocess, read_bytes  # noqa: E402
from cortexbench.models.backends.base import LoadOptions  # noqa: E402
from cortexbench.models.backends.torch_decode import preprocess_tensor  # noqa: E402
from cortexbench.models.backends.torch_impl import BACKEND  # noqa: E402
from cortexbench.models.registry import REGISTRY, get_spec  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.py runs nvJPEG on one)")
ONE_LEVEL = 1 / (255 * min(IMAGENET_STD))  # one 8-bit pixel level after normalisation


@pytest.fixture
def images(image_dir: Path) -> list[Path]:
    return list_images(image_dir)[:6]


@pytest.mark.parametrize("model", ["squeezenet", "inception_v3", "caffenet"])
def test_tensor_preprocessing_equals_the_cpu_path_within_one_pixel_level(images, model):
    """Same crop and scale, bilinear resize with antialiasing where OpenCV uses INTER_AREA: the CPU path
    rounds its resize to 8 bits, so they differ by less than one level."""
    spec = get_spec(model)
    for path in images:
        bgr = decode(read_bytes(path), path)
        want = preprocess(bgr, spec)[None]
        rgb = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
        got = preprocess_tensor(rgb, spec).numpy()
        assert got.shape == want.shape == (1, *spec.input_shape) and got.dtype == np.float32
        assert np.abs(got - want).max() < ONE_LEVEL, path


def test_a_large_image_shrunk_2x_or_more_is_antialiased_as_the_cpu_path_area_averages(images):
    import cv2

    spec = get_spec("squeezenet")
    for path in images[:3]:
        bgr = decode(read_bytes(path), path)
        big = cv2.resize(bgr, (bgr.shape[1] * 3, bgr.shape[0] * 3), interpolation=cv2.INTER_CUBIC)
        want = preprocess(big, spec)[None]
        got = preprocess_tensor(torch.from_numpy(np.ascontiguousarray(big[:, :, ::-1].transpose(2, 0, 1))), spec)
        assert np.abs(got.numpy() - want).mean() < 1.25 * ONE_LEVEL, path  # without antialiasing: about 1.7 levels


def test_a_model_takes_a_tensor_input_as_it_takes_the_array(tmp_path):
    spec = REGISTRY["mnist_cnn"]
    BACKEND.export(spec, tmp_path, seed=1)
    model = BACKEND.load(spec, tmp_path, "cpu", LoadOptions())
    x = np.random.default_rng(0).standard_normal((1, *spec.input_shape)).astype(np.float32)
    assert np.array_equal(model.predict(torch.from_numpy(x)), model.predict(x))
    with pytest.raises(ValueError, match="takes"):
        model.predict(torch.zeros(1, 3, 4, 4))


@gpu
@pytest.mark.gpu
def test_nvjpeg_decoding_matches_the_cpu_path_and_refuses_a_truncated_file(images, tmp_path):
    dec = BACKEND.gpu_decoder("gpu:0")
    spec = get_spec("squeezenet")
    for path in images:
        data = read_bytes(path)
        got = dec(data, path, spec)
        assert got.is_cuda and tuple(got.shape) == (1, *spec.input_shape)
        want = preprocess(decode(data, path), spec)[None]
        assert np.abs(got.cpu().numpy() - want).mean() < 2 * ONE_LEVEL  # nvJPEG and libjpeg round differently
    with pytest.raises(ImageDecodeError, match="truncated"):
        dec(read_bytes(images[0])[:300], images[0], spec)
    with pytest.raises(ImageDecodeError):
        dec(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9", "fake.jpg", spec)


@gpu
@pytest.mark.gpu
def test_a_batched_nvjpeg_decode_equals_one_by_one_and_fails_only_the_bad_file(images):
    dec = BACKEND.gpu_decoder("gpu:0")
    specs = [get_spec(m) for m in ("squeezenet", "inception_v3", "caffenet", "mnist_cnn")]
    items = [(read_bytes(p), p, specs[k % len(specs)]) for k, p in enumerate(images)]
    want = [dec(*item).cpu().numpy() for item in items]
    got = dec.many(items)
    for g, w in zip(got, want, strict=True):  # the batched decoder may round as another nvJPEG backend does
        assert g.is_cuda and np.abs(g.cpu().numpy() - w).mean() < ONE_LEVEL
    spoilt = [*items[:2], (b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9", "fake.jpg", specs[0]),
              (items[0][0][:300], items[0][1], specs[0]), *items[2:4]]
    got = dec.many(spoilt)
    assert [type(g).__name__ for g in got] == ["Tensor", "Tensor", "ImageDecodeError", "ImageDecodeError",
                                              "Tensor", "Tensor"]
    for g, w in zip([got[0], got[1], got[4], got[5]], want[:4], strict=True):
        assert np.abs(g.cpu().numpy() - w).mean() < ONE_LEVEL
