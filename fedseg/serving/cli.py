"""The ``serve`` and ``segment`` commands (registered on the main typer app)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import typer
from rich.console import Console

from fedseg.clierror import fail
from fedseg.config import ConfigError
from fedseg.data.dataset import DataError

if TYPE_CHECKING:
    from fedseg.serving.client import SiteClientConfig

console = Console()


def serve(
    run: Path = typer.Option(..., "--run", help="results folder of a finished run"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8443, help="HTTPS port"),
    tls_dir: Path | None = typer.Option(
        None, help="CA and certificate (default <run>/service-tls)"
    ),
    max_items: int = typer.Option(64, help="most images per request"),
    hostname: list[str] = typer.Option(
        [], help="a host name or address clients use (repeat; needed with --host 0.0.0.0)"
    ),
) -> None:
    """Host a trained UMN over HTTPS for on-demand segmentation. Clients authenticate with
    their site's certificate (written to <tls-dir>/clients/ on first start)."""
    from fedseg.serving.server import serve as run_server

    try:  # an empty, torn or foreign umn.pt is a CheckpointError (a ConfigError) naming it
        run_server(run, host, port, tls_dir, max_items, hostname)
    except (ConfigError, ValueError, OSError, ssl.SSLError) as err:  # e.g. a missing key
        raise fail(_reason(err)) from None


def _reason(err: BaseException) -> str:
    """An OS or TLS error with the file it concerns (``str`` of some omits it)."""
    name = getattr(err, "filename", None)
    text = getattr(err, "strerror", None) or getattr(err, "reason", None) or str(err)
    return f"{name}: {text}" if name and str(name) not in str(text) else str(text)


def check_tls_files(site_cfg: SiteClientConfig) -> None:
    """The site config's CA, certificate and key, loaded as the client will load them, so a
    missing or garbage file is an error naming it rather than a TLS traceback."""
    try:
        context = ssl.create_default_context(cafile=str(site_cfg.ca_cert))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"ca-cert {site_cfg.ca_cert}: not a readable PEM CA certificate "
            f"({getattr(err, 'strerror', None) or getattr(err, 'reason', None) or err})"
        ) from None
    try:
        context.load_cert_chain(str(site_cfg.client_cert), str(site_cfg.client_key))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"client-cert {site_cfg.client_cert} / client-key {site_cfg.client_key}: not a "
            f"readable certificate and key ({getattr(err, 'strerror', None) or err})"
        ) from None


def _unreachable(service: str, err: httpx.HTTPError) -> str:
    """What went wrong talking to ``service``, in one line."""
    reason = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, httpx.ConnectError):
        return f"cannot reach the segmentation service at {service}: {reason} (is it running?)"
    if isinstance(err, httpx.TimeoutException):
        return f"the segmentation service at {service} did not answer in time: {reason}"
    return f"segmentation service {service}: {reason}"


def segment(
    input_path: Path = typer.Argument(
        ..., metavar="INPUT", help="PNG/JPEG/TIFF image or NIfTI volume"
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="mask file (.png/.tif, or .nii/.nii.gz)"
    ),
    site_config: Path = typer.Option(
        ..., "--site-config", help="the site's TOML (see fedseg.serving.client)"
    ),
    encrypted: bool = typer.Option(
        False,
        "--encrypted",
        help="send CKKS ciphertexts of the latents (needs a run with model.umn_arch = 'he')",
    ),
) -> None:
    """Segment one scan: encode and key here, map at the service, un-key and decode here."""
    from fedseg.serving.client import ServiceError, load_site_config, segment_file

    service = "the segmentation service"
    try:
        site_cfg = load_site_config(site_config)
        service = site_cfg.service
        check_tls_files(site_cfg)
        path, timing = segment_file(site_config, input_path, output, encrypted)
    except httpx.HTTPError as err:  # the service down, a wrong address, a TLS refusal
        raise fail(_unreachable(service, err)) from None
    except (ConfigError, DataError, ServiceError, ValueError, OSError, ssl.SSLError) as err:
        raise fail(_reason(err)) from None
    n = max(timing.images, 1)
    ms = {k: 1000 * getattr(timing, k) / n for k in ("encode", "network_and_map", "decode")}
    console.print(
        f"wrote {path} ({timing.images} image(s); per image: encode {ms['encode']:.1f} ms, "
        f"network+map {ms['network_and_map']:.1f} ms, decode {ms['decode']:.1f} ms; "
        f"{timing.sent} bytes sent, {timing.received} received)"
    )
