"""``fedseg segment``: a site segments one scan through the mapping service.

Encoding, keying, un-keying and decoding happen here, at the site; the request carries only
keyed fp16 image latents and the reply only keyed fp16 mask latents (``--encrypted``: CKKS
ciphertexts of them, under a key only the site holds; the public bundle goes once). The
site's secret, its autoencoders and its images stay on its machine.

A site config (TOML; relative paths are relative to the file)::

    scenario = "../simulations/scenarios/us-nerve.toml"   # or a run's metrics.json
    site-name = "hospital-1"
    key-file = "keys/hospital-1.key"
    autoencoders = "sites/hospital-1/autoencoders.pt"
    service = "https://127.0.0.1:8443"
    ca-cert = "service-tls/ca.pem"
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from fedseg.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    context_slices,
    load_config,
    read_toml,
)
from fedseg.data import image_channels
from fedseg.privacy.audit import ckks_secret_file
from fedseg.privacy.ckks import HospitalCkks, query_packing
from fedseg.privacy.keys import bind_key
from fedseg.serving import protocol
from fedseg.serving.images import mask_values_of, read_scan, write_mask
from fedseg.site import SiteModels, site_transform
from fedseg.training import decode_masks, encode
from fedseg.wire import pack, unpack

FIELDS = (
    "scenario",
    "site-name",
    "key-file",
    "autoencoders",
    "service",
    "ca-cert",
    "client-cert",  # the site's certificate for the service (fedseg serve: <tls>/clients/)
    "client-key",
    "ckks-key",  # optional: the site's CKKS secret (--encrypted; default beside key-file)
)
OPTIONAL = ("ckks-key",)


class ServiceError(RuntimeError):
    """The service refused a request or could not be reached."""


@dataclass
class SiteClientConfig:
    cfg: RunConfig
    site: str
    key_file: Path
    autoencoders: Path
    service: str
    ca_cert: Path
    client_cert: Path
    client_key: Path
    ckks_key: Path | None = None


def load_site_config(path: str | Path) -> SiteClientConfig:
    path = Path(path)
    values = read_toml(path, "site config")
    unknown = sorted(set(values) - set(FIELDS))
    missing = [f for f in FIELDS if f not in values and f not in OPTIONAL]
    if unknown or missing:
        raise ConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}")

    def local(name: str) -> Path:
        value = Path(str(values[name]))
        return value if value.is_absolute() else (path.parent / value).resolve()

    scenario = local("scenario")
    if scenario.suffix == ".json":  # a run's metrics.json carries the full config
        if not scenario.is_file():
            raise ConfigError(f"{path}: scenario {scenario} not found")
        cfg = config_from_dict(json.loads(scenario.read_text())["config"])
    else:  # the scenario's data need not be on this machine (data.channels: set it, or 0 =
        # what its images are where they are, else grey)
        cfg = load_config(scenario, check_files=False)
    service = str(values["service"]).rstrip("/")
    if not service.startswith("https://"):
        raise ConfigError(f"{path}: service must be an https:// URL, got {service!r}")
    return SiteClientConfig(
        cfg,
        str(values["site-name"]),
        local("key-file"),
        local("autoencoders"),
        service,
        local("ca-cert"),
        local("client-cert"),
        local("client-key"),
        local("ckks-key") if "ckks-key" in values else None,
    )


@dataclass
class Timing:
    """Seconds per phase and bytes of latents each way, summed over calls."""

    encode: float = 0.0
    network_and_map: float = 0.0
    server_map: float = 0.0
    decode: float = 0.0
    sent: int = 0
    received: int = 0
    images: int = 0
    key_bytes: int = 0  # the CKKS public bundle, if this session sent it
    calls: list[dict] = field(default_factory=list)


class SegmentationClient:
    def __init__(
        self, site_cfg: SiteClientConfig, timeout_s: float = 120.0, encrypted: bool = False
    ) -> None:
        self.site_cfg = site_cfg
        self.encrypted = encrypted
        cfg = site_cfg.cfg
        if cfg.privacy.transform != "none" and not site_cfg.key_file.is_file():
            raise ConfigError(
                f"key-file {site_cfg.key_file} not found: the site's secret is needed"
            )
        if site_cfg.key_file:  # the key these models were trained with, or a clear error
            bind_key(Path(site_cfg.autoencoders).parent, site_cfg.key_file, record=False)
        self.models, self.class_names = SiteModels.load(cfg, site_cfg.autoencoders)
        self.transform = site_transform(cfg, site_cfg.key_file)
        self.shapes = _latent_shapes(cfg)  # (C, h, w) tuples, a fresh list
        context = ssl.create_default_context(cafile=str(site_cfg.ca_cert))
        try:
            context.load_cert_chain(str(site_cfg.client_cert), str(site_cfg.client_key))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"client certificate {site_cfg.client_cert} / key {site_cfg.client_key}: {err}"
            ) from err
        self.http = httpx.Client(base_url=site_cfg.service, verify=context, timeout=timeout_s)
        info = self._check(self.http.get("/v1/info")).json()
        if info["latent_shapes"] != protocol.shapes_text(self.shapes):
            raise ServiceError(
                f"{site_cfg.service} serves latents {info['latent_shapes']}, this site's model "
                f"makes {protocol.shapes_text(self.shapes)}: different model config"
            )
        if site_cfg.site not in info["sites"]:
            raise ServiceError(
                f"{site_cfg.service} does not serve site {site_cfg.site!r}: {info['sites']}"
            )
        self.max_items = int(info["max_items"])
        self.timing = Timing()
        self.ckks: HospitalCkks | None = None
        if encrypted:
            self._start_encrypted(info)

    def _start_encrypted(self, info: dict) -> None:
        """Load (or make) the site's CKKS keys and register the public bundle once: the
        service lists the key ids it holds, so a site whose key is there sends nothing."""
        if not info.get("encrypted"):
            raise ServiceError(
                f"{self.site_cfg.service} cannot map encrypted queries (its UMN is not "
                "model.umn_arch = 'he')"
            )
        path = self.site_cfg.ckks_key or ckks_secret_file(
            self.site_cfg.key_file, self.site_cfg.site
        )
        self.ckks = HospitalCkks.load_or_create(path)
        self.packing = query_packing(self.shapes, self.ckks.params)
        if info.get("ckks_key_ids", {}).get(self.site_cfg.site) != self.ckks.key_id:
            body = protocol.arrays_body(self.ckks.public_bundle(self.packing))
            response = self.http.post(
                f"/v1/ckks-keys/{self.site_cfg.site}",
                content=body,
                headers={"content-type": protocol.CKKS_MEDIA_TYPE},
            )
            if self._check(response).json().get("key_id") != self.ckks.key_id:
                raise ServiceError("the service registered another CKKS key than this site's")
            self.timing.key_bytes = len(body)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceError(f"service answered {response.status_code}: {detail}")
        return response

    @torch.no_grad()
    def segment(self, images: np.ndarray) -> np.ndarray:
        """(N, C, S, S) normalised images -> (N, S, S) class indices, via the service."""
        preds = [
            self._segment_batch(images[i : i + self.max_items])
            for i in range(0, len(images), self.max_items)
        ]
        return np.concatenate(preds)

    def _segment_batch(self, images: np.ndarray) -> np.ndarray:
        t = self.timing
        started = time.perf_counter()
        keyed = self.transform.forward(
            encode(self.models.image_ae, torch.from_numpy(images)), "image"
        )
        if self.ckks is not None:  # CKKS: the service sees ciphertexts only
            items = len(images)
            body = protocol.arrays_body(self.ckks.encrypt(pack(keyed, "image"), self.packing))
            path = f"/v1/map-encrypted/{self.site_cfg.site}"
            headers = {"content-type": protocol.CKKS_MEDIA_TYPE}
        else:
            body, items = protocol.to_body(pack(keyed, "image"), "image", self.shapes)
            path, headers = f"/v1/map/{self.site_cfg.site}", protocol.headers(self.shapes, items)
        encoded = time.perf_counter()
        try:
            response = self.http.post(path, content=body, headers=headers)
        except httpx.HTTPError as err:
            raise ServiceError(f"cannot reach {self.site_cfg.service}: {err}") from err
        self._check(response)
        answered = time.perf_counter()
        if self.ckks is not None:
            arrays = self.ckks.decrypt(protocol.body_arrays(response.content), self.packing)
        else:
            arrays = protocol.from_body(response.content, items, "mask", self.shapes)
        mapped = unpack(arrays, "mask", self.shapes)
        pred = decode_masks(
            self.models.mask_ae,
            self.transform.inverse(mapped, "mask"),
            self.models.image_ae,
            images,
        )
        done = time.perf_counter()
        server_map = float(response.headers.get("x-fedseg-map-ms", 0)) / 1000
        t.encode += encoded - started
        t.network_and_map += answered - encoded
        t.server_map += server_map
        t.decode += done - answered
        t.sent += len(body)
        t.received += len(response.content)
        t.images += items
        t.calls.append(
            {
                "items": items,
                "encode": encoded - started,
                "network_and_map": answered - encoded,
                "server_map": server_map,
                "decode": done - answered,
            }
        )
        return pred


def _latent_shapes(cfg: RunConfig) -> list[tuple[int, int, int]]:
    from fedseg.models.autoencoder import latent_shapes

    return latent_shapes(cfg.model.image_size, cfg.model.latent_channels)


def segment_file(
    site_config: str | Path, input_path: str | Path, output: str | Path, encrypted: bool = False
) -> tuple[Path, Timing]:
    """Read the scan, segment it through the service, write the mask; returns path and timing.
    ``encrypted``: the latents travel as CKKS ciphertexts (``privacy/ckks.py``)."""
    site_cfg = load_site_config(site_config)
    cfg = site_cfg.cfg
    scan = read_scan(
        input_path, cfg.model.image_size, cfg.data.axis, image_channels(cfg), context_slices(cfg)
    )
    with SegmentationClient(site_cfg, encrypted=encrypted) as client:
        pred = client.segment(scan.images)
    return write_mask(scan, pred, output, mask_values_of(cfg.data)), client.timing
