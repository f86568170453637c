"""CIFAR-10/100 in the python-pickle layout, read from a local folder with numpy only (torch-free,
so the dashboard can check a folder without importing torch). Nothing is ever downloaded."""
from __future__ import annotations

import os
import pickle

import numpy as np

from engine.config import ConfigError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class DataError(ConfigError):
    """A dataset cannot be read. One line naming the path and the layout expected."""


CIFAR_LAYOUTS = {
    # dataset: (title, folder, train files, test file, label key, classes)
    "cifar10": ("CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", b"labels", 10),
    "cifar100": ("CIFAR-100", "cifar-100-python", ["train"], "test", b"fine_labels", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Reads dicts of numpy arrays and nothing else: a pickle can run code, and data folders get shared."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _layout_root(data_dir: str, folder: str, files: list[str]) -> str:
    """data_dir may be the layout folder itself (by name, or because it holds the files) or its parent."""
    if os.path.basename(data_dir) == folder or all(os.path.isfile(os.path.join(data_dir, f)) for f in files):
        return data_dir
    return os.path.join(data_dir, folder)


def read_cifar_file(path: str, label_key: bytes, classes: int, title: str) -> tuple[np.ndarray, np.ndarray]:
    expected = f"a dict with b'data' (uint8, N x 3072) and {label_key!r} (N labels below {classes})"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:     # any failure to unpickle or find the keys means: not a CIFAR file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{title} file {path} is not a python-pickle batch ({reason}): expected {expected}") from None
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),)
            or (len(labels) and (labels.min() < 0 or labels.max() >= classes))):
        raise DataError(f"{title} file {path} has data {data.dtype} {data.shape} and {labels.size} labels: "
                        f"expected {expected}")
    return data, labels


def cifar_root(dataset: str, data_dir: str | None) -> str:
    """The folder holding the dataset's files; DataError naming the path and the layout when a file is missing."""
    title, folder, train_files, test_file, _, _ = CIFAR_LAYOUTS[dataset]
    data_dir = os.path.abspath(os.path.expanduser(data_dir or "."))
    files = train_files + [test_file]
    root = _layout_root(data_dir, folder, files)
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        listing = "{data_batch_1..5,test_batch}" if dataset == "cifar10" else "{train,test}"
        lacking = f" (missing {', '.join(missing)})" if len(missing) < len(files) else ""
        raise DataError(f"{title} not found at {data_dir}{lacking}: expected {root}/{listing} "
                        f"(python-pickle layout from {CIFAR_URL}); nothing is downloaded")
    return root


def check_cifar(dataset: str, data_dir: str | None) -> None:
    """Every file present and the test file readable: what can be checked before a run is queued."""
    title, _, _, test_file, label_key, classes = CIFAR_LAYOUTS[dataset]
    root = cifar_root(dataset, data_dir)
    read_cifar_file(os.path.join(root, test_file), label_key, classes, title)
