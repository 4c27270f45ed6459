"""``fedseg serve``: the trained UMN behind HTTPS, answering one site's keyed query at a time.

The server sees what it saw during training and nothing more: keyed fp16 image latents in,
keyed fp16 mask latents out. Every request is checked (site, dtype, shapes, size, values)
before it reaches the network, and refused with an HTTP error that says what was expected.

Mutual TLS: a client must present a certificate from the run's CA, issued to one site
(``fedseg serve`` writes one per site under ``<tls-dir>/clients/``), and may query only as
that site. A connection that sends no request within ``IDLE_TIMEOUT_S`` is closed, and a
request must be answered within ``REQUEST_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedseg.checkpoint import UMN_NAME, read_checkpoint
from fedseg.config import ConfigError, config_from_dict
from fedseg.coordinator import Coordinator, UnknownSiteError
from fedseg.models.umn_he import HEMappingNetwork
from fedseg.privacy import ckks
from fedseg.serving import protocol
from fedseg.wire import WIRE_DTYPE, WireError

log = logging.getLogger("fedseg.serve")
DEFAULT_MAX_ITEMS = 64  # images per request; a NIfTI volume is sent in several requests
IDLE_TIMEOUT_S = 10.0  # a connection with no request in flight is closed after this
REQUEST_TIMEOUT_S = 60.0  # reading, mapping and answering one request
CLIENT_SITE = "fedseg.client_site"  # the scope key under which the caller's site travels


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
            # CKKS queries (fedseg segment --encrypted): an HE-friendly UMN only
            "encrypted": cfg.model.umn_arch == "he",
            "ckks_key_ids": self.coordinator.ckks_key_ids(),
        }


def load_service(run_dir: str | Path) -> MappingService:
    """The UMN of a finished run (its last checkpoint) and the config it was trained with."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / UMN_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no trained UMN in this run folder")
    state = read_checkpoint(path)  # empty, torn or foreign: a CheckpointError naming the file
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


def create_app(
    service: MappingService, max_items: int = DEFAULT_MAX_ITEMS, authenticate: bool = True
) -> FastAPI:
    """The HTTP routes; with ``authenticate`` every request must come with the site its TLS
    client certificate names (put in the scope by :class:`ClientIdentity`)."""
    app = FastAPI(title="fedseg mapping service", openapi_url=None, docs_url=None, redoc_url=None)
    shapes = service.shapes
    limit = max_items * protocol.item_bytes(shapes)

    def caller(request: Request) -> str | None:
        site = request.scope.get(CLIENT_SITE)
        if authenticate and not site:
            raise HTTPException(401, "a client certificate issued by this service's CA is needed")
        return site

    @app.get("/v1/info")
    def info(request: Request) -> dict:
        site = caller(request)
        details = service.info(max_items)
        if site is not None:  # a hospital learns about its own site only
            details["sites"] = [s for s in details["sites"] if s == site]
        return details

    @app.post("/v1/map/{site}")
    async def map_latents(site: str, request: Request) -> Response:
        who = caller(request)
        if who is not None and who != site:
            raise HTTPException(403, f"this certificate is {who!r}'s; it cannot query as {site!r}")
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

    @app.post("/v1/ckks-keys/{site}")
    async def register_keys(site: str, request: Request) -> dict:
        """A hospital's CKKS public bundle, once (kept while the service runs)."""
        allowed(site, caller(request))
        body = await _read_capped(request, ckks.MAX_BUNDLE_BYTES + protocol.MAX_INDEX_BYTES)
        try:
            bundle = protocol.body_arrays(body)
            await run_in_threadpool(service.coordinator.register_ckks, site, bundle)
        except (WireError, ckks.CkksError) as err:
            raise HTTPException(422, str(err)) from err
        return {"site": site, "key_id": service.coordinator.ckks_key_ids()[site]}

    @app.post("/v1/map-encrypted/{site}")
    async def map_encrypted(site: str, request: Request) -> Response:
        """CKKS ciphertexts of keyed image latents in, of keyed mask latents out."""
        allowed(site, caller(request))
        if site not in service.coordinator.ckks_key_ids():
            raise HTTPException(409, f"site {site!r} registered no CKKS keys (POST them first)")
        keys_params = service.coordinator.ckks_params(site)
        per_image = ckks.query_packing(shapes, keys_params).cts(shapes[0][0])
        cap = max_items * per_image * ckks.max_ciphertext_bytes(keys_params)
        body = await _read_capped(request, cap + 2 * ckks.MAX_HEADER_BYTES)
        try:
            query = protocol.body_arrays(body)
            started = time.perf_counter()
            mapped = await run_in_threadpool(
                service.coordinator.map_encrypted, site, query, max_items
            )
            map_ms = 1000 * (time.perf_counter() - started)
        except (WireError, ckks.CkksError) as err:
            raise HTTPException(422, str(err)) from err
        headers = {"x-fedseg-map-ms": f"{map_ms:.3f}"}
        return Response(
            protocol.arrays_body(mapped), media_type=protocol.CKKS_MEDIA_TYPE, headers=headers
        )

    def allowed(site: str, who: str | None) -> None:
        if who is not None and who != site:
            raise HTTPException(403, f"this certificate is {who!r}'s; it cannot query as {site!r}")
        if site not in service.coordinator.sites:
            raise HTTPException(
                404, f"unknown site {site!r}; this service serves {service.coordinator.sites}"
            )
        if not isinstance(service.coordinator.umn, HEMappingNetwork):
            raise HTTPException(
                409, "this run's mapping network cannot be evaluated encrypted (umn_arch != 'he')"
            )

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


