"""Dataset loading, batching and augmentation (SPEC §5)."""
import pickle

import numpy as np
import pytest
import torch

from engine.config import ConfigError, RunConfig
from engine.trainer import BatchStream
from engine.data import CIFAR_MEAN, CIFAR_STD, DataError, Dataset, load_dataset

CPU = torch.device("cpu")


# ---- digits ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset(RunConfig(dataset="digits"), CPU)


def test_digits_split_sizes_and_types(digits):
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (64,) and digits.name == "digits"


def test_digits_split_is_stratified(digits):
    train = torch.bincount(digits.y_train, minlength=10).double() / len(digits.y_train)
    test = torch.bincount(digits.y_test, minlength=10).double() / len(digits.y_test)
    # each class has ~180 images; stratification keeps the proportions within one image of 20%
    assert (train - test).abs().max() < 0.01


def test_digits_split_is_fixed_across_loads_and_run_seeds(digits):
    again = load_dataset(RunConfig(dataset="digits", seed=7), CPU)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)


def test_digits_are_standardised_with_train_statistics(digits):
    mean, std = digits.x_train.mean(0), digits.x_train.std(0, unbiased=False)
    varying = std > 0
    assert varying.sum() >= 60          # a few corner pixels are blank in every image
    assert mean.abs().max() < 1e-5
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert digits.x_train[:, ~varying].abs().max() == 0
    # the test split uses the train statistics, so it is only roughly standardised
    assert digits.x_test.mean(0).abs().max() < 0.5


def test_batch_size_larger_than_train_set_is_a_config_error():
    with pytest.raises(ConfigError, match="--batch-size 5000 is larger than the 1437 training samples "
                                          "of digits: use at most 1437"):
        load_dataset(RunConfig(dataset="digits", batch_size=5000), CPU)


def test_augment_on_flat_data_is_a_config_error():
    with pytest.raises(ConfigError, match="--augment needs image data"):
        load_dataset(RunConfig(dataset="digits", augment=True), CPU)


# ---- synthetic -------------------------------------------------------------------------------

def test_synthetic_data_shapes_and_shared_across_run_seeds():
    cfg = RunConfig(dataset="synthetic", synthetic_samples=200, synthetic_shape=(3, 8, 8),
                    synthetic_classes=4, batch_size=16)
    data = load_dataset(cfg, CPU)
    assert data.x_train.shape == (200, 3, 8, 8) and data.x_test.shape == (50, 3, 8, 8)
    assert data.input_shape == (3, 8, 8) and data.num_classes == 4
    assert torch.bincount(data.y_train).tolist() == [50] * 4
    assert torch.equal(load_dataset(cfg.replace(seed=5), CPU).x_train, data.x_train)


def test_synthetic_data_is_learnable():
    cfg = RunConfig(dataset="synthetic", synthetic_samples=2000, synthetic_classes=10)
    data = load_dataset(cfg, CPU)
    # a nearest-class-mean classifier fit on train beats chance (10%) by far on test
    means = torch.stack([data.x_train[data.y_train == k].mean(0) for k in range(10)])
    predicted = torch.cdist(data.x_test, means).argmin(1)
    assert (predicted == data.y_test).float().mean() > 0.6


# ---- CIFAR in the python-pickle layout -------------------------------------------------------

def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_images(n: int, offset: int) -> np.ndarray:
    """n distinct uint8 images as CIFAR rows: 1024 red, 1024 green, 1024 blue values."""
    return ((np.arange(n * 3072).reshape(n, 3072) * 7 + offset) % 256).astype(np.uint8)


def write_cifar10(parent, per_file=3):
    folder = parent / "cifar-10-batches-py"
    folder.mkdir()
    rows, labels = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = fake_images(per_file, offset=i)
        batch_labels = [(i + j) % 2 for j in range(per_file)]          # two classes
        write_pickle(folder / name, {b"batch_label": b"x", b"data": data, b"labels": batch_labels})
        rows.append(data)
        labels.append(batch_labels)
    return folder, rows, labels


def expected_images(rows: np.ndarray) -> torch.Tensor:
    raw = torch.from_numpy(rows).float().view(-1, 3, 32, 32) / 255.0
    return (raw - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def test_cifar10_values_and_labels(tmp_path):
    folder, rows, labels = write_cifar10(tmp_path)
    data = load_dataset(RunConfig(dataset="cifar10", data_dir=str(tmp_path), batch_size=4), CPU)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32) and data.name == "cifar10"
    torch.testing.assert_close(data.x_train, expected_images(np.concatenate(rows[:5])))
    torch.testing.assert_close(data.x_test, expected_images(rows[5]))
    assert data.y_train.tolist() == sum(labels[:5], []) and data.y_test.tolist() == labels[5]
    assert data.y_train.dtype == torch.int64
    # spot check the channel layout: pixel (row 1, col 2) of the green channel of the first image
    green = (int(rows[0][0, 1024 + 32 + 2]) / 255.0 - CIFAR_MEAN[1]) / CIFAR_STD[1]
    assert data.x_train[0, 1, 1, 2].item() == pytest.approx(green, abs=1e-5)


