"""The ``serve`` and ``segment`` commands (registered on the main typer app)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedseg.config import ConfigError
from fedseg.data.dataset import DataError

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

    try:
        run_server(run, host, port, tls_dir, max_items, hostname)
    except (
        ConfigError,
        ValueError,
        FileNotFoundError,
    ) as err:  # e.g. a missing key (server custody)
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err


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
) -> None:
    """Segment one scan: encode and key here, map at the service, un-key and decode here."""
    from fedseg.serving.client import ServiceError, segment_file

    try:
        path, timing = segment_file(site_config, input_path, output)
    except (ConfigError, DataError, ServiceError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    n = max(timing.images, 1)
    ms = {k: 1000 * getattr(timing, k) / n for k in ("encode", "network_and_map", "decode")}
    console.print(
        f"wrote {path} ({timing.images} image(s); per image: encode {ms['encode']:.1f} ms, "
        f"network+map {ms['network_and_map']:.1f} ms, decode {ms['decode']:.1f} ms; "
        f"{timing.sent} bytes sent, {timing.received} received)"
    )
