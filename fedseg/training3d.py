"""A 3D network trained and run on whole volumes at their native resolution: the reference a
MONAI user would pick for volume data (``baselines.unet3d``), in the same harness and with
the same metrics as the 2D methods (``fedseg/reference_runs.py``).

Volumes are read from their files (``Volume.path``), normalised to zero mean and unit
standard deviation over the whole volume, and padded at their far ends to a shape every level
of the network can halve; predictions are cropped back to the volume's own grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from fedseg.data.dataset import normalise
from fedseg.data.nifti import read_volume
from fedseg.data.volumes import Volume
from fedseg.training import Budget, cosine_lr

Progress = Callable[[int, int, float], None]


def volume_image(volume: Volume) -> np.ndarray:
    """The volume's intensities from its file, normalised over the whole volume."""
    image, _ = read_volume(volume.path, label=False)
    return normalise(image)


def padded_shape(shapes: list[tuple[int, ...]], multiple: int) -> tuple[int, int, int]:
    """The smallest shape that holds every one of ``shapes`` and divides by ``multiple``."""
    biggest = np.max(np.array(shapes), axis=0)
    return tuple(int(-(-n // multiple) * multiple) for n in biggest)  # type: ignore[return-value]


def pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros after the far end of each axis (0 is the normalised mean; class 0 background)."""
    return np.pad(array, [(0, t - n) for n, t in zip(array.shape, shape, strict=True)])


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
    """Dice + CE on whole volumes padded to one shape, a random flip along the first axis and
    a random gain and shift of intensity; cosine learning rate over the budget. Returns the
    epochs run."""
    shape = padded_shape([i.shape for i in images], multiple)
    x_all = torch.from_numpy(np.stack([pad_to(i, shape) for i in images])[:, None])
    y_all = torch.from_numpy(np.stack([pad_to(v.astype(np.int64), shape) for v in labels]))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    net.train()
    epoch = 0
    while not budget.done(epoch):
        cosine_lr(optimizer, lr, budget.progress(epoch))
        losses = []
        order = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, y = x_all[idx].clone(), y_all[idx].clone()
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip], y[flip] = x[flip].flip(2), y[flip].flip(1)
            gain = 0.8 + 0.45 * torch.rand(len(idx), 1, 1, 1, 1, generator=gen)
            shift = -0.2 + 0.4 * torch.rand(len(idx), 1, 1, 1, 1, generator=gen)
            loss = loss_fn(net(x * gain + shift), y[:, None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch += 1
        if on_epoch:
            on_epoch(epoch, budget.epochs, float(np.mean(losses)))
    net.eval()
    return epoch


@torch.no_grad()
def predict_volume(net: nn.Module, image: np.ndarray, multiple: int) -> np.ndarray:
    """The class map of one volume on its own grid."""
    net.eval()
    shape = padded_shape([image.shape], multiple)
    x = torch.from_numpy(pad_to(image, shape)[None, None])
    pred = net(x).argmax(1)[0].numpy()
    return pred[tuple(slice(0, n) for n in image.shape)].astype(np.int64)
