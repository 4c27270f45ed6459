"""What the server computes: collect keyed latents, train the UMN, answer mapping queries.

Key custody decides what the server can see. With ``client`` custody (the default) it holds no
key and trains in each site's keyed space through that site's adapters. With ``server`` custody
(the reference paper's setting) each site's key ring is provisioned to the server out of band
(never in a Flower message), and the server un-keys latents before training and re-keys its
answers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from fedseg.checkpoint import LATENTS_NAME, CheckpointMismatch, save_private
from fedseg.config import RunConfig
from fedseg.models.autoencoder import latent_shapes
from fedseg.models.canonical import canonical_basis
from fedseg.models.umn import build_umn
from fedseg.models.umn_he import FoldedLayer, HEMappingNetwork
from fedseg.privacy.ckks import (
    CkksError,
    CkksParams,
    EncryptedMapper,
    ServerCkks,
    query_packing,
)
from fedseg.privacy.keys import read_key_file
from fedseg.privacy.klt import LatentTransform
from fedseg.privacy.transforms import Keyed, keyed_transform
from fedseg.training import Budget, SiteLatents, adamw, cosine_lr, map_latents, nhwc, train_umn
from fedseg.wire import GRAD_DTYPE, MagnitudeGuard, check_fields, pack, unpack

CHECKPOINT_NAME = "umn.pt"


class UnknownSiteError(ValueError):
    """A query names a site this server was not trained for."""


def key_path(key_dir: str | Path, site: str, scope: str = "site") -> Path:
    return Path(key_dir) / f"{'federation' if scope == 'federation' else site}.key"


FLAT_LATENTS = 1e-4  # latent spread below which a batch cannot give the UMN its input bases


class Coordinator:
    def __init__(self, cfg: RunConfig, sites: list[str], key_dir: str | Path | None = None):
        self.cfg = cfg
        self.sites = list(sites)
        self.shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
        torch.manual_seed(cfg.training.seed)
        self.umn = build_umn(cfg.model, self.sites)
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0
        self.round = 0
        self._chunks: dict[str, list[tuple[list, list]]] = {s: [] for s in self.sites}
        self._transforms: dict[str, Keyed] = {s: LatentTransform(None) for s in self.sites}
        self._finetune_opt: torch.optim.Optimizer | None = None
        self._finetune_graphs: dict[str, tuple[list, list]] = {}
        self._magnitudes = MagnitudeGuard(cfg.federation.magnitude_bound)
        self._ckks: dict[str, ServerCkks] = {}  # each hospital's public CKKS keys
        self._mappers: dict[str, tuple[str, EncryptedMapper]] = {}  # compiled, per weights
        if cfg.privacy.transform != "none" and cfg.privacy.custody == "server":
            if key_dir is None:
                raise ValueError("server custody needs the sites' key files (privacy.key_dir)")
            for s in self.sites:
                self._transforms[s] = keyed_transform(
                    cfg, read_key_file(key_path(key_dir, s, cfg.privacy.key_scope))
                )

    def _check_site(self, site: str) -> None:
        if site not in self._transforms:
            raise UnknownSiteError(f"unknown site {site!r}; this server serves {self.sites}")

    def add_chunk(
        self, site: str, arrays: dict[str, np.ndarray], max_items: int | None = None
    ) -> int:
        """Validate one chunk of a site's training latents (no more than ``max_items``, the
        number asked for); returns its item count."""
        self._check_site(site)
        check_fields(arrays, ("image", "mask"), len(self.shapes))
        image = unpack(arrays, "image", self.shapes, max_items)
        mask = unpack(arrays, "mask", self.shapes, max_items)
        self._magnitudes.check(site, arrays)
        if image[0].shape[0] != mask[0].shape[0]:
            raise ValueError(
                f"site {site}: {image[0].shape[0]} image vs {mask[0].shape[0]} mask latents"
            )
        t = self._transforms[site]
        # Kept in fp16 (as received) to halve the server's memory.
        self._chunks[site].append(
            (
                [z.half() for z in t.inverse(image, "image")],
                [z.half() for z in t.inverse(mask, "mask")],
            )
        )
        return image[0].shape[0]

    def site_latents(self) -> list[SiteLatents]:
        out = []
        for site, chunks in self._chunks.items():
            if not chunks:
                continue
            image = [torch.cat([c[0][s] for c in chunks]) for s in range(3)]
            mask = [torch.cat([c[1][s] for c in chunks]) for s in range(3)]
            out.append(SiteLatents(site, image, mask))
        return out

    def retain(self, sites: list[str]) -> None:
        """Forget what sites that dropped out had sent, so half a site never trains the UMN."""
        for site in self._chunks:
            if site not in sites:
                self._chunks[site] = []

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.umn.parameters())

    def collected(self) -> dict[str, int]:
        return {s: sum(c[0][0].shape[0] for c in chunks) for s, chunks in self._chunks.items()}

    def train_round(self, on_epoch=None) -> float:
        """One UMN round (its share of the epochs/time budget); returns the last loss."""
        t = self.cfg.training
        if self.round == 0 and self.optimizer is None and self.cfg.model.canonical_adapters:
            self._start_in_canonical_bases()
        rounds = max(t.umn_rounds, 1)
        budget = Budget(t.umn_epochs_per_round, t.umn_minutes / rounds if t.umn_minutes else 0.0)
        # One cosine schedule over all rounds: the round's budget is a slice of it.
        self.optimizer, loss, self.epoch = train_umn(
            self.umn,
            self.site_latents(),
            budget,
            t.umn_lr * _round_lr_factor(self.round, rounds),
            t.batch_size,
            t.seed,
            optimizer=self.optimizer,
            on_epoch=on_epoch,
            start_epoch=self.epoch,
            adapter_lr_scale=t.adapter_lr_scale,
        )
        self.round += 1
        return loss

    def _start_in_canonical_bases(self) -> None:
        for site in self.site_latents():
            self.umn.start_in_canonical_bases(
                site.site,
                [canonical_basis(z, whiten=True) for z in site.image],
                [canonical_basis(z, whiten=False) for z in site.mask],
            )

    def _start_input_bases(self, site: str, image: list[torch.Tensor]) -> None:
        """Split training from scratch collects no training latents, so the UMN's input bases
        come from the first batch a site maps (latents the server receives anyway). Without
        them client custody fed the trunk the key's bias (std 1, against about 0.35 for a
        fresh us-nerve encoder's channels) and server custody did not; with them the trunk
        sees the same centred coordinates in either custody, whatever the key (``canonical``).
        Shared adapters mean one latent space, so the first batch's bases serve every site
        (other batches could order or sign near-equal axes differently)."""
        bases = [canonical_basis(z, whiten=False) for z in image]
        if any(float(b.scale.min()) < FLAT_LATENTS for b in bases):
            return  # a flat batch (blank images) has no axes: wait for the next one
        for s in self.sites if self.umn.shared_adapters else [site]:
            if not self.umn.has_input_basis(s):
                self.umn.start_in_canonical_input(s, bases)

    def map_query(self, site: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keyed image latents in, keyed mask latents out."""
        self._check_site(site)
        t = self._transforms[site]
        image = t.inverse(unpack(arrays, "image", self.shapes), "image")
        mapped = map_latents(self.umn, site, image)
        return pack(t.forward(mapped, "mask"), "mask")

    def register_ckks(self, site: str, bundle: dict[str, np.ndarray]) -> None:
        """Keep a hospital's CKKS public bundle (checked: 128-bit parameters with the depth
        this network needs, no secret key); once per hospital, never per query."""
        self._check_site(site)
        umn = self._he_umn()
        self._ckks[site] = ServerCkks.from_bundle(bundle, umn.depth)
        self._mappers.pop(site, None)

    def map_encrypted(
        self, site: str, arrays: dict[str, np.ndarray], max_items: int | None = None
    ) -> dict[str, np.ndarray]:
        """CKKS ciphertexts of keyed image latents in, of keyed mask latents out: the HE
        network evaluated with the hospital's public keys only. The network is compiled for
        a hospital's keys once per set of weights (encoding every weight vector)."""
        self._check_site(site)
        if site not in self._ckks:
            raise CkksError(f"site {site!r} registered no CKKS keys: refusing its encrypted query")
        if self.cfg.privacy.custody == "server" and self.cfg.privacy.transform != "none":
            raise CkksError("encrypted queries need client key custody (the server cannot key)")
        umn = self._he_umn()
        folded = umn.folded(site)
        digest = hashlib.sha256(
            b"".join(m.tobytes() for layers in folded for lay in layers for m in _matrices(lay))
        ).hexdigest()
        cached = self._mappers.get(site)
        if cached is None or cached[0] != digest:
            keys = self._ckks[site]
            packing = query_packing(self.shapes, keys.params)
            self._mappers[site] = (digest, EncryptedMapper(keys, folded, packing))
        return self._mappers[site][1].map(arrays, max_items)

    def ckks_key_ids(self) -> dict[str, str]:
        """Each registered hospital's CKKS key id (public: a hash of its secret key)."""
        return {site: keys.key_id for site, keys in self._ckks.items()}

    def ckks_params(self, site: str) -> CkksParams:
        return self._ckks[site].params

    def _he_umn(self) -> HEMappingNetwork:
        if not isinstance(self.umn, HEMappingNetwork):
            raise CkksError("encrypted queries need model.umn_arch = 'he'")
        return self.umn

    def finetune_map(
        self, batches: dict[str, dict[str, np.ndarray]]
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
        """Split-learning step 2 (fedseg/finetune.py) for every site's batch of a step: each
        batch checked and taken out of its site's key on its own, then one pass of the UMN over
        all of them, graphs kept for step 4. A batch is at most ``training.batch_size`` items.
        Returns the mapped batches and the refused sites, with why."""
        inputs, refused = {}, {}
        for site in sorted(batches):  # name order: the first batch fixes a site's input bases
            try:
                inputs[site] = self._finetune_input(site, batches[site])
            except ValueError as err:
                refused[site] = str(err)
        if not inputs:
            return {}, refused
        self.umn.train()
        outs = self.umn.map_sites(
            [
                ([nhwc(z) for z in image], self.umn.site_index(site))
                for site, (_, image) in inputs.items()
            ]
        )
        mapped = {}
        for (site, (keyed, _)), out in zip(inputs.items(), outs, strict=True):
            keyed_out = self._transforms[site].forward(out, "mask")
            self._finetune_graphs[site] = (keyed, keyed_out)
            mapped[site] = pack(keyed_out, "mask")
        return mapped, refused

    def finetune_forward(self, site: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`finetune_map` for one site's batch; a refused batch raises ValueError."""
        mapped, refused = self.finetune_map({site: arrays})
        if site in refused:
            raise ValueError(refused[site])
        return mapped[site]

    def _finetune_input(
        self, site: str, arrays: dict[str, np.ndarray]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A site's keyed latents (leaves, for their gradient) and the same un-keyed."""
        self._check_site(site)
        t = self._transforms[site]
        check_fields(arrays, ("image",), len(self.shapes))
        batch = self.cfg.training.batch_size
        keyed = [z.requires_grad_() for z in unpack(arrays, "image", self.shapes, batch)]
        self._magnitudes.check(site, arrays)
        image = t.inverse(keyed, "image")
        if self.cfg.model.canonical_adapters and not self.umn.has_input_basis(site):
            self._start_input_bases(site, image)
        return keyed, image

    def finetune_backward(
        self, grads: dict[str, dict[str, np.ndarray]], epoch: int, epochs: int
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
        """Step 4: the sites' loss gradients back through the step's one UMN pass, and one
        optimizer step on their mean (as the centralized UNet takes one step on a batch drawn
        from all sites). Returns each site's gradient for its keyed image latents, and the
        sites whose gradient was refused (with why); a refused or missing site does not count
        this step."""
        graphs, self._finetune_graphs = self._finetune_graphs, {}
        accepted, refused = {}, {}
        for site, arrays in sorted(grads.items()):  # a fixed order, whatever replied first
            if site not in graphs:
                refused[site] = "sent a gradient but mapped no batch this step"
                continue
            try:
                check_fields(arrays, ("grad",), len(self.shapes))
                expected = graphs[site][1][0].shape[0]
                grad = unpack(arrays, "grad", self.shapes, dtype=GRAD_DTYPE, items=expected)
                self._magnitudes.check(site, arrays)
            except ValueError as err:
                refused[site] = str(err)
                continue
            accepted[site] = grad
        if not accepted:
            self.umn.eval()
            return {}, refused
        params = list(self.umn.parameters())
        if self._finetune_opt is None:
            self._finetune_opt = adamw(params, self.cfg.training.finetune_lr)
        cosine_lr(self._finetune_opt, self.cfg.training.finetune_lr, epoch / max(epochs, 1))
        keyed = [z for site in accepted for z in graphs[site][0]]
        out = torch.autograd.grad(
            [m for site in accepted for m in graphs[site][1]],
            [*keyed, *params],
            [g for grad in accepted.values() for g in grad],
            allow_unused=True,  # other sites' adapters, when each site has its own
        )
        scales = len(self.shapes)
        answers = {
            site: pack(list(out[i * scales : (i + 1) * scales]), "grad", GRAD_DTYPE)
            for i, site in enumerate(accepted)
        }
        for p, g in zip(params, out[len(keyed) :], strict=True):
            p.grad = None if g is None else g / len(accepted)  # the mean of the sites' losses
        self._finetune_opt.step()
        self._finetune_opt.zero_grad(set_to_none=True)
        self.umn.eval()
        return answers, refused

    def save_checkpoint(self, directory: str | Path, extra: dict | None = None) -> Path:
        """UMN weights, optimizer and progress; never a key, whatever the custody."""
        state = {
            "round": self.round,
            "epoch": self.epoch,
            "sites": self.sites,
            "umn": self.umn.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "config": self.cfg.to_dict(),
            **(extra or {}),
        }
        return save_private(state, Path(directory) / CHECKPOINT_NAME)  # whole or not at all

    def save_latents(self, directory: str | Path, extra: dict | None = None) -> Path:
        """What the sites sent (fp16, as the server holds it), so a resume need not re-collect."""
        state = {"sites": self.sites, "chunks": self._chunks, "config": self.cfg.to_dict()}
        return save_private({**state, **(extra or {})}, Path(directory) / LATENTS_NAME)

    def restore_latents(self, state: dict) -> None:
        """Take back what :meth:`save_latents` wrote (same sites, or a refusal)."""
        if list(state["sites"]) != self.sites:
            raise CheckpointMismatch(f"latents were saved for {state['sites']}, not {self.sites}")
        self._chunks = {s: [(list(i), list(m)) for i, m in state["chunks"][s]] for s in self.sites}

    def restore_round(self, state: dict) -> None:
        """UMN weights, optimizer and progress of the last finished round."""
        if list(state["sites"]) != self.sites:
            raise CheckpointMismatch(f"UMN was trained for {state['sites']}, not {self.sites}")
        self.umn.load_state_dict(state["umn"])
        self.round, self.epoch = int(state["round"]), int(state["epoch"])
        if state.get("optimizer") is not None:
            # The same groups train_umn builds; load_state_dict checks that they match.
            adapters = [p for n, p in self.umn.named_parameters() if "adapters" in n]
            trunk = [p for n, p in self.umn.named_parameters() if "adapters" not in n]
            scale = self.cfg.training.adapter_lr_scale
            self.optimizer = adamw(
                [{"params": trunk, "lr_scale": 1.0}, {"params": adapters, "lr_scale": scale}],
                self.cfg.training.umn_lr,
            )
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as err:
                raise CheckpointMismatch(f"UMN optimizer state does not fit: {err}") from err
        self.umn.eval()


def _matrices(layer: FoldedLayer) -> list[np.ndarray]:
    return [m for m in (layer.lin, layer.bias, layer.quad) if m is not None]


def _round_lr_factor(round_index: int, rounds: int) -> float:
    """Step the base LR down over rounds so the per-round cosine does not restart at full LR."""
    return float(0.5 * (1 + np.cos(np.pi * round_index / rounds)))  # float: weights_only loads
