"""Privacy-agnostic reference networks, taken from MONAI rather than written again."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn


def make_unet(num_classes: int, channels: list[int], in_channels: int = 1) -> nn.Module:
    """The centralized/local reference: MONAI's residual UNet, as in the design's anchor run.
    ``in_channels``: 3 for colour images (``data.channels``), so the baseline sees what the
    federated encoders see."""
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )


def make_unet3d(num_classes: int, channels: list[int], in_channels: int = 1) -> nn.Module:
    """The 3D reference for volume data (``baselines.unet3d``): the same residual UNet with
    3D convolutions, trained on whole volumes at their native resolution."""
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )
