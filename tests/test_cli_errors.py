"""Every CLI error a user can make here is one line naming the file or URL, no traceback, a
non-zero exit, and nothing written before the arguments were checked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image
from typer.testing import CliRunner

from fedseg.checkpoint import UMN_NAME
from fedseg.cli import app
from fedseg.config import RunConfig
from fedseg.deploy.certs import ensure_ca, issue_client_cert
from fedseg.privacy.keys import write_key_file
from fedseg.site import SiteModels

REPO = Path(__file__).resolve().parents[1]


def one_error_line(result, *names: str) -> str:
    """The run failed with exit 2 and exactly one line on stderr naming ``names``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- fedseg segment


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """A site config whose models, key and TLS files are real, for a service nobody runs."""
    root = tmp_path_factory.mktemp("site")
    cfg = RunConfig(name="t", out_dir=str(root / "run"))
    cfg.model.image_size = 64
    cfg.model.ae_widths = [4, 4, 8, 8, 8]
    cfg.model.latent_channels = 8
    (root / "metrics.json").write_text(json.dumps({"config": cfg.to_dict()}))
    models = SiteModels.build(cfg, 2)
    models.save(root / "sites" / "h1" / "autoencoders.pt", ["background", "a"])
    key = write_key_file(root / "h1.key")
    ca, _ = ensure_ca(root / "tls")
    client = issue_client_cert(root / "tls", root / "tls" / "clients", "h1")
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(
        root / "scan.png"
    )
    values = {
        "scenario": "metrics.json",
        "site-name": "h1",
        "key-file": str(key),
        "autoencoders": str(root / "sites" / "h1" / "autoencoders.pt"),
        "service": f"https://127.0.0.1:{free_port()}",
        "ca-cert": str(ca),
        "client-cert": str(client.cert),
        "client-key": str(client.key),
    }
    (root / "site.toml").write_text(tomli_w.dumps(values))
    return {"root": root, "config": root / "site.toml", "scan": root / "scan.png"}


def site_config_with(site: dict[str, Path], **changes: str) -> Path:
    import tomllib

    values = tomllib.loads(site["config"].read_text())
    values.update(changes)
    path = site["root"] / f"site-{abs(hash(tuple(changes.items())))}.toml"
    path.write_text(tomli_w.dumps(values))
    return path


def segment(site: dict[str, Path], config: Path):
    out = site["root"] / "mask.png"
    return invoke("segment", str(site["scan"]), "-o", str(out), "--site-config", str(config))


def test_segment_with_the_service_down_names_the_url(site):
    import tomllib

    url = tomllib.loads(site["config"].read_text())["service"]
    line = one_error_line(segment(site, site["config"]), url)
    assert "cannot reach" in line and "is it running" in line
    assert not (site["root"] / "mask.png").exists()


@pytest.mark.parametrize(
    "content, expected",
    [(b"garbage, not a certificate\n", "not a readable PEM CA certificate"), (None, "No such")],
)
def test_segment_with_a_bad_ca_file_names_it(site, content, expected):
    ca = site["root"] / f"bad-ca-{content is None}.pem"
    if content is not None:
        ca.write_bytes(content)
    line = one_error_line(segment(site, site_config_with(site, **{"ca-cert": str(ca)})), str(ca))
    assert expected in line


def test_segment_with_a_bad_client_key_names_it(site):
    bad = site["root"] / "bad.key"
    bad.write_text("not a key")
    one_error_line(segment(site, site_config_with(site, **{"client-key": str(bad)})), str(bad))


def test_segment_with_a_binary_key_file_names_it(site):
    key = site["root"] / "binary.key"
    key.write_bytes(b"\x89\xff\x00\xfe garbage")
    key.chmod(0o600)
    line = one_error_line(segment(site, site_config_with(site, **{"key-file": str(key)})), str(key))
    assert "not a fedseg secret" in line


# --------------------------------------------------------------------------- fedseg serve


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_serve_on_a_corrupt_checkpoint_names_the_file(tmp_path, cut):
    import torch

    path = tmp_path / "run" / "checkpoints" / UMN_NAME
    path.parent.mkdir(parents=True)
    if cut == "empty":
        path.touch()
    else:
        torch.save({"round": 1, "w": torch.randn(256, 256), "config": {}}, path)
        path.write_bytes(path.read_bytes()[:1000])
    line = one_error_line(invoke("serve", "--run", str(tmp_path / "run")), str(path))
    assert ("is empty" if cut == "empty" else "cannot be read as a checkpoint") in line


# --------------------------------------------------------------------------- fedseg deploy


@pytest.mark.parametrize(
    "address, expected",
    [
        ("coordinator.example.org", "give host:port"),
        ("host:port", "port must be a number"),
        ("host:70000", "port must be a number"),
        (":9093", "give host:port"),
        ("my host:9093", "not an IP address or a DNS name"),
        ("::1:9093", "IPv6 address goes in brackets"),
    ],
)
def test_deploy_init_refuses_a_bad_address_before_writing(tmp_path, address, expected):
    folder = tmp_path / "deployment"
    line = one_error_line(invoke("deploy", "init", "--dir", str(folder), "--address", address))
    assert expected in line and repr(address) in line
    assert not folder.exists()


