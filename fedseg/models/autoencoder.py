"""Skip-connected autoencoder whose three latent scales are what a hospital shares.

The encoder has five stride-2 stages; the outputs of stages 3, 4 and 5 (1/8, 1/16 and 1/32 of
the input) are projected to ``latent_channels`` each. The decoder starts from the coarsest
latent and takes the two finer latents as skips, so everything the decoder needs is in the
latents: nothing else has to cross the wire at inference.

With ``local_skips`` the mask decoder also takes the site's own image encoder's 1/4 and 1/2
scale features (U-shaped split learning: the site holds both ends of the network). They never
leave the site; they give the decoder the fine detail that 1/8-scale latents lose (boundaries).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

Latents = list[torch.Tensor]  # [1/8, 1/16, 1/32] scale, each (B, C, h, w)
LATENT_STRIDES = (8, 16, 32)


def conv_block(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], latent_channels: int) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(conv_block(chans[i], chans[i + 1], 2) for i in range(5))
        self.heads = nn.ModuleList(nn.Conv2d(w, latent_channels, 1) for w in widths[2:])

    def forward(
        self, x: torch.Tensor, local: bool = False
    ) -> Latents | tuple[Latents, list[torch.Tensor]]:
        """Latents; with ``local``, :meth:`encode`'s pair (for ``torch.func.functional_call``,
        which calls ``forward``)."""
        return self.encode(x) if local else self.encode(x)[0]

    def encode(self, x: torch.Tensor) -> tuple[Latents, list[torch.Tensor]]:
        """Latents and :meth:`local_features` of one pass (split training needs both)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return [head(f) for head, f in zip(self.heads, feats[2:], strict=True)], feats[:2]

    def local_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 1/2 and 1/4 scale features: the mask decoder's site-local skips."""
        feats = []
        for stage in self.stages[:2]:
            x = stage(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        widths: list[int],
        latent_channels: int,
        local_skips: bool = False,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        c = latent_channels
        # Latents standardised per channel on the way in: in client custody the decoder gets
        # the server's output un-keyed, offset by the key's bias, which no layer of the
        # server can learn away without the key (see ModelConfig.decoder_input_norm).
        self.input_norm = (
            nn.ModuleList(nn.BatchNorm2d(c, affine=False) for _ in LATENT_STRIDES)
            if input_norm
            else None
        )
        self.local_widths = (w1, w2) if local_skips else (0, 0)
        self.coarse = conv_block(c, w5)
        self.up16 = conv_block(w5 + c, w4)
        self.up8 = conv_block(w4 + c, w3)
        self.up4 = conv_block(w3 + self.local_widths[1], w2)
        self.up2 = conv_block(w2 + self.local_widths[0], w1)
        # Full resolution gets one conv: a block there would cost more than the rest together.
        self.out = nn.Conv2d(w1, out_channels, 3, padding=1)

    @property
    def local_skips(self) -> bool:
        return self.local_widths != (0, 0)

    def forward(self, latents: Latents, local: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``local``: the image encoder's :meth:`Encoder.local_features` of the same images,
        for a decoder built with ``local_skips`` (zeros when absent: the mask autoencoder's
        reconstruction pre-training has no image)."""
        if local is not None and not self.local_skips:
            raise ValueError("this decoder was built without local skips")
        if self.input_norm is not None:
            latents = [norm(z) for norm, z in zip(self.input_norm, latents, strict=True)]
        z8, z16, z32 = latents
        x = self.coarse(z32)
        x = self.up16(torch.cat([_up(x), z16], 1))
        x = self.up8(torch.cat([_up(x), z8], 1))
        f2, f4 = local if local is not None else (None, None)
        for block, skip, width in (
            (self.up4, f4, self.local_widths[1]),
            (self.up2, f2, self.local_widths[0]),
        ):
            x = _up(x)
            if width:
                if skip is None:
                    skip = x.new_zeros(x.shape[0], width, *x.shape[2:])
                elif tuple(skip.shape) != (x.shape[0], width, *x.shape[2:]):
                    raise ValueError(
                        f"local skip of shape {tuple(skip.shape)}, "
                        f"the decoder expects {(x.shape[0], width, *x.shape[2:])}"
                    )
                x = torch.cat([x, skip], 1)
            x = block(x)
        return self.out(_up(x))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class SkipAutoencoder(nn.Module):
    """Image AE (1 channel in/out) or mask AE (one-hot classes in, class logits out)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: list[int],
        latent_channels: int,
        local_skips: bool = False,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, widths, latent_channels)
        self.decoder = Decoder(out_channels, widths, latent_channels, local_skips, input_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def latent_shapes(image_size: int, latent_channels: int) -> list[tuple[int, int, int]]:
    """(C, h, w) of each latent scale for a square input."""
    return [(latent_channels, image_size // s, image_size // s) for s in LATENT_STRIDES]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
