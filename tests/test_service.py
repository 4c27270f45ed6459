"""The segmentation service over real HTTPS on loopback (uvicorn), and ``fedseg segment``.

A tiny run is built in-process (one synthetic site, tiny networks, one short UMN round), so
the test checks plumbing, geometry, the wire contract and refusals, not accuracy.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import tomli_w
import torch
import uvicorn
from PIL import Image

from fedseg.checkpoint import checkpoint_dir
from fedseg.coordinator import Coordinator
from fedseg.data import site_for_partition
from fedseg.deploy.certs import issue_server_cert
from fedseg.privacy.keys import KeyRing, read_key_file
from fedseg.privacy.leakcheck import find_key_material
from fedseg.serving import protocol
from fedseg.serving.client import (
    SegmentationClient,
    ServiceError,
    load_site_config,
    segment_file,
)
from fedseg.serving.images import read_scan, resize_nearest
from fedseg.serving.server import (
    IDLE_TIMEOUT_S,
    create_app,
    load_service,
    prepare_tls,
    uvicorn_config,
)
from fedseg.site import (
    query_chunk,
    segment_mapped,
    site_models_path,
    site_transform,
    train_site,
    training_chunk,
)
from tests.helpers import small_config

SITE = "hospital-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's folder as the federation leaves it: site AEs, key, UMN checkpoint."""
    root = tmp_path_factory.mktemp("service")
    cfg = small_config(root / "run", 1, [8, 8, 16, 16, 16], 16, ae_epochs=2, umn_epochs_per_round=3)
    cfg.validate()
    split = site_for_partition(cfg, 0)
    assert split.name == SITE
    models, _ = train_site(cfg, split.train)
    models.save(site_models_path(cfg.out_dir, SITE), split.train.class_names)
    transform = site_transform(cfg, root / "run" / "keys" / f"{SITE}.key", create=True)
    coordinator = Coordinator(cfg, [SITE])
    n = len(split.train) * 2
    coordinator.add_chunk(SITE, training_chunk(cfg, split.train, models, transform, 0, n))
    coordinator.train_round()
    coordinator.save_checkpoint(checkpoint_dir(cfg))
    values = cfg.to_dict()
    del values["out_dir"], values["resume"]
    (root / "scenario.toml").write_text(tomli_w.dumps(values))
    return root / "run"


@pytest.fixture(scope="module")
def server(run_dir):
    """The app on a real uvicorn HTTPS server (mutual TLS, as ``fedseg serve`` runs it) in a
    thread; records every request body."""
    tls_dir = run_dir / "service-tls"
    prepare_tls(tls_dir, ["127.0.0.1"], [SITE, "hospital-2"])
    bodies: list[bytes] = []
    app = create_app(load_service(run_dir), max_items=8)

    async def recording(scope, receive, send):
        async def receive_and_record():
            message = await receive()
            if message["type"] == "http.request":
                bodies.append(message.get("body", b""))
            return message

        await app(scope, receive_and_record, send)

    port = free_port()
    uv = uvicorn.Server(uvicorn_config(recording, "127.0.0.1", port, tls_dir))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield {
            "url": f"https://127.0.0.1:{port}",
            "ca": tls_dir / "ca.pem",
            "clients": tls_dir / "clients",
            "bodies": bodies,
            "port": port,
        }
    finally:
        uv.should_exit = True
        uv.force_exit = True  # no wait for idle keep-alive connections (the tests' clients)
        thread.join(timeout=10)


def client_context(server, site: str = SITE) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server["ca"]))
    context.load_cert_chain(server["clients"] / f"{site}.pem", server["clients"] / f"{site}.key")
    return context


@pytest.fixture(scope="module")
def site_config(run_dir, server) -> Path:
    path = run_dir.parent / "site.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "scenario": "scenario.toml",
                "site-name": SITE,
                "key-file": f"run/keys/{SITE}.key",
                "autoencoders": f"run/sites/{SITE}/autoencoders.pt",
                "service": server["url"],
                "ca-cert": str(server["ca"]),
                "client-cert": str(server["clients"] / f"{SITE}.pem"),
                "client-key": str(server["clients"] / f"{SITE}.key"),
            }
        )
    )
    return path


def local_prediction(site_config: Path, images: np.ndarray) -> np.ndarray:
    """The same query computed in-process, without HTTP: what the service must reproduce."""
    site_cfg = load_site_config(site_config)
    cfg = site_cfg.cfg
    from fedseg.data.dataset import SiteData
    from fedseg.site import SiteModels

    models, _ = SiteModels.load(cfg, site_cfg.autoencoders)
    transform = site_transform(cfg, site_cfg.key_file)
    n = len(images)
    data = SiteData(
        SITE,
        images.astype(np.float32),
        np.zeros((n, *images.shape[2:]), np.int64),
        np.ones((n, 2)),
        np.zeros(n, dtype=str),
        [str(i) for i in range(n)],
        ["background", "a", "b"],
    )
    query = query_chunk(data, models, transform, 0, n)
    service = load_service(site_cfg.autoencoders.parents[2])
    return segment_mapped(cfg, models, transform, service.coordinator.map_query(SITE, query))


