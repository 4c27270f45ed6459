"""Pick the keyed transform a run asks for (``privacy.transform``), keyed by one secret.

Sites call it with their own secret; with ``server`` custody the coordinator calls it with the
secrets provisioned to it. Both sides therefore build exactly the same transform.
"""

from __future__ import annotations

from fedseg.config import RunConfig
from fedseg.privacy.keys import KeyRing
from fedseg.privacy.klt import LatentTransform
from fedseg.privacy.knt import KntKeyRing, KntTransform

Keyed = LatentTransform | KntTransform


def keyed_transform(cfg: RunConfig, secret: bytes | None) -> Keyed:
    """KLT, KNT, or the identity for ``transform = "none"`` (then ``secret`` is unused)."""
    kind = cfg.privacy.transform
    if kind == "none":
        return LatentTransform(None)
    if secret is None:
        raise ValueError(f"privacy.transform = {kind!r} needs the site's secret")
    if kind == "knt":
        return KntTransform(KntKeyRing.from_secret(secret, cfg.model.latent_channels))
    return LatentTransform(
        KeyRing.from_secret(secret, cfg.model.latent_channels, bias_scale=cfg.privacy.bias_scale)
    )
