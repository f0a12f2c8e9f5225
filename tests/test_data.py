"""Datasets: digits split, CIFAR-10 archives written in the official layout, the tensor loader."""

import pickle

import numpy as np
import pytest
import torch

from dynamics.data import DatasetError, TensorLoader, load_cifar10_dataset, load_dataset, load_digits_dataset


def _write_batch(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": images, b"labels": list(labels), b"batch_label": b"test"}, f, protocol=2)


@pytest.fixture
def tiny_cifar(tmp_path):
    """A CIFAR-10 archive in the official layout with 20 training and 10 test images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_batch(folder / "data_batch_1", rng.integers(0, 256, (20, 3072), dtype=np.uint8), np.arange(20) % 10)
    _write_batch(folder / "test_batch", rng.integers(0, 256, (10, 3072), dtype=np.uint8), np.arange(10))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)
    return tmp_path


def test_tiny_cifar_archive_loads(tiny_cifar):
    dataset = load_cifar10_dataset(tiny_cifar)
    assert dataset.train_x.shape == (20, 3, 32, 32)
    assert dataset.train_x.dtype == torch.uint8
    assert dataset.test_x.shape == (10, 3, 32, 32)
    assert dataset.train_y.tolist() == [i % 10 for i in range(20)]
    assert dataset.augment and dataset.num_classes == 10
    assert "subset" in dataset.source
    # The folder itself works as a root too.
    assert len(load_cifar10_dataset(tiny_cifar / "cifar-10-batches-py").test_y) == 10


def test_truncated_cifar_batch_rejected(tiny_cifar):
    path = tiny_cifar / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="corrupt CIFAR-10 batch .*data_batch_1"):
        load_cifar10_dataset(tiny_cifar)


def test_cifar_batch_with_wrong_shape_rejected(tiny_cifar):
    _write_batch(tiny_cifar / "cifar-10-batches-py" / "test_batch", np.zeros((4, 100), dtype=np.uint8), range(4))
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar10_dataset(tiny_cifar)


def test_cifar_batch_with_code_rejected_before_running_it(tiny_cifar, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="unexpected object"):
        load_cifar10_dataset(tiny_cifar)
    assert not marker.exists()


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}.*--data-root"):
        load_cifar10_dataset(tmp_path)


def test_digits_split_is_fixed_and_stratified():
    first, second = load_digits_dataset(), load_digits_dataset()
    assert torch.equal(first.train_x, second.train_x)
    assert len(first.train_y) + len(first.test_y) == 1797
    counts = torch.bincount(first.test_y, minlength=10)
    assert counts.min() >= 35
    assert counts.max() <= 37
    assert abs(first.train_x.mean().item()) < 1e-5
    assert first.train_x.std().item() == pytest.approx(1.0, rel=1e-3)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="known datasets"):
        load_dataset("mnist")


def test_loader_augmentation_is_crop_and_flip():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    loader = TensorLoader(images, torch.zeros(2, dtype=torch.long), 2, augment=True, seed=0)
    out = loader._random_crop_flip(images)
    assert out.shape == images.shape
    for i in range(2):
        # Every output row is a contiguous window of an input row (or its mirror), or zero padding.
        row = out[i, 0, 16]
        nonzero = row[row != 0]
        diffs = nonzero[1:] - nonzero[:-1]
        assert torch.all(diffs == 1) or torch.all(diffs == -1)


def test_loader_order_depends_only_on_seed():
    x, y = torch.randn(50, 1, 8, 8), torch.arange(50)
    first = [t for _, t in TensorLoader(x, y, 16, shuffle=True, seed=3)]
    torch.manual_seed(123)  # the global RNG must not matter
    second = [t for _, t in TensorLoader(x, y, 16, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sorted(torch.cat(first).tolist()) == list(range(50))


def test_manifest_mismatch_rejected_before_unpickling(tiny_cifar, tmp_path):
    import hashlib

    folder = tiny_cifar / "cifar-10-batches-py"
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    train_md5 = hashlib.md5((folder / "data_batch_1").read_bytes()).hexdigest()
    (folder / "checksums.md5").write_text(f"{train_md5}  data_batch_1\n{'0' * 32}  test_batch\n")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="MD5 .* lists 0+"):
        load_cifar10_dataset(tiny_cifar)
    assert not marker.exists()


def test_manifest_match_loads(tiny_cifar):
    import hashlib

    folder = tiny_cifar / "cifar-10-batches-py"
    lines = [f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}" for n in ("data_batch_1", "test_batch")]
    (folder / "checksums.md5").write_text("\n".join(lines) + "\n")
    assert len(load_cifar10_dataset(tiny_cifar).train_y) == 20