def test_png_keeps_its_size_and_matches_the_local_path(site_config, server, tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90)) * 255).astype(np.uint8)  # not square, not 64 px
    Image.fromarray(image).save(tmp_path / "scan.png")
    server["bodies"].clear()
    out, timing = segment_file(site_config, tmp_path / "scan.png", tmp_path / "mask.png")
    mask = np.asarray(Image.open(out))
    assert mask.shape == (70, 90)
    assert set(np.unique(mask)) <= {0, 1, 2}

    scan = read_scan(tmp_path / "scan.png", 64, 2)
    expected = resize_nearest(local_prediction(site_config, scan.images)[0], (70, 90))
    np.testing.assert_array_equal(mask, expected)
    shapes = load_site_config(site_config).cfg.model
    per_item = protocol.item_bytes([(16, 8, 8), (16, 4, 4), (16, 2, 2)])
    assert shapes.image_size == 64 and timing.sent == timing.received == per_item
    assert timing.images == 1 and timing.encode > 0 and timing.decode > 0


def test_only_keyed_latents_cross_the_wire(site_config, server, tmp_path):
    site_cfg = load_site_config(site_config)
    images = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)
    server["bodies"].clear()
    with SegmentationClient(site_cfg) as client:
        client.segment(images)
    posted = [b for b in server["bodies"] if b]
    assert len(posted) == 1
    shapes = [(16, 8, 8), (16, 4, 4), (16, 2, 2)]
    sent = protocol.from_body(posted[0], 3, "image", shapes)
    # What was sent is exactly the keyed latents (nothing else in the body) ...
    from fedseg.site import SiteModels
    from fedseg.training import encode

    models, _ = SiteModels.load(site_cfg.cfg, site_cfg.autoencoders)
    plain = encode(models.image_ae, torch.from_numpy(images))
    keyed = site_transform(site_cfg.cfg, site_cfg.key_file).forward(plain, "image")
    for s in range(3):
        np.testing.assert_array_equal(sent[f"image{s}"], keyed[s].numpy().astype(np.float16))
        assert not np.allclose(sent[f"image{s}"], plain[s].numpy(), atol=1e-2)
    # ... and carries no key material.
    secret = read_key_file(site_cfg.key_file)
    ring = KeyRing.from_secret(secret, 16)
    assert find_key_material(sent, [], secret, ring) == []


