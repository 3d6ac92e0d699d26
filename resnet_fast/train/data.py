"""Data sets for ``resnet-fast train`` / ``eval``: bundled digits, CIFAR-10 batches, image folders.

Every data set yields ``(image, label)`` with ``image`` a CHW ``uint8`` tensor of
the configured size; normalisation and augmentation run per batch in the main
process (:func:`prepare_batch`), driven by a seeded generator, so the numbers do
not depend on ``--workers``. Heavy imports (sklearn, torchvision, PIL) stay inside
the functions: the CLI imports this package just to build its parser.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["DATA_SETS", "DataError", "DataBundle", "TensorImageDataset", "ImageFileDataset", "load_data",
           "default_image_size", "prepare_batch", "augment_batch"]

DATA_SETS = ("digits", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR10_TEST = "test_batch"


class DataError(ValueError):
    """A data set cannot be found or read: the message names the path and the problem."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker ...\n<traceback>"):
        # keep the original one-line message.
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class TensorImageDataset(Dataset):
    """Images held in memory as one ``(N, 3, H, W)`` uint8 tensor plus labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        # One gather instead of N tiny indexing calls; the default collate stacks the result.
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return list(zip(self.images[index].unbind(0), self.labels[index].tolist()))


class ImageFileDataset(Dataset):
    """Image files decoded lazily with PIL, resized (shorter side) and centre-cropped to ``image_size``."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image = _resize_center_crop(image, self.image_size)
                data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous(), label


def _resize_center_crop(image: Any, size: int) -> Any:
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    left = (resized.size[0] - size) // 2
    top = (resized.size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


@dataclass
class DataBundle:
    """Train and test splits plus what the model and the batch preparation need to know."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool
    classes: list[str] = field(default_factory=list)
    description: str = ""


def default_image_size(name: str) -> int:
    """The image size used when ``--image-size`` is not given."""
    # The digits are 8x8: the 3x3 stride-1 stem takes them as they are (16x16 or 32x32 add no detail,
    # only 4x / 16x the compute), which keeps the default run within ~2 minutes on 2 CPU cores.
    return {"digits": 8, "cifar10": 32, "imagefolder": 224}[name]


def load_data(name: str, data_dir: Optional[str] = None, image_size: Optional[int] = None, seed: int = 0,
              download: bool = False, test_fraction: float = 0.2) -> DataBundle:
    """Load data set ``name`` (``digits``, ``cifar10`` or ``imagefolder``) with its train/test split.

    ``seed`` fixes the split where one is made (digits, image folders without
    ``train/``+``val/``); it is stratified, so every class is in both splits.
    """
    if name not in DATA_SETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")
    size = int(image_size) if image_size is not None else default_image_size(name)
    if size < 8:
        raise DataError(f"--image-size must be at least 8, got {size}")
    if name == "digits":
        return _load_digits(size, seed, test_fraction)
    if data_dir is None:
        raise DataError(f"--data {name} needs --data-dir DIR")
    if name == "cifar10":
        return _load_cifar10(data_dir, size, download)
    return _load_image_folder(data_dir, size, seed, test_fraction)


def _stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    indices = list(range(len(labels)))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=list(labels))
    return sorted(train), sorted(test)


def _to_rgb_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) or (N, 3, H, W) floats in [0, 1] -> (N, 3, size, size) uint8 (bilinear resize)."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def _load_digits(size: int, seed: int, test_fraction: float) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = _stratified_split(labels.tolist(), test_fraction, seed)
    pixels = _to_rgb_uint8(images, size)
    train = TensorImageDataset(pixels[train_idx], labels[train_idx])
    test = TensorImageDataset(pixels[test_idx], labels[test_idx])
    mean, std = _channel_stats(train.images)
    return DataBundle("digits", train, test, 10, size, mean, std, augment=False,
                      classes=[str(i) for i in range(10)],
                      description=f"sklearn digits, {len(train)} train / {len(test)} test, {size}x{size}")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    data = images.float().div_(255)
    mean = data.mean(dim=(0, 2, 3))
    std = data.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]


_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _find_cifar10_dir(data_dir: str) -> Optional[str]:
    """``data_dir`` itself or its ``cifar-10-batches-py`` subfolder (torchvision's layout)."""
    for candidate in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in _CIFAR10_TRAIN + [_CIFAR10_TEST]):
            return candidate
    return None


def _read_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = batch[b"data"] if b"data" in batch else batch["data"]
        labels = batch[b"labels"] if b"labels" in batch else batch["labels"]
        array = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        targets = np.asarray(labels, dtype=np.int64)
    except Exception as error:  # noqa: BLE001 - any failure means "not a CIFAR-10 batch"
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if array.shape[0] != targets.shape[0] or targets.min() < 0 or targets.max() > 9:
        raise DataError(f"{path} is not a CIFAR-10 python batch (labels do not match the images)")
    return torch.from_numpy(array.copy()), torch.from_numpy(targets)


def _load_cifar10(data_dir: str, size: int, download: bool) -> DataBundle:
    if not os.path.isdir(data_dir) and not download:
        raise DataError(f"data directory {data_dir} does not exist (pass --download to fetch CIFAR-10 into it)")
    folder = _find_cifar10_dir(data_dir)
    if folder is None and download:
        try:
            from torchvision.datasets import CIFAR10
        except ImportError:
            raise DataError("--download needs torchvision (pip install torchvision)") from None
        os.makedirs(data_dir, exist_ok=True)
        CIFAR10(data_dir, train=True, download=True)
        folder = _find_cifar10_dir(data_dir)
    if folder is None:
        raise DataError(f"no CIFAR-10 python batches in {data_dir} (expected {', '.join(_CIFAR10_TRAIN)} and "
                        f"{_CIFAR10_TEST}; pass --download to fetch them)")
    parts = [_read_cifar_batch(os.path.join(folder, name)) for name in _CIFAR10_TRAIN]
    train_images = torch.cat([p[0] for p in parts])
    train_labels = torch.cat([p[1] for p in parts])
    test_images, test_labels = _read_cifar_batch(os.path.join(folder, _CIFAR10_TEST))
    if size != 32:
        train_images = _to_rgb_uint8(train_images.float() / 255, size)
        test_images = _to_rgb_uint8(test_images.float() / 255, size)
    train = TensorImageDataset(train_images, train_labels)
    test = TensorImageDataset(test_images, test_labels)
    return DataBundle("cifar10", train, test, 10, size, _CIFAR10_MEAN, _CIFAR10_STD, augment=True,
                      classes=list(_CIFAR10_CLASSES),
                      description=f"CIFAR-10 from {folder}, {len(train)} train / {len(test)} test, {size}x{size}")


def _scan_class_folders(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected one folder of images per class)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), label))
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return classes, samples


