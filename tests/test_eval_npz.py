"""The ADM sample and reference formats (eval/npz.py): streaming reads, statistics, and the bad files a user
hands over, each refused with one line naming the file and the expected layout."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from eval.npz import check_images, iter_images, npz_keys, read_stats, write_samples
from uniflow.errors import ConfigError, ImageInputError


def _images(n: int, h: int = 8, w: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True], ids=["npz", "compressed"])
def test_streamed_batches_equal_the_array(tmp_path: Path, compressed: bool) -> None:
    images, labels = _images(11), np.arange(11) % 3
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=labels)
    info = check_images(path)
    assert (info.count, info.height, info.width, info.size) == (11, 8, 6, "6x8")
    batches = list(iter_images(path, 4))
    assert [b.shape[0] for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(np.concatenate(list(iter_images(path, 4, limit=5))), images[:5])
    assert npz_keys(path) == ["arr_0", "arr_1"]


def test_write_samples_writes_the_adm_format(tmp_path: Path) -> None:
    images = _images(5)
    path = write_samples(tmp_path / "out.npz", images, labels=np.array([0, 1, 2, 3, 4]))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no temporary left
    with pytest.raises(ImageInputError, match="uint8"):
        write_samples(tmp_path / "bad.npz", images.astype(np.float32))


def test_reference_statistics_are_read_when_present(tmp_path: Path) -> None:
    mu, sigma = np.arange(4.0), np.eye(4)
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_images(4), mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    stats = read_stats(path)
    assert sorted(stats) == ["pool", "spatial"]
    np.testing.assert_array_equal(stats["pool"][0], mu)
    np.savez(path, arr_0=_images(4))
    assert read_stats(path) == {}
    np.savez(path, mu=mu, sigma=np.eye(3))
    with pytest.raises(ImageInputError, match=r"do not fit"):
        read_stats(path)


def test_npz_without_arr_0_names_the_file_the_keys_and_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "samples.npz"
    np.savez(path, images=_images(3), labels=np.arange(3))
    with pytest.raises(ImageInputError) as err:
        check_images(path, "--samples")
    message = str(err.value)
    assert str(path) in message and "'arr_0'" in message and "images, labels" in message
    assert "uint8 images (N, H, W, 3)" in message and "\n" not in message


@pytest.mark.parametrize("array,match", [
    (np.zeros((3, 8, 8, 3), np.float32), "expected uint8"),
    (np.zeros((3, 8, 8), np.uint8), r"expected shape \(N, H, W, 3\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no usable images"),
], ids=["float", "grey", "empty"])
def test_wrong_arrays_are_refused(tmp_path: Path, array: np.ndarray, match: str) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=array)
    with pytest.raises(ImageInputError, match=match):
        check_images(path)


def test_object_arrays_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ImageInputError, match="refusing to unpickle"):
        check_images(path)


def test_missing_folder_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        check_images(tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match="is a folder"):
        check_images(tmp_path)
    text = tmp_path / "t.npz"
    text.write_text("not a zip")
    with pytest.raises(ImageInputError, match="not an .npz file"):
        check_images(text)


def test_truncated_array_data_is_reported(tmp_path: Path) -> None:
    """A member whose header promises more images than its data holds (a broken writer)."""
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=_images(6))
    with zipfile.ZipFile(good) as zf:
        raw = zf.read("arr_0.npy")
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("arr_0.npy", raw[: len(raw) - 8 * 6 * 3 * 2])  # two images short
    with pytest.raises(ImageInputError, match="truncated"):
        list(iter_images(bad, 4))
