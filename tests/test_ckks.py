"""CKKS encrypted queries (fedseg/privacy/ckks.py): the encrypted mapping equals the plaintext
one, no secret key leaves the hospital, bad parameters and bad ciphertexts are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from fedseg.config import RunConfig  # noqa: E402
from fedseg.coordinator import Coordinator  # noqa: E402
from fedseg.models.autoencoder import latent_shapes  # noqa: E402
from fedseg.models.umn import build_umn  # noqa: E402
from fedseg.models.umn_he import HEMappingNetwork, folded_forward  # noqa: E402
from fedseg.privacy import ckks  # noqa: E402
from fedseg.privacy.audit import KeyLeakError, ckks_secret_file, guard_and_audit  # noqa: E402
from fedseg.privacy.keys import load_or_create_key, simulated_secret  # noqa: E402

SITES = ["site-a", "site-b"]


def he_config(size: int = 64, channels: int = 16, width: int = 32) -> RunConfig:
    cfg = RunConfig(name="ckks")
    cfg.model.umn_arch = "he"
    cfg.model.image_size = size
    cfg.model.latent_channels = channels
    cfg.model.umn_width = width
    cfg.model.ae_widths = [8, 16, 16, 32, 32]
    cfg.data.synthetic_train, cfg.data.synthetic_test = 8, 4
    cfg.federation.num_sites = 2
    return cfg.validate()


def trained_like(cfg: RunConfig) -> HEMappingNetwork:
    """A HE network with weights away from the identity start (alpha, beta, bases too)."""
    torch.manual_seed(1)
    umn = build_umn(cfg.model, SITES)
    assert isinstance(umn, HEMappingNetwork)
    with torch.no_grad():
        for p in umn.parameters():
            p.add_(0.2 * torch.randn_like(p))
        umn.in_basis.add_(0.1 * torch.randn_like(umn.in_basis))
        umn.out_offset.add_(torch.randn_like(umn.out_offset))
    return umn.eval()


def random_query(cfg: RunConfig, items: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    return {
        f"image{s}": (rng.normal(size=(items, *shape)) * 2 + 0.5).astype(np.float16)
        for s, shape in enumerate(shapes)
    }


def packing(cfg: RunConfig, params: ckks.CkksParams) -> ckks.Packing:
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    return ckks.Packing(tuple(tuple(s) for s in shapes), params.slots)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hospital() -> ckks.HospitalCkks:
    return ckks.HospitalCkks.create()


def encrypted_map(
    hospital: ckks.HospitalCkks, umn: HEMappingNetwork, site: str, cfg: RunConfig, query
) -> dict[str, np.ndarray]:
    pack = packing(cfg, hospital.params)
    server = ckks.ServerCkks.from_bundle(hospital.public_bundle(pack), umn.depth)
    mapper = ckks.EncryptedMapper(server, umn.folded(site), pack)
    return hospital.decrypt(mapper.map(hospital.encrypt(query, pack)), pack)


# --- the network ----------------------------------------------------------------------------


def test_folded_network_is_the_forward():
    cfg = he_config()
    umn = trained_like(cfg)
    query = random_query(cfg)
    latents = [torch.from_numpy(query[f"image{s}"].astype(np.float32)) for s in range(3)]
    with torch.no_grad():
        plain = umn(latents, umn.site_index("site-b"))
    folded = folded_forward(umn.folded("site-b"), [z.numpy() for z in latents])
    for p, f in zip(plain, folded, strict=True):
        assert relative_error(p.numpy(), f) < 1e-5
    assert umn.depth == 3


def test_he_network_trains_through_split_training():
    cfg = he_config()
    coordinator = Coordinator(cfg, SITES)
    assert isinstance(coordinator.umn, HEMappingNetwork)
    before = [p.detach().clone() for p in coordinator.umn.parameters()]
    mapped = coordinator.finetune_forward("site-a", random_query(cfg, items=4))
    grads = {k.replace("mask", "grad"): np.ones(v.shape, np.float32) for k, v in mapped.items()}
    answers, refused = coordinator.finetune_backward({"site-a": grads}, 0, 1)
    assert not refused and set(answers["site-a"]) == {"grad0", "grad1", "grad2"}
    after = list(coordinator.umn.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --- encrypted = plaintext ------------------------------------------------------------------


@pytest.mark.parametrize("size,channels", [(64, 16), (128, 32)])
def test_encrypted_forward_equals_plaintext(hospital, size, channels):
    cfg = he_config(size, channels, width=32 if size == 64 else 64)
    umn = trained_like(cfg)
    query = random_query(cfg)
    decrypted = encrypted_map(hospital, umn, "site-a", cfg, query)
    latents = [query[f"image{s}"].astype(np.float32) for s in range(3)]
    expected = folded_forward(umn.folded("site-a"), latents)
    for s in range(3):
        assert decrypted[f"mask{s}"].dtype == np.float16
        assert relative_error(decrypted[f"mask{s}"], expected[s]) < 1e-3


def test_encrypted_equals_plaintext_path_on_real_latents(hospital, tmp_path):
    """A synthetic hospital's keyed test latents (its encoder and KLT key): the encrypted
    reply decodes to what the server's plaintext map_query returns, within 1e-3."""
    from fedseg.data import site_for_partition
    from fedseg.privacy.transforms import keyed_transform
    from fedseg.site import SiteModels, query_chunk

    cfg = he_config()
    split = site_for_partition(cfg, 0)
    models = SiteModels.build(cfg, split.test.num_classes)
    transform = keyed_transform(cfg, simulated_secret(0, "federation"))
    query = query_chunk(split.test, models, transform, 0, len(split.test))
    coordinator = Coordinator(cfg, [split.name, "other"])
    coordinator.finetune_forward(split.name, query)  # canonical input bases from real latents
    coordinator.umn.eval()
    plain = coordinator.map_query(split.name, query)
    umn = coordinator.umn
    assert isinstance(umn, HEMappingNetwork)
    decrypted = encrypted_map(hospital, umn, split.name, cfg, query)
    for s in range(3):
        assert relative_error(decrypted[f"mask{s}"], plain[f"mask{s}"]) < 1e-3