def test_cifar10_data_dir_may_be_the_layout_folder(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    via_parent = load_dataset(RunConfig(dataset="cifar10", data_dir=str(tmp_path), batch_size=4), CPU)
    via_folder = load_dataset(RunConfig(dataset="cifar10", data_dir=str(folder), batch_size=4), CPU)
    assert torch.equal(via_parent.x_train, via_folder.x_train)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = fake_images(4, 0), fake_images(2, 9)
    write_pickle(folder / "train", {b"data": train, b"fine_labels": [99, 0, 99, 0], b"coarse_labels": [1] * 4})
    write_pickle(folder / "test", {b"data": test, b"fine_labels": [0, 99], b"coarse_labels": [1] * 2})
    for data_dir in (tmp_path, folder):
        data = load_dataset(RunConfig(dataset="cifar100", data_dir=str(data_dir), batch_size=2), CPU)
        assert data.num_classes == 100
        assert data.y_train.tolist() == [99, 0, 99, 0] and data.y_test.tolist() == [0, 99]
        torch.testing.assert_close(data.x_test, expected_images(test))


def test_missing_cifar_folder_is_one_line_naming_path_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(RunConfig(dataset="cifar10", data_dir=str(tmp_path)), CPU)
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message
    assert str(tmp_path) in message
    assert f"{tmp_path}/cifar-10-batches-py/{{data_batch_1..5,test_batch}}" in message
    assert "nothing is downloaded" in message

    with pytest.raises(DataError, match=r"cifar-100-python/\{train,test\}"):
        load_dataset(RunConfig(dataset="cifar100", data_dir=str(tmp_path)), CPU)


def test_missing_cifar_file_is_named(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset(RunConfig(dataset="cifar10", data_dir=str(tmp_path)), CPU)


@pytest.mark.parametrize("content", [
    b"this is not a pickle",
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2),                  # no labels
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2),  # wrong width
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2),  # label range
    pickle.dumps([1, 2, 3], protocol=2),
    pickle.dumps(ConfigError("a class outside numpy"), protocol=2),  # could run code: refused
])
def test_malformed_cifar_file_is_a_data_error(tmp_path, content):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError) as err:
        load_dataset(RunConfig(dataset="cifar10", data_dir=str(tmp_path)), CPU)
    assert "\n" not in str(err.value) and str(folder / "test_batch") in str(err.value)


# ---- batches, probe, augmentation ------------------------------------------------------------

def tiny_dataset(n=50, shape=(3, 4, 5)) -> Dataset:
    x = torch.arange(n * int(np.prod(shape)), dtype=torch.float32).view(n, *shape)
    y = torch.arange(n) % 3
    return Dataset(x, y, x[:5], y[:5], num_classes=3, input_shape=shape, name="tiny")


def epoch_of(stream) -> list:
    return [stream.advance() for _ in range(stream.spe)]


def test_batches_are_full_disjoint_and_seeded():
    data = tiny_dataset(50)
    assert data.steps_per_epoch(16) == 3
    batches = epoch_of(BatchStream(data, 16, torch.Generator().manual_seed(3)))
    assert len(batches) == 3 and all(b.shape == (16,) and b.dtype == torch.int64 for b in batches)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 48 and seen.min() >= 0 and seen.max() < 50
    again = epoch_of(BatchStream(data, 16, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    stream = BatchStream(data, 16, torch.Generator().manual_seed(3))
    first_epoch, second_epoch = epoch_of(stream), epoch_of(stream)
    assert not torch.equal(first_epoch[0], second_epoch[0])        # reshuffled every epoch
    twin = stream.clone()
    assert all(torch.equal(twin.advance(), stream.advance()) for _ in range(5))   # a parked member's copy


def test_probe_indices_are_a_fixed_subset():
    data = tiny_dataset(50)
    probe = data.probe_indices(20, seed=1)
    assert probe.shape == (20,) and len(set(probe.tolist())) == 20 and probe.max() < 50
    assert torch.equal(probe, data.probe_indices(20, seed=1))
    assert not torch.equal(probe, data.probe_indices(20, seed=2))
    assert data.probe_indices(500, seed=1).tolist() == list(range(50))


def test_augment_without_padding_or_flip_is_identity():
    data = tiny_dataset()
    xb = data.x_train[:10]
    assert torch.equal(data.augment(xb, torch.Generator().manual_seed(0), padding=0, flip=False), xb)


def test_augment_matches_a_per_sample_crop_and_flip():
    data = tiny_dataset(64, shape=(3, 8, 8))
    xb = data.x_train
    out = data.augment(xb, torch.Generator().manual_seed(0))
    assert out.shape == xb.shape
    padded = torch.nn.functional.pad(xb, (4, 4, 4, 4))
    changed = 0
    for i in range(len(xb)):
        # the sample must be exactly one of the 9 x 9 crops of its padded image, possibly mirrored
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        candidates = crops + [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in candidates)
        changed += not torch.equal(out[i], xb[i])
    assert changed > 48                                  # only 1 in 162 draws is the identity
    flipped = data.augment(xb, torch.Generator().manual_seed(0), padding=0)
    mirrored = sum(torch.equal(flipped[i], xb[i].flip(-1)) for i in range(len(xb)))
    assert 16 < mirrored < 48                            # about half of the batch is flipped