def _load_image_folder(data_dir: str, size: int, seed: int, test_fraction: float) -> DataBundle:
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes, train_samples = _scan_class_folders(train_dir)
        val_classes, test_samples = _scan_class_folders(val_dir)
        if val_classes != classes:
            raise DataError(f"class folders of {train_dir} and {val_dir} differ "
                            f"({len(classes)} vs {len(val_classes)} classes)")
        how = "train/ and val/ folders"
    else:
        classes, samples = _scan_class_folders(data_dir)
        labels = [label for _, label in samples]
        counts = torch.bincount(torch.tensor(labels), minlength=len(classes))
        if int(counts.min()) < 2:
            raise DataError(f"every class folder of {data_dir} needs at least 2 images for a train/test split "
                            f"(or provide train/ and val/ subfolders)")
        train_idx, test_idx = _stratified_split(labels, max(test_fraction, len(classes) / len(samples)), seed)
        train_samples = [samples[i] for i in train_idx]
        test_samples = [samples[i] for i in test_idx]
        how = f"seeded {int(round((1 - test_fraction) * 100))}/{int(round(test_fraction * 100))} split"
    if len(classes) < 2:
        raise DataError(f"{data_dir} has a single class folder; classification needs at least 2")
    return DataBundle("imagefolder", ImageFileDataset(train_samples, size), ImageFileDataset(test_samples, size),
                      len(classes), size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), augment=True,
                      classes=classes,
                      description=f"image folders in {data_dir} ({how}), {len(classes)} classes, "
                                  f"{len(train_samples)} train / {len(test_samples)} test, {size}x{size}")


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, from ``generator`` (CPU).

    The classic CIFAR-10 ResNet recipe (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    vectorised over the batch.
    """
    n, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (offsets[:, 0:1] + torch.arange(height)).to(images.device)  # (n, H)
    cols = (offsets[:, 1:2] + torch.arange(width)).to(images.device)  # (n, W)
    cols = torch.where(flips.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def prepare_batch(images: torch.Tensor, bundle_mean: Sequence[float], bundle_std: Sequence[float],
                  device: torch.device, channels_last: bool = False,
                  augment_generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 images -> normalised float32 on ``device`` (augmented first when a generator is given)."""
    if augment_generator is not None:
        images = augment_batch(images, augment_generator)
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(bundle_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(bundle_std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