def test_two_hidden_layers_need_depth_five(hospital):
    """A deeper network (depth 5) runs on the ring the table allows for it (2^14)."""
    cfg = he_config()
    umn = HEMappingNetwork(SITES, 16, 16, hidden_layers=2).eval()
    with pytest.raises(ckks.CkksError, match="depth 3; the network needs 5"):
        ckks.EncryptedMapper(
            ckks.ServerCkks.from_bundle(
                hospital.public_bundle(packing(cfg, hospital.params)), umn.depth
            ),
            umn.folded("site-a"),
            packing(cfg, hospital.params),
        )
    deep = ckks.HospitalCkks.create(depth=5)
    assert deep.params.poly_modulus_degree == 16384
    query = random_query(cfg, items=1)
    decrypted = encrypted_map(deep, umn, "site-a", cfg, query)
    expected = folded_forward(umn.folded("site-a"), [query[f"image{s}"] for s in range(3)])
    for s in range(3):
        assert relative_error(decrypted[f"mask{s}"], expected[s]) < 1e-3


# --- parameters -----------------------------------------------------------------------------


def test_parameters_against_the_128_bit_table():
    default = ckks.CkksParams().check(3)
    assert default.total_bits == 205 <= ckks.HE_STANDARD_128[8192]
    assert ckks.params_for_depth(3) == default
    assert ckks.params_for_depth(5).poly_modulus_degree == 16384
    with pytest.raises(ckks.CkksError, match="not 128-bit secure.*240 bits.*218"):
        ckks.CkksParams(8192, (60, 40, 40, 40, 60), 40).check()
    with pytest.raises(ckks.CkksError, match="not 128-bit secure"):
        ckks.CkksParams(4096, (40, 30, 30, 40), 30).check()
    with pytest.raises(ckks.CkksError, match="depth 3; the network needs 5"):
        default.check(5)
    with pytest.raises(ckks.CkksError, match="poly_modulus_degree 6000"):
        ckks.CkksParams(6000).check()
    with pytest.raises(ckks.CkksError, match="middle primes"):
        ckks.CkksParams(8192, (50, 30, 35, 35, 50), 35).check()


