"""Privacy-agnostic reference networks, taken from MONAI rather than written again."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn


def make_unet(
    num_classes: int, channels: list[int], in_channels: int = 1, spatial_dims: int = 2
) -> nn.Module:
    """The centralized/local reference: MONAI's residual UNet, as in the design's anchor run.
    ``in_channels``: 3 for colour images (``data.channels``) or the slices of a 2.5D sample,
    so the baseline sees what the federated encoders see. ``spatial_dims = 3``: the 3D
    reference for volume data (``baselines.unet3d``), on whole volumes."""
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )
