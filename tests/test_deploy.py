"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, two
authenticated SuperNodes with their own data folders, and ``flwr run`` of the real pipeline.

Tiny on purpose (8 PNG pairs per site, 64 px, one AE epoch): it checks that the deployment
commands work together, not accuracy. An unregistered SuperNode must be refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomli_w
from PIL import Image

from fedseg.data.synthetic import synthetic_site
from fedseg.deploy.certs import supernode_keypair
from fedseg.deploy.runtime import (
    binary,
    environment,
    init_coordinator,
    node_config,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
)
from tests.helpers import small_config

ROOT = Path(__file__).resolve().parents[1]
SITES = ["hospital-a", "hospital-b"]


def _missing_binaries() -> list[str]:
    missing = []
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        try:
            binary(name)
        except FileNotFoundError:
            missing.append(name)
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing_binaries()), reason=f"Flower binaries not installed: {_missing_binaries()}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_site_data(folder: Path, index: int) -> None:
    """8 training and 4 test PNG pairs of one synthetic hospital, as a site would have them."""
    for sub, n, seed in (("", 8, 0), ("test", 4, 1)):
        data = synthetic_site(index, n, 64, seed=seed)
        (folder / sub / "images").mkdir(parents=True, exist_ok=True)
        (folder / sub / "masks").mkdir(parents=True, exist_ok=True)
        for j in range(n):
            image = data.images[j, 0]
            image = ((image - image.min()) / (np.ptp(image) + 1e-6) * 255).astype(np.uint8)
            Image.fromarray(image).save(folder / sub / "images" / f"p{j:03d}.png")
            mask = data.masks[j].astype(np.uint8)
            Image.fromarray(mask).save(folder / sub / "masks" / f"p{j:03d}.png")


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (SuperExec and app processes included), then SIGKILL."""
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_federation_over_tls_with_authenticated_supernodes(tmp_path):
    started = time.perf_counter()
    port = free_port()
    address = f"127.0.0.1:{port}"
    coordinator = init_coordinator(tmp_path / "coordinator", ["127.0.0.1", "localhost"], address)
    env = environment(coordinator.flwr_home)

    cfg = small_config(tmp_path / "results", 2, [8, 8, 16, 16, 16], 16, ae_epochs=1)
    cfg.training.umn_epochs_per_round = 2
    cfg.data.kind = "pairs"
    cfg.data.path = str(tmp_path / SITES[0] / "data")  # each SuperNode names its own data-dir
    cfg.federation.node_wait_s = 120
    values = cfg.validate().to_dict()
    del values["out_dir"], values["resume"]
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(tomli_w.dumps(values))

    processes: list[subprocess.Popen] = []
    try:
        link_log = tmp_path / "superlink.log"
        processes.append(
            start(superlink_command(coordinator, "127.0.0.1", port, None), link_log, env)
        )
        wait_for(lambda: "Uvicorn running on https" in link_log.read_text(), 60, "the SuperLink")
        with pytest.raises(httpx.HTTPError):  # the SuperLink speaks TLS only
            httpx.get(f"http://{address}/", timeout=5)

        keys = {}
        for i, site in enumerate([*SITES, "intruder"]):
            write_site_data(tmp_path / site / "data", i)
            keys[site] = supernode_keypair(tmp_path / site, site)
        for site in SITES:  # the coordinator admits the two hospitals' public keys, not the third
            registered = subprocess.run(
                register_command(keys[site][1]), env=env, capture_output=True, text=True
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr

        def supernode(site: str, runtime_port: int) -> list[str]:
            config = node_config(
                tmp_path / site / "data",
                tmp_path / site / "secret.key",
                site,
                tmp_path / site / "out",
            )
            return supernode_command(address, coordinator.ca, keys[site][0], config, runtime_port)

        node_env = {**env, "FLWR_HOME": str(tmp_path / "supernode-home")}
        intruder_log = tmp_path / "intruder.log"
        intruder = start(supernode("intruder", free_port()), intruder_log, node_env)
        processes.append(intruder)  # its SuperExec child is stopped with its process group
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in intruder_log.read_text()
        assert "No SuperNode found with the given public key" in link_log.read_text()

        for site in SITES:
            processes.append(
                start(supernode(site, free_port()), tmp_path / f"{site}.log", node_env)
            )

        out = tmp_path / "results"
        run_config = {"scenario": str(scenario), "out-dir": str(out), "quick": False}
        run = subprocess.run(
            run_command(ROOT, run_config),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert (out / "metrics.json").is_file(), run.stdout[-3000:] + link_log.read_text()[-3000:]
    finally:
        stop(processes)
    wall = time.perf_counter() - started

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == set(SITES) and metrics["dropped"] == []
    for site in metrics["sites"].values():
        assert 0.0 <= site["dice_mean"] <= 1.0 and site["n_test"] == 4
    assert (out / "report.md").is_file() and (out / "checkpoints" / "umn.pt").is_file()
    assert not (out / "keys").exists()  # client custody: no key at the coordinator
    for site in SITES:
        for private in (
            tmp_path / site / "secret.key",
            tmp_path / site / "out" / "sites" / site / "autoencoders.pt",
        ):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    print(f"deployment integration test: {wall:.0f} s wall")
