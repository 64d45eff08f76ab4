"""cortexbench.images.dataset: listing, decoding (and refusing corrupt files), preprocessing per input kind."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from cortexbench.errors import DatasetError, ImageDecodeError
from cortexbench.images.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode,
    ensure_images,
    image_features,
    list_images,
    load_batch,
    load_input,
    preprocess,
    read_bytes,
    scan,
)
from cortexbench.images.synth import synthesize
from cortexbench.models.registry import ModelSpec, get_spec

SPECS = ["squeezenet", "inception_v3", "caffenet", "mnist_cnn", "digits_cnn", "mnist_mlp", "mlp2"]
LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("set")
    synthesize(d, 4, workers=1, progress=False)
    return d


@pytest.fixture
def corrupt(tmp_path, image_set) -> dict[str, Path]:
    good = list_images(image_set)[0].read_bytes()
    files = {
        "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "text.jpg",
        "empty": tmp_path / "empty.jpg",
        "png_cut": tmp_path / "cut.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["text"].write_text("this is not a picture\n")
    files["empty"].write_bytes(b"")
    _, png = cv2.imencode(".png", np.full((20, 30, 3), 90, np.uint8))
    files["png_cut"].write_bytes(png.tobytes()[:-20])
    return files


def test_list_images_recursive_sorted_absolute_any_case(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    names = ["a.JPG", "b/x.jpeg", "b/deep/y.Png", "c.png", "z.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "b" / ".img_1.jpg.123.tmp").write_bytes(b"x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    found = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == sorted(names)
    assert all(p.is_absolute() for p in found)


def test_list_images_relative_dir_gives_absolute(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert list_images(Path("imgs")) == [tmp_path / "imgs" / "a.jpg"]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_list_images_no_set_names_dir_and_command(tmp_path, make):
    d = tmp_path / "imgs"
    if make == "empty":
        d.mkdir()
        (d / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        list_images(d)
    msg = str(e.value)
    assert str(d) in msg and "python -m cortexbench.images synth --count 500 --out" in msg
    assert "\n" not in msg


def test_decode_good(image_set):
    path = list_images(image_set)[0]
    img = decode(read_bytes(path), path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 64 <= min(img.shape[:2]) and max(img.shape[:2]) <= 500


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "png_cut"])
def test_decode_corrupt_raises_naming_file(corrupt, kind):
    path = corrupt[kind]
    with pytest.raises(ImageDecodeError) as e:
        decode(read_bytes(path), path)
    assert str(path) in str(e.value)


def test_read_bytes_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"gone\.jpg"):
        read_bytes(tmp_path / "gone.jpg")


def test_load_batch_counts_bad_files_and_never_raises(image_set, corrupt):
    good = list_images(image_set)
    paths = [good[0], corrupt["truncated"], good[1], corrupt["text"], corrupt["empty"], good[2],
             corrupt["png_cut"], image_set / "missing.jpg"]
    spec = get_spec("squeezenet")
    batch, bad = load_batch(paths, spec)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32 and batch.flags.c_contiguous
    assert bad == [corrupt["truncated"], corrupt["text"], corrupt["empty"], corrupt["png_cut"],
                   image_set / "missing.jpg"]
    np.testing.assert_array_equal(batch[1], load_input(good[1], spec))


def test_load_batch_all_bad_is_empty(corrupt):
    batch, bad = load_batch([corrupt["text"]], get_spec("mnist_cnn"))
    assert batch.shape == (0, 1, 28, 28) and bad == [corrupt["text"]]


@pytest.mark.parametrize("name", SPECS)
def test_preprocess_shape_dtype_range(image_set, name):
    spec = get_spec(name)
    for path in list_images(image_set):
        x = load_input(path, spec)
        assert x.shape == spec.input_shape and x.dtype == np.float32 and x.flags.c_contiguous
        assert np.isfinite(x).all()
        if spec.input_kind == "rgb":
            assert LOW - 1e-5 <= x.min() and x.max() <= HIGH + 1e-5
            assert x.std() > 0.1  # a picture, not a constant
        elif spec.input_kind in ("gray", "flat"):
            assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6 and x.std() > 0.05
        else:
            assert 0.0 <= x.min() and x.max() <= 1.0


def test_rgb_is_rgb_order_and_imagenet_normalised():
    blue_bgr = np.zeros((375, 500, 3), np.uint8)
    blue_bgr[:, :, 0] = 255
    x = preprocess(blue_bgr, get_spec("vgg16"))
    expect = [(0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
              (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    for c in range(3):
        np.testing.assert_allclose(x[c], expect[c], atol=1e-5)


def test_rgb_matches_resize_256_then_centre_crop_224(image_set):
    img = decode(read_bytes(list_images(image_set)[0]))
    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    big = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    y0, x0 = (big.shape[0] - 224) // 2, (big.shape[1] - 224) // 2
    ref = big[y0:y0 + 224, x0:x0 + 224, ::-1].astype(np.float32) / 255.0
    ref = ((ref - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)
    x = preprocess(img, get_spec("resnet152"))
    assert np.abs(x - ref).mean() < 0.1  # same picture; sub-pixel alignment differs


def test_gray_centre_crop_and_normalisation():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the centre square is white, the sides black
    x = preprocess(img, get_spec("mnist_cnn"))
    np.testing.assert_allclose(x, 1.0, atol=1e-6)
    x = preprocess(np.zeros((40, 40, 3), np.uint8), get_spec("digits_cnn"))
    assert x.shape == (1, 8, 8)
    np.testing.assert_allclose(x, -1.0)


def test_flat_is_whole_image_resized_and_flattened():
    img = np.zeros((280, 560, 3), np.uint8)
    img[:, :280] = 255  # left half white
    x = preprocess(img, get_spec("mnist_mlp")).reshape(28, 28)
    np.testing.assert_allclose(x[:, :13], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[:, 15:], -1.0, atol=1e-6)


def test_features_mean_and_std_of_gray():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :5] = 200
    x = preprocess(img, get_spec("mlp2"))
    np.testing.assert_allclose(x, [100 / 255, 100 / 255], atol=1e-6)


def test_features_generalise_to_more_values(image_set):
    img = decode(read_bytes(list_images(image_set)[0]))
    f = image_features(img, 14)
    assert f.shape == (14,) and 0 <= f.min() and f.max() <= 1
    np.testing.assert_allclose(f[:2], image_features(img, 2))
    np.testing.assert_allclose(f[9:].sum(), 1.0, atol=1e-5)  # the 5-bin histogram
    spec = ModelSpec("f5", "small", (5,), 2, "test")
    np.testing.assert_allclose(preprocess(img, spec), f[:5])


def test_ensure_images_creates_when_empty(tmp_path, capsys):
    d = tmp_path / "new"
    files = ensure_images(d, 3, seed=1, create=True)
    assert len(files) == 3 and all(f.stat().st_size > 1000 for f in files)
    assert "synthesising" in capsys.readouterr().err
    again = ensure_images(d, 10, create=True)  # not empty: left alone
    assert again == files


def test_ensure_images_no_create_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="synth --count 500"):
        ensure_images(tmp_path / "empty", 3, create=False)
    assert not any(os.scandir(tmp_path / "empty"))


def test_scan_counts_good_and_bad(image_set, corrupt, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    good = list_images(image_set)[:3]
    for p in good:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "bad.jpg").write_bytes(corrupt["truncated"].read_bytes())
    s = scan(d)
    assert (s.files, s.decoded_ok, s.decode_bad) == (4, 3, 1)
    assert s.bad_files == (d.absolute() / "bad.jpg",)
    widths = [decode(read_bytes(p)).shape[1] for p in good]
    assert s.mean_width == pytest.approx(sum(widths) / 3)
    assert s.size_bytes == sum(p.stat().st_size for p in d.iterdir())
    assert any(line.startswith("decode bad") and line.endswith("1") for line in s.lines())


def test_image_size_reads_the_header_as_the_decoder_sees_the_picture(tmp_path):
    from cortexbench.images.dataset import image_size

    synthesize(tmp_path / "s", 6, seed=1, progress=False)
    for path in sorted((tmp_path / "s").rglob("*.jpg")):
        data = path.read_bytes()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image_size(data) == (img.shape[1], img.shape[0])
        png = cv2.imencode(".png", img)[1].tobytes()
        assert image_size(png) == (img.shape[1], img.shape[0])
    assert image_size(b"not an image") is None and image_size(b"\xff\xd8\xff") is None