def test_server_refuses_an_unsafe_bundle(hospital):
    cfg = he_config()
    bundle = hospital.public_bundle(packing(cfg, hospital.params))
    header = json.loads(bundle[ckks.HEADER].tobytes())
    header["params"]["coeff_mod_bit_sizes"] = [60, 40, 40, 40, 60]
    forged = {**bundle, ckks.HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}
    with pytest.raises(ckks.CkksError, match="not 128-bit secure"):
        ckks.ServerCkks.from_bundle(forged, 3)
    header["params"]["coeff_mod_bit_sizes"] = [50, 35, 35, 50]  # safe, but a lie
    forged = {**bundle, ckks.HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}
    with pytest.raises(ckks.CkksError, match="depth 2; the network needs 3"):
        ckks.ServerCkks.from_bundle(forged, 3)
    with pytest.raises(ckks.CkksError, match="does not match its declared parameters"):
        ckks.ServerCkks.from_bundle(forged, 2)


# --- no secret key in any message -----------------------------------------------------------


def test_no_secret_key_leaves_the_hospital(hospital, tmp_path):
    import tenseal as ts

    cfg = he_config()
    pack = packing(cfg, hospital.params)
    bundle = hospital.public_bundle(pack)
    context = ts.context_from(bundle[ckks.CONTEXT].tobytes())
    assert not context.has_secret_key() and context.is_public()
    query = hospital.encrypt(random_query(cfg), pack)
    umn = trained_like(cfg)
    server = ckks.ServerCkks.from_bundle(bundle, umn.depth)
    reply = ckks.EncryptedMapper(server, umn.folded("site-a"), pack).map(query)

    # The outgoing guard, with this hospital's KLT key and CKKS key on disk, passes them all.
    cfg.privacy.transform = "klt"
    key_file = tmp_path / "federation.key"
    load_or_create_key(key_file, simulated_secret(0, "federation"))
    secret_file = ckks_secret_file(key_file, "site-a")
    hospital.save(secret_file)
    assert secret_file.stat().st_mode & 0o777 == 0o600
    for message in (bundle, query):
        guard_and_audit(cfg, "site-a", key_file, "evaluate.segment", message, [])
    secret = ckks.hospital_secret_bytes(secret_file)
    for message in (bundle, query, reply):
        assert ckks.secret_key_findings(message, secret) == []

    # ... and refuses a context that holds a secret key, or the secret key's bytes.
    private = np.frombuffer(hospital.context.serialize(save_secret_key=True), np.uint8)
    with pytest.raises(KeyLeakError, match="holds a secret key|CKKS secret key"):
        guard_and_audit(cfg, "site-a", key_file, "m", {**bundle, ckks.CONTEXT: private}, [])
    other = ckks.HospitalCkks.create()  # any hospital's private context, not only this one's
    private_other = np.frombuffer(other.context.serialize(save_secret_key=True), np.uint8)
    with pytest.raises(KeyLeakError, match="holds a secret key"):
        guard_and_audit(cfg, "site-a", key_file, "m", {"x.ctx": private_other}, [])
    smuggled = np.frombuffer(b"\x00" * 100 + secret + b"\x00" * 100, np.uint8)
    with pytest.raises(KeyLeakError, match="CKKS secret key"):
        guard_and_audit(cfg, "site-a", key_file, "m", {**query, "ckks.extra": smuggled}, [])
    with pytest.raises(ckks.CkksError, match="holds a secret key"):
        ckks.ServerCkks.from_bundle({**bundle, ckks.CONTEXT: private}, 3)


def test_secret_context_round_trip(hospital, tmp_path):
    path = hospital.save(tmp_path / "h.ckks.key")
    loaded = ckks.HospitalCkks.load(path)
    assert loaded.key_id == hospital.key_id and loaded.params == hospital.params
    cfg = he_config()
    pack = packing(cfg, hospital.params)
    umn = trained_like(cfg)
    server = ckks.ServerCkks.from_bundle(hospital.public_bundle(pack), umn.depth)
    query = random_query(cfg, items=1)
    reply = ckks.EncryptedMapper(server, umn.folded("site-a"), pack).map(
        loaded.encrypt(query, pack)
    )
    out = hospital.decrypt(reply, pack)
    expected = folded_forward(umn.folded("site-a"), [query[f"image{s}"] for s in range(3)])
    assert relative_error(out["mask0"], expected[0]) < 1e-3


# --- bad ciphertexts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(hospital):
    cfg = he_config()
    pack = packing(cfg, hospital.params)
    umn = trained_like(cfg)
    server = ckks.ServerCkks.from_bundle(hospital.public_bundle(pack), umn.depth)
    return cfg, pack, ckks.EncryptedMapper(server, umn.folded("site-a"), pack)


