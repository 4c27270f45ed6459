"""Everything an attack needs from a finished run folder, loaded once.

A run folder (``fedseg run --out DIR``) holds the config (``metrics.json``), each simulated
site's secret (``keys/``), each site's autoencoders (``sites/<site>/autoencoders.pt``) and the
server's mapping network (``checkpoints/umn.pt``). The data splits are deterministic in the
config, so an attack can recompute exactly what each site sent: the keyed latents of its
training images (and, per attack, the same latents under the other transforms, for comparison).
Holding all of this at once is the evaluator's view, not any one attacker's: each attack
module states which part its attacker is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedseg.config import AttackConfig, RunConfig, config_from_dict
from fedseg.coordinator import key_path
from fedseg.data import SiteSplit, load_federation
from fedseg.models.autoencoder import Latents
from fedseg.models.umn import UnifiedMappingNetwork, build_umn
from fedseg.privacy.keys import read_key_file
from fedseg.privacy.transforms import Keyed, keyed_transform
from fedseg.site import SiteModels, site_models_path
from fedseg.training import encode

MODES = ("none", "klt", "knt")
OPTIONAL_UMN_BUFFERS = ("in_basis", "in_offset", "out_basis", "out_offset")


class RunFolderError(ValueError):
    """The run folder is missing or lacks what an attack needs; the message says what."""


def load_run_config(run: Path) -> RunConfig:
    if not run.is_dir():
        raise RunFolderError(
            f"run folder not found: {run} (make one with `fedseg run --config FILE --out {run}`)"
        )
    for name in ("metrics.json", "checkpoints/umn.pt"):
        path = run / name
        if not path.is_file():
            continue
        if name.endswith(".json"):
            values = json.loads(path.read_text()).get("config")
        else:
            values = torch.load(path, weights_only=False, map_location="cpu").get("config")
        if values:
            # Attack settings are today's defaults, not whatever the run was made with.
            known = set(RunConfig.__dataclass_fields__) - {"attack"}
            cfg = config_from_dict({k: v for k, v in values.items() if k in known})
            cfg.out_dir = str(run)
            return cfg
    raise RunFolderError(f"{run} has no metrics.json or checkpoints/umn.pt: not a finished run")


@dataclass
class RunContext:
    run: Path
    cfg: RunConfig
    sites: list[SiteSplit]
    models: dict[str, SiteModels]
    secrets: dict[str, bytes] = field(repr=False)
    _transforms: dict[tuple[str, str], Keyed] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, run: str | Path, attack: AttackConfig | None = None) -> RunContext:
        run = Path(run)
        cfg = load_run_config(run)
        if attack is not None:
            cfg.attack = attack
        sites = load_federation(cfg)
        models, secrets = {}, {}
        key_dir = Path(cfg.privacy.key_dir) if cfg.privacy.key_dir else run / "keys"
        for split in sites:
            path = site_models_path(run, split.name)
            if not path.is_file():
                raise RunFolderError(
                    f"{path} not found: attacks need the sites' saved autoencoders "
                    "(runs made before they were saved must be re-run)"
                )
            models[split.name], _ = SiteModels.load(cfg, path)
            key = key_path(key_dir, split.name, cfg.privacy.key_scope)
            if key.is_file():
                secrets[split.name] = read_key_file(key)
            elif cfg.privacy.transform != "none":
                raise RunFolderError(f"{key} not found: the simulated site's secret is needed")
        if len(secrets) < len(sites):  # a 'none' run made no keys: evaluate keyed modes anyway
            secrets = {s.name: secrets.get(s.name) or _fixed_secret(s.name) for s in sites}
        return cls(run, cfg, sites, models, secrets)

    @property
    def mode(self) -> str:
        return self.cfg.privacy.transform

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def transform(self, site: str, mode: str | None = None) -> Keyed:
        """Site's transform under ``mode`` (default: the run's own)."""
        mode = mode or self.mode
        if (site, mode) not in self._transforms:
            cfg = RunConfig(model=self.cfg.model)
            cfg.privacy.transform = mode  # type: ignore[assignment]
            cfg.privacy.bias_scale = self.cfg.privacy.bias_scale
            self._transforms[site, mode] = keyed_transform(cfg, self.secrets[site])
        return self._transforms[site, mode]

    def plain(self, site: str, images, role: str = "image") -> Latents:
        ae = self.models[site].image_ae if role == "image" else self.models[site].mask_ae
        return encode(ae, torch.as_tensor(images))

    def shared(self, site: str, latents: Latents, mode: str | None = None, role: str = "image"):
        """What leaves the site: keyed under ``mode`` and rounded to fp16 as on the wire."""
        with torch.no_grad():
            keyed = self.transform(site, mode).forward(latents, role)
        return [z.half().float() for z in keyed]

    def umn(self) -> UnifiedMappingNetwork:
        path = self.run / "checkpoints" / "umn.pt"
        if not path.is_file():
            raise RunFolderError(f"{path} not found: membership inference needs the UMN")
        state = torch.load(path, weights_only=False, map_location="cpu")
        m = self.cfg.model
        net = build_umn(m, list(state["sites"]))
        # Checkpoints from before the UMN had fixed per-site bases lack those buffers; their
        # defaults (identity, zero) are exactly the older network.
        loaded = net.load_state_dict(state["umn"], strict=False)
        missing = set(loaded.missing_keys) - set(OPTIONAL_UMN_BUFFERS)
        if missing or loaded.unexpected_keys:
            raise RunFolderError(
                f"{path} does not match this UMN: missing {sorted(missing)}, "
                f"unexpected {sorted(loaded.unexpected_keys)}"
            )
        return net.eval()


def _fixed_secret(site: str) -> bytes:
    """Stand-in secret for evaluating keyed modes on a run made without keys."""
    import hashlib

    return hashlib.sha256(f"fedseg-attack-eval/{site}".encode()).digest()
