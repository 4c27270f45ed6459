"""Skip-connected autoencoder whose three latent scales are what a hospital shares.

The encoder has five stride-2 stages; the outputs of stages 3, 4 and 5 (1/8, 1/16 and 1/32 of
the input) are projected to ``latent_channels`` each. The decoder starts from the coarsest
latent and takes the two finer latents as skips, so everything the decoder needs is in the
latents: nothing else has to cross the wire at inference.

With ``local_skips`` the mask decoder also takes the site's own image encoder's 1/4 and 1/2
scale features (U-shaped split learning: the site holds both ends of the network). They never
leave the site; they give the decoder the fine detail that 1/8-scale latents lose (boundaries).
With ``full_res_width`` the encoder also has a small full-resolution branch on the image, and the
decoder's last layer reads it: the only features at the masks' own resolution.
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
    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        latent_channels: int,
        full_res_width: int = 0,
        local_stages: int = 2,
    ) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(conv_block(chans[i], chans[i + 1], 2) for i in range(5))
        self.heads = nn.ModuleList(nn.Conv2d(w, latent_channels, 1) for w in widths[2:])
        # A side branch at full resolution: a local skip only, never part of the latents.
        self.full_res = conv_block(in_channels, full_res_width) if full_res_width else None
        self.local_stages = local_stages  # how many stages, finest first, the skips take

    def forward(
        self, x: torch.Tensor, local: bool = False
    ) -> Latents | tuple[Latents, list[torch.Tensor]]:
        """Latents; with ``local``, :meth:`encode`'s pair (for ``torch.func.functional_call``,
        which calls ``forward``)."""
        return self.encode(x) if local else self.encode(x)[0]

    def encode(self, x: torch.Tensor) -> tuple[Latents, list[torch.Tensor]]:
        """Latents and :meth:`local_features` of one pass (split training needs both)."""
        full = [self.full_res(x)] if self.full_res is not None else []
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        latents = [head(f) for head, f in zip(self.heads, feats[2:], strict=True)]
        return latents, full + feats[: self.local_stages]

    def local_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The mask decoder's site-local skips: the 1/2 and 1/4 scale features, after the
        full-resolution branch's when the encoder has one."""
        feats = [self.full_res(x)] if self.full_res is not None else []
        for stage in self.stages[: self.local_stages]:
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
        full_res_width: int = 0,
        local_stages: int = 2,
    ) -> None:
        super().__init__()
        if full_res_width and not local_skips:
            raise ValueError("a full-resolution skip is a local skip: it needs local_skips")
        if not 1 <= local_stages <= 3:
            raise ValueError(f"local_stages must be 1 to 3, not {local_stages}")
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
        # Local skip widths at full, 1/2, 1/4 and 1/8 scale (0: none there).
        stages = [w if local_skips and i < local_stages else 0 for i, w in enumerate((w1, w2, w3))]
        self.local_widths = (full_res_width, *stages)
        self.coarse = conv_block(c, w5)
        self.up16 = conv_block(w5 + c, w4)
        self.up8 = conv_block(w4 + c + stages[2], w3)
        self.up4 = conv_block(w3 + stages[1], w2)
        self.up2 = conv_block(w2 + stages[0], w1)
        # Full resolution gets one conv: a block there would cost more than the rest together.
        self.out = nn.Conv2d(w1 + full_res_width, out_channels, 3, padding=1)

    @property
    def local_skips(self) -> bool:
        return any(self.local_widths)

    @property
    def local_count(self) -> int:
        """How many local features :meth:`forward` takes (0 without local skips)."""
        return sum(map(bool, self.local_widths))

    def forward(self, latents: Latents, local: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``local``: the image encoder's :meth:`Encoder.local_features` of the same images,
        finest first, for a decoder built with ``local_skips`` (zeros when absent: the mask
        autoencoder's reconstruction pre-training has no image)."""
        if local is not None and not self.local_skips:
            raise ValueError("this decoder was built without local skips")
        if local is not None and len(local) != self.local_count:
            raise ValueError(f"{len(local)} local skips, the decoder expects {self.local_count}")
        if self.input_norm is not None:
            latents = [norm(z) for norm, z in zip(self.input_norm, latents, strict=True)]
        z8, z16, z32 = latents
        given = iter(local or [])
        f1, f2, f4, f8 = (next(given, None) if w else None for w in self.local_widths)
        x = self.coarse(z32)
        x = self.up16(torch.cat([_up(x), z16], 1))
        for block, latent, skip, width in (
            (self.up8, z8, f8, self.local_widths[3]),
            (self.up4, None, f4, self.local_widths[2]),
            (self.up2, None, f2, self.local_widths[1]),
            (self.out, None, f1, self.local_widths[0]),
        ):
            x = _up(x)
            parts = [x, *([latent] if latent is not None else [])]
            if width:
                parts.append(_skip(skip, x, width))
            x = block(torch.cat(parts, 1) if len(parts) > 1 else x)
        return x


def _skip(skip: torch.Tensor | None, x: torch.Tensor, width: int) -> torch.Tensor:
    """A local skip to concatenate to ``x``: zeros when absent, its shape checked."""
    if skip is None:
        return x.new_zeros(x.shape[0], width, *x.shape[2:])
    if tuple(skip.shape) != (x.shape[0], width, *x.shape[2:]):
        raise ValueError(
            f"local skip of shape {tuple(skip.shape)}, "
            f"the decoder expects {(x.shape[0], width, *x.shape[2:])}"
        )
    return skip


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
        encoder_full_res: int = 0,
        decoder_full_res: int = 0,
        local_stages: int = 2,
    ) -> None:
        """``encoder_full_res``: the width of the encoder's full-resolution branch (the image
        AE's, for a mask decoder's skip); ``decoder_full_res``: that of the skip the decoder
        reads (the mask AE's)."""
        super().__init__()
        self.encoder = Encoder(in_channels, widths, latent_channels, encoder_full_res, local_stages)
        self.decoder = Decoder(
            out_channels,
            widths,
            latent_channels,
            local_skips,
            input_norm,
            decoder_full_res,
            local_stages,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def latent_shapes(image_size: int, latent_channels: int) -> list[tuple[int, int, int]]:
    """(C, h, w) of each latent scale for a square input."""
    return [(latent_channels, image_size // s, image_size // s) for s in LATENT_STRIDES]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