def with_header(query: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    header = {**json.loads(query[ckks.HEADER].tobytes()), **changes}
    return {**query, ckks.HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}


def test_wrong_context_ciphertexts_are_refused(hospital, served):
    cfg, pack, mapper = served
    stranger = ckks.HospitalCkks.create()
    query = stranger.encrypt(random_query(cfg, items=1), pack)
    with pytest.raises(ckks.CkksError, match="another CKKS key"):
        mapper.map(query)
    # Other parameters (ring 2^14), even under a forged key id: SEAL refuses to load them.
    big = ckks.HospitalCkks.create(ckks.CkksParams(16384, (60, 40, 40, 40, 60), 40))
    big_pack = ckks.Packing(pack.shapes, big.params.slots)
    forged = with_header(
        big.encrypt(random_query(cfg, items=1), big_pack),
        key_id=hospital.key_id,
        ciphertexts=pack.cts(pack.channels),
    )
    with pytest.raises(ckks.CkksError, match="does not load under this CKKS context|exceeds"):
        mapper.map(forged)


def test_malformed_queries_are_refused(hospital, served):
    cfg, pack, mapper = served
    query = hospital.encrypt(random_query(cfg, items=2), pack)
    with pytest.raises(ckks.CkksError, match="ciphertexts per image"):
        mapper.map(with_header(query, ciphertexts=3))
    with pytest.raises(ckks.CkksError, match=r"offsets"):
        mapper.map(with_header(query, items=1))
    with pytest.raises(ckks.CkksError, match="the limit is 1"):
        mapper.map(query, max_items=1)
    with pytest.raises(ckks.CkksError, match="latent shapes"):
        mapper.map(with_header(query, shapes=[[16, 4, 4]] * 3))
    truncated = dict(query)
    truncated[ckks.CIPHER] = query[ckks.CIPHER][:-100]
    truncated[ckks.OFFSETS] = query[ckks.OFFSETS].copy()
    truncated[ckks.OFFSETS][-1] -= 100
    with pytest.raises(ckks.CkksError, match="does not load"):
        mapper.map(truncated)
    with pytest.raises(ckks.CkksError, match="unexpected field"):
        mapper.map({**query, "image0": np.zeros(3, np.float16)})


def test_oversized_query_is_refused_before_reading(hospital, served, monkeypatch):
    cfg, pack, mapper = served
    query = hospital.encrypt(random_query(cfg, items=1), pack)
    limit = ckks.max_ciphertext_bytes(hospital.params)
    huge = np.zeros(limit + 1, np.uint8)
    oversized = {
        **query,
        ckks.CIPHER: huge,
        ckks.OFFSETS: np.array([0, limit + 1], np.int64),
    }

    def no_load(*args, **kwargs):
        raise AssertionError("deserialised an oversized query")

    monkeypatch.setattr(ckks, "_load", no_load)
    with pytest.raises(ckks.CkksError, match="exceeds the limit"):
        mapper.map(oversized)


def test_packing_round_trip():
    shapes = ((32, 16, 16), (32, 8, 8), (32, 4, 4))
    pack = ckks.Packing(shapes, 4096)
    assert (pack.block, pack.groups, pack.cts(32), pack.rotation_step) == (512, 8, 4, 512)
    rng = np.random.default_rng(0)
    latents = [rng.normal(size=s) for s in shapes]
    back = pack.unpack(pack.pack(latents), 32)
    for a, b in zip(latents, back, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ckks.CkksError, match="do not fit"):
        _ = ckks.Packing(((32, 64, 64), (32, 32, 32), (32, 16, 16)), 4096).groups


# --- the wiring (library level: what clients/app.py and strategies/evaluation.py call) -------


def test_encrypted_evaluation_through_the_hospital_and_coordinator(tmp_path):
    """Keys once, queries in chunks, mapped encrypted, decrypted and scored by the hospital:
    the same predictions as the plaintext path of the same network."""
    from fedseg import hospital as site_api
    from fedseg.config import ConfigError
    from fedseg.protocol import LatentRequest
    from fedseg.site import resolve_site

    cfg = he_config()
    cfg.privacy.query = "ckks"
    cfg.out_dir = str(tmp_path)
    cfg.overlays_per_site = 0
    setup = resolve_site(cfg, {"partition-id": 0})
    site_api.register(cfg, setup, False)
    name, n = setup.split.name, len(setup.split.test)
    coordinator = Coordinator(cfg, [name, "other"])
    plain_query = site_api.latent_chunk(cfg, setup, LatentRequest("test", 0, n))
    coordinator.finetune_forward(name, plain_query)
    coordinator.umn.eval()
    plain = site_api.segment(cfg, setup, coordinator.map_query(name, plain_query))

    coordinator.register_ckks(name, site_api.ckks_keys(cfg, setup))
    key_file = site_api.ckks_key_file(setup)
    assert key_file.parent == setup.key_file.parent and key_file.stat().st_mode & 0o777 == 0o600
    parts = [
        coordinator.map_encrypted(name, site_api.ckks_query(cfg, setup, a, min(a + 3, n)), 3)
        for a in range(0, n, 3)
    ]
    encrypted = site_api.segment(cfg, setup, ckks.concat(parts), encrypted=True)
    assert encrypted["n_test"] == plain["n_test"] == n
    assert encrypted["dice_mean"] == pytest.approx(plain["dice_mean"], abs=1e-3)

    query = site_api.ckks_query(cfg, setup, 0, 1)
    with pytest.raises(ckks.CkksError, match="registered no CKKS keys"):
        coordinator.map_encrypted("other", query)
    with pytest.raises(ckks.CkksError, match="the limit is 1"):
        coordinator.map_encrypted(name, site_api.ckks_query(cfg, setup, 0, 2), max_items=1)
    with pytest.raises(ValueError, match="outside"):
        site_api.ckks_query(cfg, setup, 0, n + 1)
    cfg.model.umn_arch = "fast"
    with pytest.raises(ConfigError, match="privacy.query = 'ckks' needs model.umn_arch = 'he'"):
        cfg.validate()


def test_segmentation_service_maps_encrypted_queries(tmp_path):
    """``fedseg segment --encrypted`` against ``fedseg serve``'s app: the bundle once, then
    ciphertexts only; the site's prediction equals the plaintext route's."""
    from starlette.testclient import TestClient

    from fedseg.data import site_for_partition
    from fedseg.serving import protocol as wire
    from fedseg.serving.client import SegmentationClient, SiteClientConfig, Timing
    from fedseg.serving.server import MappingService, create_app
    from fedseg.site import SiteModels, query_chunk, site_transform

    cfg = he_config()
    split = site_for_partition(cfg, 0)
    key_file = tmp_path / "federation.key"
    load_or_create_key(key_file, simulated_secret(0, "federation"))
    models = SiteModels.build(cfg, split.test.num_classes)
    coordinator = Coordinator(cfg, [split.name])
    transform = site_transform(cfg, key_file)
    coordinator.finetune_forward(split.name, query_chunk(split.test, models, transform, 0, 4))
    coordinator.umn.eval()
    http = TestClient(create_app(MappingService(coordinator, tmp_path), 4, authenticate=False))

    def client(encrypted: bool) -> SegmentationClient:
        c = object.__new__(SegmentationClient)
        c.site_cfg = SiteClientConfig(
            cfg, split.name, key_file, tmp_path, "https://x", tmp_path, tmp_path, tmp_path
        )
        c.models, c.transform, c.shapes = models, transform, list(coordinator.shapes)
        c.http, c.max_items, c.timing, c.ckks, c.encrypted = http, 4, Timing(), None, encrypted
        if encrypted:
            c._start_encrypted(http.get("/v1/info").json())
        return c

    images = split.test.images[:6]
    plain = client(False).segment(images)
    first = client(True)
    assert first.timing.key_bytes > 0  # registered its public bundle
    assert np.array_equal(first.segment(images), plain)
    again = client(True)
    assert again.timing.key_bytes == 0  # the service already holds this site's key
    assert (tmp_path / f"{split.name}.ckks.key").stat().st_mode & 0o777 == 0o600

    # Refusals: an oversized body before it is read, a query under no registered key.
    huge = {"content-length": str(10**9), "content-type": wire.CKKS_MEDIA_TYPE}
    response = http.post(f"/v1/map-encrypted/{split.name}", content=b"x", headers=huge)
    assert response.status_code == 413
    coordinator._ckks.clear()
    response = http.post(f"/v1/map-encrypted/{split.name}", content=b"x")
    assert response.status_code == 409 and "registered no CKKS keys" in response.text
    bad = wire.arrays_body({ckks.HEADER: np.frombuffer(b"{}", np.uint8)})
    response = http.post(f"/v1/ckks-keys/{split.name}", content=bad)
    assert response.status_code == 422 and "fedseg-ckks" in response.text


class _InProcessGrid:
    """A Grid that hands each message to the ClientApp in this process (its mods included:
    the outgoing key guard), so the Flower layer is exercised without a simulation."""

    def __init__(self, app, contexts) -> None:
        self.app, self.contexts, self.inbox, self.sent = app, contexts, {}, []

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            mid = f"{len(self.sent)}-{i}"
            message.metadata.__dict__["_message_id"] = mid
            self.inbox[mid] = message
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        replies = []
        for mid in list(ids):
            message = self.inbox.pop(mid)
            reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            self.sent.append((message, reply))
            replies.append(reply)
        return replies


def test_encrypted_evaluation_through_the_flower_handlers(tmp_path, monkeypatch):
    """strategies/ against clients/app.py's handlers (in process): the public keys once, with
    the registration; then ciphertexts only; the guard passes every reply; the metrics equal
    the plaintext run's."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import make_client_app
    from fedseg import hospital as site_api
    from fedseg.site import resolve_site
    from server.app import register_ckks_keys
    from strategies.autoencoders import LocalAutoencoderTraining
    from strategies.common import Federation
    from strategies.evaluation import SegmentationEvaluation

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the server's
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = he_config()
    cfg.privacy.query = "ckks"
    cfg.out_dir = str(tmp_path)
    cfg.overlays_per_site = 0
    contexts = {
        node: Context(1, node, {"partition-id": part}, RecordDict(), {})
        for node, part in ((11, 0), (12, 1))
    }
    grid = _InProcessGrid(make_client_app(cfg), contexts)
    federation = Federation()
    LocalAutoencoderTraining(60, ckks=True).run(grid, list(contexts), federation)
    names = sorted(site.name for site in federation.sites.values())
    assert len(names) == 2 and all(s.ckks_keys for s in federation.sites.values())
    coordinator = Coordinator(cfg, names)
    register_ckks_keys(coordinator, federation)
    assert not federation.dropped and set(coordinator._ckks) == set(names)
    for part in (0, 1):
        setup = resolve_site(cfg, {"partition-id": part})
        request = site_api.LatentRequest("test", 0, 4)
        coordinator.finetune_forward(setup.split.name, site_api.latent_chunk(cfg, setup, request))
    coordinator.umn.eval()

    grid.sent.clear()
    evaluation = SegmentationEvaluation(coordinator, 3, 60)
    metrics, per_image = evaluation.run(grid, federation)
    assert set(metrics) == set(names) and not federation.dropped and per_image > 0
    assert evaluation.queries == sum(s.n_test for s in federation.sites.values())
    assert evaluation.query_bytes > evaluation.queries * 10_000  # ciphertexts, not fp16 latents
    kinds = [m.content.config_records["request"]["step"] for m, _ in grid.sent]
    assert kinds.count("decode") == 2 and "query" in kinds and set(kinds) == {"query", "decode"}
    for message, reply in grid.sent:  # nothing in the clear: only CKKS payloads or metrics
        for record in (
            *message.content.array_records.values(),
            *reply.content.array_records.values(),
        ):
            assert set(record) <= {ckks.HEADER, ckks.CIPHER, ckks.OFFSETS}

    plain_cfg = he_config()
    plain_cfg.out_dir, plain_cfg.overlays_per_site = str(tmp_path), 0
    plain_grid = _InProcessGrid(make_client_app(plain_cfg), contexts)
    coordinator.cfg = plain_cfg
    plain, _ = SegmentationEvaluation(coordinator, 3, 60).run(plain_grid, federation)
    for name in names:
        assert metrics[name]["dice_mean"] == pytest.approx(plain[name]["dice_mean"], abs=1e-3)

    # A hospital that registers without its public keys cannot take part in a CKKS run.
    refused = Federation()
    LocalAutoencoderTraining(60, ckks=True).run(plain_grid, list(contexts), refused)
    assert not refused.sites and len(refused.dropped) == 2
    assert all("ckks_keys" in d["reason"] for d in refused.dropped), refused.dropped
