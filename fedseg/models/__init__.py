"""Networks: the skip-connected autoencoders, the mapping network and MONAI baselines."""

from fedseg.models.autoencoder import SkipAutoencoder, count_parameters, latent_shapes
from fedseg.models.baselines import make_unet
from fedseg.models.umn import UnifiedMappingNetwork

__all__ = [
    "SkipAutoencoder",
    "UnifiedMappingNetwork",
    "count_parameters",
    "latent_shapes",
    "make_unet",
]
