"""Datasets as tensors on the training device; a mini-batch is an index slice (README, "Models and data").

Nothing is ever downloaded: digits ship with scikit-learn, synthetic data is generated, and CIFAR
is read from a local folder in the python-pickle layout.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from engine.cifar import CIFAR_LAYOUTS, DataError, cifar_root, read_cifar_file  # noqa: F401 (re-exported)
from engine.config import ConfigError, RunConfig, held_out

# Constant seeds: every run of a sweep (any --seed) sees the same split / the same synthetic data,
# so runs differ only in what the sweep varies.
DIGITS_SPLIT_SEED = 0
SYNTHETIC_DATA_SEED = 20240

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class Dataset:
    x_train: torch.Tensor      # float32, on the training device
    y_train: torch.Tensor      # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    name: str
    # ticks: per-feature probe sets, [F, N, ...] inputs and [F, N] labels (only feature k informative)
    feature_x: torch.Tensor | None = None
    feature_y: torch.Tensor | None = None
    # the validation split (RunConfig.validation): what a study selects on, never trained on
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def augment(self, xb: torch.Tensor, generator: torch.Generator, padding: int = 4,
                flip: bool = True) -> torch.Tensor:
        """Random crop (zero padding, i.e. the mean colour after normalisation) and horizontal flip.

        Whole-batch: one pad, then one gather with per-sample row/column indices; a flip is the
        column index read backwards.
        """
        if xb.dim() != 4:
            raise ValueError(f"augment needs a batch of images N x C x H x W, got shape {tuple(xb.shape)}")
        n, channels, height, width = xb.shape
        padded = torch.nn.functional.pad(xb, (padding,) * 4)

        def draw(high: int) -> torch.Tensor:
            return torch.randint(high, (n, 1), generator=generator, device=generator.device).to(xb.device)

        shift_y, shift_x = draw(2 * padding + 1), draw(2 * padding + 1)
        rows = shift_y + torch.arange(height, device=xb.device)                 # N x H
        cols = torch.arange(width, device=xb.device).expand(n, width)
        if flip:
            cols = torch.where(draw(2).bool(), width - 1 - cols, cols)
        cols = shift_x + cols                                                   # N x W
        batch_index = torch.arange(n, device=xb.device)[:, None, None, None]
        channel_index = torch.arange(channels, device=xb.device)[None, :, None, None]
        return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]

    def probe_indices(self, size: int, seed: int) -> torch.Tensor:
        """A fixed, sorted subset of min(size, train size) train indices, on the data's device."""
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(self.train_size, generator=generator)[:size]
        return chosen.sort().values.to(self.x_train.device)


# ---- loaders ---------------------------------------------------------------------------------

def load_dataset(cfg: RunConfig, device: torch.device | str) -> Dataset:
    loaders = {"digits": _load_digits, "synthetic": _load_synthetic, "ticks": _load_ticks,
               "cifar10": _load_cifar, "cifar100": _load_cifar}
    if cfg.dataset not in loaders:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(loaders)}")
    data = loaders[cfg.dataset](cfg, torch.device(device))
    if cfg.validation and cfg.dataset != "ticks":      # ticks draws its own (_load_ticks)
        data = _hold_out(data, cfg.data_seed)
    cfg.check_against_data(data.train_size)   # a CIFAR folder's size is known only now
    if cfg.augment and len(data.input_shape) != 3:
        raise ConfigError(f"--augment needs image data (C x H x W) but {cfg.dataset} has shape "
                          f"{'x'.join(map(str, data.input_shape))}: drop --augment")
    return data


def _load_digits(cfg: RunConfig, device: torch.device) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0          # pixels that are blank in every training image stay 0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype).to(device)

    return Dataset(tensor(x_train, torch.float32), tensor(y_train, torch.int64),
                   tensor(x_test, torch.float32), tensor(y_test, torch.int64),
                   num_classes=10, input_shape=(64,), name="digits")


def _load_ticks(cfg: RunConfig, device: torch.device) -> Dataset:
    """The large-LR paper's toy (engine/ticks.py): 16 two-dimensional features, binary labels, and a
    probe set per feature; the data seed fixes it all."""
    from .ticks import make, make_validation
    x_train, y_train, x_test, y_test, x_probe, y_probe = (torch.from_numpy(a).to(device) for a in make(cfg.data_seed))
    x_val, y_val = ((torch.from_numpy(a).to(device) for a in make_validation(cfg.data_seed)) if cfg.validation
                    else (None, None))
    return Dataset(x_train, y_train, x_test, y_test, num_classes=2, input_shape=(32,), name="ticks",
                   feature_x=x_probe, feature_y=y_probe, x_val=x_val, y_val=y_val)


def _hold_out(data: Dataset, seed: int) -> Dataset:
    """The validation split of data other than ticks: a seeded random held_out(n) of the n training
    samples (the data seed picks them), taken out of the training set; the rest keep their order."""
    n = data.train_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(data.x_train.device)
    val, train = order[:held_out(n)], order[held_out(n):].sort().values
    return dataclasses.replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                               x_val=data.x_train[val], y_val=data.y_train[val])


def _load_synthetic(cfg: RunConfig, device: torch.device) -> Dataset:
    """Gaussian classes: a random mean per class (norm about 3) plus unit noise.

    Learnable but not trivial: class means sit about 4 noise standard deviations apart, so a good
    classifier gets most but not all samples right. Drawn on the CPU from SYNTHETIC_DATA_SEED, so
    the data are identical on every device and for every run seed.
    """
    generator = torch.Generator().manual_seed(SYNTHETIC_DATA_SEED)
    shape, classes = tuple(cfg.synthetic_shape), cfg.synthetic_classes
    features = int(np.prod(shape))
    means = torch.randn(classes, features, generator=generator) * (3.0 / features ** 0.5)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randperm(n, generator=generator) % classes        # balanced classes
        x = means[labels] + torch.randn(n, features, generator=generator)
        return x.reshape(n, *shape).to(device), labels.to(device)

    x_train, y_train = sample(cfg.synthetic_samples)
    x_test, y_test = sample(max(cfg.synthetic_samples // 4, 1))
    return Dataset(x_train, y_train, x_test, y_test, num_classes=classes, input_shape=shape,
                   name="synthetic")


def _load_cifar(cfg: RunConfig, device: torch.device) -> Dataset:
    title, _, train_files, test_file, label_key, classes = CIFAR_LAYOUTS[cfg.dataset]
    root = cifar_root(cfg.dataset, cfg.data_dir)

    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_file(os.path.join(root, name), label_key, classes, title) for name in names]
        pixels = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(device)
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts])).to(device)
        # Rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major: N x 3 x 32 x 32.
        images = (pixels.view(-1, 3, 32, 32).float() / 255.0 - mean) / std
        return images, labels

    x_train, y_train = load(train_files)
    x_test, y_test = load([test_file])
    return Dataset(x_train, y_train, x_test, y_test, num_classes=classes, input_shape=(3, 32, 32),
                   name=cfg.dataset)
