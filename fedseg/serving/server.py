"""``fedseg serve``: the trained UMN behind HTTPS, answering one site's keyed query at a time.

The server sees what it saw during training and nothing more: keyed fp16 image latents in,
keyed fp16 mask latents out. Every request is checked (site, dtype, shapes, size, values)
before it reaches the network, and refused with an HTTP error that says what was expected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from fedseg.checkpoint import UMN_NAME
from fedseg.config import ConfigError, config_from_dict
from fedseg.coordinator import Coordinator, UnknownSiteError
from fedseg.serving import protocol
from fedseg.wire import WIRE_DTYPE, WireError

log = logging.getLogger("fedseg.serve")
DEFAULT_MAX_ITEMS = 64  # images per request; a NIfTI volume is sent in several requests


@dataclass
class MappingService:
    coordinator: Coordinator
    run_dir: Path

    @property
    def shapes(self) -> protocol.Shapes:
        return self.coordinator.shapes

    def info(self, max_items: int) -> dict:
        cfg = self.coordinator.cfg
        return {
            "run": cfg.name,
            "sites": self.coordinator.sites,
            "image_size": cfg.model.image_size,
            "latent_shapes": protocol.shapes_text(self.shapes),
            "dtype": "float16",
            "max_items": max_items,
            "transform": cfg.privacy.transform,
            "custody": cfg.privacy.custody,
        }


def load_service(run_dir: str | Path) -> MappingService:
    """The UMN of a finished run (its last checkpoint) and the config it was trained with."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / UMN_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no trained UMN in this run folder")
    state = torch.load(path, weights_only=True)
    try:
        cfg = config_from_dict(state["config"])
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"{path}: the saved config cannot be read: {err}") from err
    if int(state["round"]) < cfg.training.umn_rounds:
        log.warning(
            "%s: UMN stopped after round %d of %d", path, state["round"], cfg.training.umn_rounds
        )
    torch.set_num_threads(cfg.training.threads)
    key_dir = cfg.privacy.key_dir or run_dir / "keys"  # read only with server custody
    coordinator = Coordinator(cfg, list(state["sites"]), key_dir=key_dir)
    coordinator.restore_round(state)
    return MappingService(coordinator, run_dir)


def create_app(service: MappingService, max_items: int = DEFAULT_MAX_ITEMS) -> FastAPI:
    app = FastAPI(title="fedseg mapping service", docs_url=None, redoc_url=None)
    shapes = service.shapes
    limit = max_items * protocol.item_bytes(shapes)

    @app.get("/v1/info")
    def info() -> dict:
        return service.info(max_items)

    @app.post("/v1/map/{site}")
    async def map_latents(site: str, request: Request) -> Response:
        if site not in service.coordinator.sites:
            raise HTTPException(
                404, f"unknown site {site!r}; this service serves {service.coordinator.sites}"
            )
        dtype = request.headers.get(protocol.DTYPE_HEADER, "")
        if dtype != WIRE_DTYPE.__name__:
            raise HTTPException(
                415, f"{protocol.DTYPE_HEADER} is {dtype!r}; only float16 latents are accepted"
            )
        sent = request.headers.get(protocol.SHAPES_HEADER, "")
        if sent != protocol.shapes_text(shapes):
            raise HTTPException(
                422,
                f"latent shapes {sent!r} do not match the model's {protocol.shapes_text(shapes)!r}",
            )
        items = _items(request.headers.get(protocol.ITEMS_HEADER, ""), max_items)
        body = await _read_capped(request, limit)
        try:
            arrays = protocol.from_body(body, items, "image", shapes)
            started = time.perf_counter()
            mapped = await run_in_threadpool(service.coordinator.map_query, site, arrays)
            map_ms = 1000 * (time.perf_counter() - started)
        except UnknownSiteError as err:
            raise HTTPException(404, str(err)) from err
        except WireError as err:
            raise HTTPException(422, str(err)) from err
        out, _ = protocol.to_body(mapped, "mask", shapes)
        headers = protocol.headers(shapes, items)
        headers["x-fedseg-map-ms"] = f"{map_ms:.3f}"
        return Response(out, media_type=protocol.MEDIA_TYPE, headers=headers)

    return app


def _items(text: str, max_items: int) -> int:
    try:
        items = int(text)
    except ValueError:
        raise HTTPException(
            422, f"{protocol.ITEMS_HEADER} must be an integer, got {text!r}"
        ) from None
    if items < 1:
        raise HTTPException(422, f"{protocol.ITEMS_HEADER} must be >= 1, got {items}")
    if items > max_items:
        raise HTTPException(413, f"{items} items in one request; the limit is {max_items}")
    return items


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` bytes (before reading it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def serve(
    run_dir: str | Path,
    host: str,
    port: int,
    tls_dir: str | Path | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> None:
    """Blocking: HTTPS with a certificate from the run's own CA (created on first use)."""
    import uvicorn

    from fedseg.deploy.certs import issue_server_cert

    service = load_service(run_dir)
    tls_dir = Path(tls_dir or Path(run_dir) / "service-tls")
    cert_path, key_path = tls_dir / "service.pem", tls_dir / "service.key"
    if not (cert_path.is_file() and key_path.is_file()):
        issue_server_cert(tls_dir, tls_dir, "service", [host, "127.0.0.1", "localhost"])
    log.warning("clients verify the service with %s", tls_dir / "ca.pem")
    uvicorn.run(
        create_app(service, max_items),
        host=host,
        port=port,
        ssl_certfile=str(cert_path),
        ssl_keyfile=str(key_path),
        log_level="warning",
    )
