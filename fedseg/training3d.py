"""A 3D network trained and run on whole volumes at their native resolution: the reference a
MONAI user would pick for volume data (``baselines.unet3d``), in the same harness and with
the same metrics as the 2D methods (``fedseg/reference_runs.py``).

Volumes are read from their files (``Volume.path``), normalised to zero mean and unit
standard deviation over the whole volume, and padded at their far ends to a shape every level
of the network can halve; predictions are cropped back to the volume's own grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedseg.data.dataset import normalise
from fedseg.data.nifti import read_volume
from fedseg.data.volumes import Volume
from fedseg.training import Budget, train_segmenter

Progress = Callable[[int, int, float], None]


def volume_image(volume: Volume) -> np.ndarray:
    """The volume's intensities from its file, normalised over the whole volume."""
    image, _ = read_volume(Path(volume.path), label=False)
    return normalise(image)


def padded_shape(shapes: list[tuple[int, ...]], multiple: int) -> tuple[int, int, int]:
    """The smallest shape that holds every one of ``shapes`` and divides by ``multiple``."""
    biggest = np.max(np.array(shapes), axis=0)
    return tuple(int(-(-n // multiple) * multiple) for n in biggest)  # type: ignore[return-value]


def pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros after the far end of each axis (0 is the normalised mean; class 0 background)."""
    return np.pad(array, [(0, t - n) for n, t in zip(array.shape, shape, strict=True)])


def flip_and_gain(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of volumes (N, 1, X, Y, Z), flipped along the first axis at random (a volume
    mirrored left to right is still a volume of the set), with a random intensity gain and
    shift as the 2D augmentation draws them."""
    n = len(images)
    flip = torch.rand(n, generator=generator) < 0.5
    images, masks = images.clone(), masks.clone()
    images[flip], masks[flip] = images[flip].flip(2), masks[flip].flip(1)
    gain = 0.8 + 0.45 * torch.rand(n, 1, 1, 1, 1, generator=generator)
    shift = -0.2 + 0.4 * torch.rand(n, 1, 1, 1, 1, generator=generator)
    return images * gain + shift, masks


def train_volumes(
    net: nn.Module,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    budget: Budget,
    lr: float,
    batch_size: int,
    seed: int,
    multiple: int,
    on_epoch: Progress | None = None,
) -> int:
    """Dice + CE on whole volumes padded to one shape (``train_segmenter``'s loop, with
    :func:`flip_and_gain`); cosine learning rate over the budget. Returns the epochs run."""
    shape = padded_shape([i.shape for i in images], multiple)
    x_all = np.stack([pad_to(i, shape) for i in images])[:, None]
    y_all = np.stack([pad_to(v.astype(np.int64), shape) for v in labels])
    classes = int(y_all.max()) + 1
    return train_segmenter(
        net, x_all, y_all, classes, budget, lr, batch_size, seed, on_epoch, flip_and_gain, False
    )


@torch.no_grad()
def predict_volume(net: nn.Module, image: np.ndarray, multiple: int) -> np.ndarray:
    """The class map of one volume on its own grid."""
    net.eval()
    shape = padded_shape([image.shape], multiple)
    x = torch.from_numpy(pad_to(image, shape)[None, None])
    pred = net(x).argmax(1)[0].numpy()
    return pred[tuple(slice(0, n) for n in image.shape)].astype(np.int64)