def test_nifti_keeps_affine_header_and_shape(site_config, server, tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.random((40, 50, 11)).astype(np.float32) * 1000  # 11 slices > max_items 8
    affine = np.array([[0.8, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(volume, affine)
    image.header["descrip"] = b"fedseg test scan"
    nib.save(image, tmp_path / "scan.nii.gz")
    out, timing = segment_file(site_config, tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz")
    mask = nib.load(out)
    assert mask.shape == (40, 50, 11)
    np.testing.assert_allclose(mask.affine, affine)
    assert mask.header.get_zooms() == pytest.approx((0.8, 0.7, 2.5))
    assert mask.header["descrip"].tobytes().startswith(b"fedseg test scan")
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
    assert timing.images == 11 and len(timing.calls) == 2  # chunked by the service's limit


def post(server, site: str, body: bytes, as_site: str = SITE, **headers) -> httpx.Response:
    shapes = [(16, 8, 8), (16, 4, 4), (16, 2, 2)]
    sent = protocol.headers(shapes, int(headers.pop("items", 1)))
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    context = client_context(server, as_site)
    return httpx.post(f"{server['url']}/v1/map/{site}", content=body, headers=sent, verify=context)


def test_bad_requests_are_refused_with_a_clear_error(server):
    one = protocol.item_bytes([(16, 8, 8), (16, 4, 4), (16, 2, 2)])
    good = np.zeros(one // 2, np.float16).tobytes()
    assert post(server, SITE, good).status_code == 200

    r = post(server, "hospital-9", good)  # a certificate speaks for its own site only
    assert r.status_code == 403 and "cannot query as 'hospital-9'" in r.json()["detail"]
    r = post(server, SITE, good, x_fedseg_dtype="float32")
    assert r.status_code == 415 and "float16" in r.json()["detail"]
    r = post(server, SITE, good, x_fedseg_shapes="16x16x16,16x8x8,16x4x4")
    assert r.status_code == 422 and "16x8x8,16x4x4,16x2x2" in r.json()["detail"]
    r = post(server, SITE, good[:-2])
    assert r.status_code == 422 and f"need {one}" in r.json()["detail"]
    r = post(server, SITE, good * 9, items=9)
    assert r.status_code == 413 and "limit is 8" in r.json()["detail"]
    r = post(server, SITE, good * 20, items=2)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    nan = np.full(one // 2, np.nan, np.float16).tobytes()
    r = post(server, SITE, nan)
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
    r = post(server, SITE, good, x_fedseg_items="two")
    assert r.status_code == 422 and "integer" in r.json()["detail"]


def test_only_a_hospital_with_its_certificate_is_served_and_only_as_itself(server):
    one = protocol.item_bytes([(16, 8, 8), (16, 4, 4), (16, 2, 2)])
    good = np.zeros(one // 2, np.float16).tobytes()
    anonymous = ssl.create_default_context(cafile=str(server["ca"]))  # verifies, no cert
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server['url']}/v1/info", verify=anonymous, timeout=5)
    r = post(server, SITE, good, as_site="hospital-2")  # another hospital's certificate
    assert r.status_code == 403 and "'hospital-2''s" in r.json()["detail"]
    info = httpx.get(f"{server['url']}/v1/info", verify=client_context(server), timeout=5)
    assert info.status_code == 200 and info.json()["sites"] == [SITE]
    schema = httpx.get(f"{server['url']}/openapi.json", verify=client_context(server), timeout=5)
    assert schema.status_code == 404


@pytest.mark.slow
def test_an_idle_connection_is_closed(server):
    """A client that connects and sends nothing is dropped after the idle timeout."""
    raw = socket.create_connection(("127.0.0.1", server["port"]), timeout=IDLE_TIMEOUT_S + 10)
    with client_context(server).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        started = time.monotonic()
        assert tls.recv(1) == b""  # closed by the server, not by our timeout
        waited = time.monotonic() - started
    assert IDLE_TIMEOUT_S - 1 < waited < IDLE_TIMEOUT_S + 5, waited


def test_tls_is_required_and_verified(server, tmp_path):
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
        httpx.get(f"http://127.0.0.1:{server['port']}/v1/info", timeout=5)
    other = issue_server_cert(tmp_path / "other-ca", tmp_path / "other-ca", "x", ["127.0.0.1"])
    context = ssl.create_default_context(cafile=str(other.ca))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server['url']}/v1/info", verify=context, timeout=5)


def test_client_refuses_a_service_of_another_site(site_config):
    site_cfg = load_site_config(site_config)
    site_cfg.site = "hospital-7"
    with pytest.raises(ServiceError, match="does not serve site 'hospital-7'"):
        SegmentationClient(site_cfg)


@pytest.mark.slow
def test_serve_and_segment_commands(run_dir, site_config, tmp_path):
    """The CLI end to end: ``fedseg serve`` in a subprocess, ``fedseg segment`` against it."""
    port, tls_dir = free_port(), tmp_path / "tls"
    command = [sys.executable, "-m", "fedseg.cli"]
    serve = subprocess.Popen(
        [*command, "serve", "--run", str(run_dir), "--port", str(port), "--tls-dir", str(tls_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        config = site_config.parent / "site-cli.toml"
        values = tomllib.loads(site_config.read_text())
        values.update(
            {
                "service": f"https://127.0.0.1:{port}",
                "ca-cert": str(tls_dir / "ca.pem"),
                "client-cert": str(tls_dir / "clients" / f"{SITE}.pem"),
                "client-key": str(tls_dir / "clients" / f"{SITE}.key"),
            }
        )
        config.write_text(tomli_w.dumps(values))
        Image.fromarray(np.full((33, 47), 128, np.uint8)).save(tmp_path / "in.png")
        segment = [*command, "segment", "--site-config", str(config), str(tmp_path / "in.png")]
        deadline = time.monotonic() + 90
        while True:  # until the service is up
            result = subprocess.run(
                [*segment, "-o", str(tmp_path / "out.png")],
                capture_output=True,
                text=True,
                env={**os.environ, "COLUMNS": "300"},
            )
            if result.returncode == 0 or time.monotonic() > deadline or serve.poll() is not None:
                break
            time.sleep(1)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "network+map" in result.stdout
        assert np.asarray(Image.open(tmp_path / "out.png")).shape == (33, 47)

        result = subprocess.run(
            [*segment, "-o", str(tmp_path / "out.jpg")], capture_output=True, text=True
        )
        assert result.returncode == 2 and "lossless" in result.stderr  # errors: one line
    finally:
        serve.terminate()
        serve.wait(timeout=20)