def test_deploy_init_refuses_a_folder_with_a_space_before_writing(tmp_path):
    folder = tmp_path / "my deployment"
    result = invoke("deploy", "init", "--dir", str(folder), "--address", "10.0.0.5:9093")
    line = one_error_line(result, str(folder))
    assert "may not contain ' '" in line
    assert not folder.exists()


def test_deploy_init_accepts_an_ipv6_address(tmp_path):
    result = invoke("deploy", "init", "--dir", str(tmp_path / "d"), "--address", "[::1]:9093")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "ca" / "ca.pem").is_file()
    assert "--port 9093" in result.stdout


def test_deploy_supernode_with_a_garbage_ca_names_it(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"\x00garbage")
    key = write_key_file(tmp_path / "h.key")
    (tmp_path / "data").mkdir()
    args = ["deploy", "supernode", "--superlink", "10.0.0.5:9093", "--ca", str(ca)]
    args += ["--private-key", str(tmp_path / "absent"), "--data-dir", str(tmp_path / "data")]
    args += ["--key-file", str(key), "--site-name", "h1"]
    line = one_error_line(invoke(*args), str(ca))
    assert "not a PEM certificate" in line


def test_deploy_supernode_with_a_key_path_that_is_a_folder_says_so(tmp_path):
    args = ["deploy", "supernode", "--superlink", "10.0.0.5:9093", "--ca", str(tmp_path)]
    args += ["--private-key", str(tmp_path), "--data-dir", str(tmp_path)]
    args += ["--key-file", str(tmp_path), "--site-name", "h1"]
    line = one_error_line(invoke(*args), str(tmp_path))
    assert "is a directory" in line and "keygen" not in line


# --------------------------------------------------------------------------- fedseg run / keygen


def test_run_refuses_a_finished_results_folder(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"kept": true}')
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "s"\n')
    line = one_error_line(invoke("run", "--config", str(scenario), "--out", str(out)), str(out))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.json").read_text() == '{"kept": true}'
    both = invoke("run", "--config", str(scenario), "--out", str(out), "--resume", "--overwrite")
    assert "choose one" in one_error_line(both)


def test_demo_refuses_a_finished_results_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    line = one_error_line(invoke("demo", "--quick", "--out", str(tmp_path)), str(tmp_path))
    assert "already holds a run (checkpoints)" in line


def test_keygen_into_a_folder_or_over_a_key_is_one_line(tmp_path):
    assert "is a directory" in one_error_line(
        invoke("keygen", "--out", str(tmp_path)), str(tmp_path)
    )
    key = write_key_file(tmp_path / "h.key")
    before = key.read_bytes()
    assert "refusing to overwrite" in one_error_line(invoke("keygen", "--out", str(key)), str(key))
    assert key.read_bytes() == before


def test_a_config_error_keeps_its_brackets(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text("[training]\nno_such_field = 1\n")
    line = one_error_line(invoke("run", "--config", str(scenario), "--out", str(tmp_path / "o")))
    assert "[training]" in line  # not eaten as markup


@pytest.mark.slow
def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The real process (not the in-process runner): stderr, exit status, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "deploy", "init", "--dir", str(tmp_path / "d")]
        + ["--address", "coordinator"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        "error: --address 'coordinator': give host:port, e.g. coordinator.example.org:9093"
    ]
    assert not (tmp_path / "d").exists()


def test_run_with_bad_data_lists_every_problem_and_starts_nothing(tmp_path, monkeypatch):
    """The data check's error reaches the user as its lines, verbatim: the file names, no
    traceback, a non-zero exit, and no simulation started."""
    import types

    started: list[bool] = []
    fake = types.ModuleType("flwr.simulation")
    fake.run_simulation = lambda **_: started.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flwr.simulation", fake)
    data = tmp_path / "data"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    for i in range(6):
        mask = np.zeros((24, 24), np.uint8)
        mask[:12] = 1
        Image.fromarray(mask * 80 + 30).save(data / "images" / f"ok{i}.png")
        Image.fromarray(mask).save(data / "masks" / f"ok{i}.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(data / "images" / "lonely[x].png")
    (data / "images" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(data / "masks" / "torn.png")
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        tomli_w.dumps(
            {
                "name": "s",
                "federation": {"num_sites": 2},
                "data": {"kind": "pairs", "path": str(data), "label_values": [0, 1]},
            }
        )
    )
    result = invoke(
        "run", "--config", str(scenario), "--out", str(tmp_path / "o"), "--no-baselines"
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert not started
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ") and "problems in the data" in lines[0], lines
    assert len(lines) >= 3, lines  # one line per problem, not joined into one
    assert any("lonely[x].png" in ln for ln in lines[1:]), lines  # verbatim: no markup
    assert any("torn.png" in ln for ln in lines[1:]), lines