class ClientIdentity(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus: the site named by the client's certificate goes into
    every request's scope, and a connection that never sends a request is closed after the
    idle timeout (uvicorn starts that timer only after a first response)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        site = _common_name(ssl_object.getpeercert() if ssl_object is not None else None)
        app = self.app

        async def with_identity(scope, receive, send):
            scope = {**scope, CLIENT_SITE: site}
            try:
                await asyncio.wait_for(app(scope, receive, send), REQUEST_TIMEOUT_S)
            except TimeoutError:
                log.warning("request from %s took over %.0f s: closed", site, REQUEST_TIMEOUT_S)
                transport.close()

        self.app = with_identity
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )


def _common_name(cert: dict | None) -> str | None:
    for field in (cert or {}).get("subject", ()):
        for key, value in field:
            if key == "commonName":
                return str(value)
    return None


def uvicorn_config(app, host: str, port: int, tls_dir: Path):
    """The server's settings: mutual TLS against the CA in ``tls_dir``, the idle timeout."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=ClientIdentity,
        ssl_certfile=str(tls_dir / "service.pem"),
        ssl_keyfile=str(tls_dir / "service.key"),
        ssl_ca_certs=str(tls_dir / "ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        timeout_keep_alive=int(IDLE_TIMEOUT_S),
        log_level="warning",
    )


def prepare_tls(tls_dir: Path, hosts: list[str], sites: list[str]) -> None:
    """On first start: the CA, the service's certificate for ``hosts`` and one client
    certificate per site (for the operator to hand to each hospital)."""
    from fedseg.deploy.certs import issue_client_cert, issue_server_cert

    if not (tls_dir / "service.pem").is_file() or not (tls_dir / "service.key").is_file():
        issue_server_cert(tls_dir, tls_dir, "service", hosts)
    for site in sites:
        if not (tls_dir / "clients" / f"{site}.pem").is_file():
            issue_client_cert(tls_dir, tls_dir / "clients", site)


def serve(
    run_dir: str | Path,
    host: str,
    port: int,
    tls_dir: str | Path | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    hostnames: list[str] | None = None,
) -> None:
    """Blocking: HTTPS with mutual TLS, certificates from the run's own CA (made on first use;
    the service's certificate names ``hostnames``, or ``host`` and loopback)."""
    import uvicorn

    service = load_service(run_dir)
    tls_dir = Path(tls_dir or Path(run_dir) / "service-tls")
    if host in ("0.0.0.0", "::") and not hostnames:
        raise ValueError(
            f"--host {host} listens on every address: name the ones clients use (--hostname)"
        )
    prepare_tls(tls_dir, hostnames or [host, "127.0.0.1", "localhost"], service.coordinator.sites)
    log.warning(
        "clients verify the service with %s and present their site's certificate from %s",
        tls_dir / "ca.pem",
        tls_dir / "clients",
    )
    uvicorn.Server(uvicorn_config(create_app(service, max_items), host, port, tls_dir)).run()
