"""A real deployment across network namespaces: the coordinator (this namespace) runs the
SuperLink on loopback behind nginx, as ``fedseg deploy superlink`` does; the hospitals'
SuperNodes run in one namespace, an outside attacker holding only ``ca.pem`` in another.

The attacker's ``flwr ls``, ``flwr supernode register`` and ``flwr run``, a raw request to the
Control API through the public port, and any try of the SuperLink's own port all fail; an
unregistered SuperNode is refused; the two registered hospitals complete a short federation in
the default mode (blind split training). Tiny on purpose (8 PNG pairs per site, 64 px): it
checks that the deployment works and lets no one else in, not accuracy. Needs root (``ip
netns``) and nginx (``setup.sh`` installs it when run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from fedseg.config import apply_overrides
from fedseg.deploy.certs import supernode_keypair
from fedseg.deploy.runtime import (
    binary,
    environment,
    init_coordinator,
    node_config,
    register_command,
    run_command,
    supernode_command,
    write_flwr_config,
)
from fedseg.privacy.keys import write_key_file
from tests.helpers import blind_config, write_site_data

ROOT = Path(__file__).resolve().parents[1]
SITES = ["hospital-a", "hospital-b"]
# benchmarks/deploy_profile.py runs this test longer (and with its --set overrides), to time a
# deployed epoch, and keeps its metrics.json
EPOCHS = int(os.environ.get("FEDSEG_DEPLOY_EPOCHS", "2"))
OVERRIDES = json.loads(os.environ.get("FEDSEG_DEPLOY_SET", "{}"))
KEEP_METRICS = os.environ.get("FEDSEG_DEPLOY_METRICS", "")


def _missing_binaries() -> list[str]:
    missing = []
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        try:
            binary(name)
        except FileNotFoundError:
            missing.append(name)
    return missing


def _cannot_isolate() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("nginx") is None:
        return "needs iproute2 and nginx (setup.sh installs nginx as root)"
    return ""


pytestmark = [
    pytest.mark.slow,  # a real SuperLink, nginx and SuperNodes across network namespaces
    pytest.mark.skipif(
        bool(_missing_binaries()), reason=f"Flower binaries not installed: {_missing_binaries()}"
    ),
    pytest.mark.skipif(bool(_cannot_isolate()), reason=_cannot_isolate() or "-"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Namespaces:
    """Two network namespaces, each joined to this one by a veth pair on its own subnet."""

    def __init__(self, tag: str) -> None:
        self.names = {"outside": f"fs-out-{tag}", "hospitals": f"fs-hosp-{tag}"}
        self.coordinator = {"outside": "10.231.1.1", "hospitals": "10.231.2.1"}
        for i, ns in enumerate(self.names.values(), start=1):
            here, there = f"fs{tag}h{i}", f"fs{tag}n{i}"
            for command in (
                ["ip", "netns", "add", ns],
                ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                ["ip", "link", "set", there, "netns", ns],
                ["ip", "addr", "add", f"10.231.{i}.1/24", "dev", here],
                ["ip", "link", "set", here, "up"],
                ["ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{i}.2/24", "dev", there],
                ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
                ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ):
                subprocess.run(command, check=True, capture_output=True)

    def run(self, role: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[role], *command]

    def close(self) -> None:
        for ns in self.names.values():  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_only_registered_hospitals_get_in(tmp_path):
    started = time.perf_counter()
    port, internal = free_port(), free_port()
    nets = Namespaces(str(os.getpid() % 10000))
    coordinator = init_coordinator(
        tmp_path / "coordinator", list(nets.coordinator.values()), internal
    )
    env = environment(coordinator.flwr_home)

    cfg = blind_config(tmp_path / "results", sites=2, epochs=EPOCHS)
    cfg.data.kind = "pairs"
    cfg.data.path = str(tmp_path / SITES[0] / "data")  # each SuperNode names its own data-dir
    cfg.federation.node_wait_s = 120
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    apply_overrides(cfg, OVERRIDES)
    values = cfg.validate().to_dict()
    del values["out_dir"], values["resume"]
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(tomli_w.dumps(values))

    processes: list[subprocess.Popen] = []
    try:
        link_log = tmp_path / "superlink.log"
        deploy = [sys.executable, "-m", "fedseg.cli", "deploy", "superlink"]
        deploy += ["--dir", str(coordinator.root), "--port", str(port)]
        processes.append(start([*deploy, "--internal-port", str(internal)], link_log, env))
        wait_for(lambda: "Uvicorn running on https" in link_log.read_text(), 60, "the SuperLink")
        wait_for(lambda: (coordinator.proxy_dir / "nginx.pid").is_file(), 30, "nginx")

        # The outside host: only ca.pem, the public address, and its own SuperNode key.
        outside_home = tmp_path / "outside-home"
        write_flwr_config(outside_home, f"{nets.coordinator['outside']}:{port}", coordinator.ca)
        write_site_data(tmp_path / "intruder" / "data", 2)
        intruder_key = supernode_keypair(tmp_path / "intruder", "intruder")
        outside_env = {**env, "FLWR_HOME": str(outside_home)}
        attempts = {
            "flwr ls": [binary("flwr"), "ls", "fedseg"],
            "flwr supernode register": [*register_command(intruder_key[1])],
            "flwr run": run_command(ROOT, {"scenario": str(scenario)}),
        }
        for what, command in attempts.items():
            tried = subprocess.run(
                nets.run("outside", command),
                env=outside_env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            print(f"outside: {what}: rc {tried.returncode}: {(tried.stdout + tried.stderr)[-300:]}")
            assert tried.returncode != 0, f"{what} succeeded from outside: {tried.stdout}"
        probe = """
import httpx, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
for url in sys.argv[2:]:
    try:
        print(url, httpx.post(url, json={}, verify=ctx, timeout=10).status_code)
    except httpx.HTTPError as err:
        print(url, "refused:", type(err).__name__)
"""
        public = f"https://{nets.coordinator['outside']}:{port}"
        internal_url = f"https://{nets.coordinator['outside']}:{internal}"
        urls = [
            f"{public}/v1/control/list-runs",
            f"{public}/health",
            f"{internal_url}/v1/control/list-runs",
        ]
        probed = subprocess.run(
            nets.run("outside", [sys.executable, "-c", probe, str(coordinator.ca), *urls]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        print("outside probes:", probed.stdout, probed.stderr[-500:])
        lines = probed.stdout.splitlines()
        assert lines[0].endswith(" 403") and lines[1].endswith(" 403"), probed.stdout
        assert "refused" in lines[2], probed.stdout  # the SuperLink listens on loopback only

        # The operator, on the coordinator: registers the two hospitals (loopback Control API).
        keys = {}
        secret = write_key_file(tmp_path / "federation.key")  # fedseg keygen, shared by hand
        for i, site in enumerate(SITES):
            write_site_data(tmp_path / site / "data", i)
            keys[site] = supernode_keypair(tmp_path / site, site)
            register = [
                sys.executable,
                "-m",
                "fedseg.cli",
                "deploy",
                "register",
                str(keys[site][1]),
            ]
            register += ["--site", site, "--dir", str(coordinator.root)]
            registered = subprocess.run(register, env=env, capture_output=True, text=True)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        registry = json.loads(coordinator.registry.read_text())
        assert sorted(registry.values()) == SITES, registry

        hospital_home = tmp_path / "hospital-home"
        hospital_env = {**env, "FLWR_HOME": str(hospital_home)}
        address = f"{nets.coordinator['hospitals']}:{port}"

        def supernode(site: str, key: Path) -> list[str]:
            config = node_config(tmp_path / site / "data", secret, site, tmp_path / site / "out")
            command = supernode_command(address, coordinator.ca, key, config, free_port())
            return nets.run("hospitals", command)

        intruder_log = tmp_path / "intruder.log"
        intruder = start(supernode("intruder", intruder_key[0]), intruder_log, hospital_env)
        processes.append(intruder)
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in intruder_log.read_text()

        for site in SITES:
            log = tmp_path / f"{site}.log"
            processes.append(start(supernode(site, keys[site][0]), log, hospital_env))

        out = tmp_path / "results"
        run = subprocess.run(  # fedseg deploy run hands the ServerApp the operator's registry
            [sys.executable, "-m", "fedseg.cli", "deploy", "run", "--dir", str(coordinator.root)]
            + ["--scenario", str(scenario), "--out", str(out)],
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
        nets.close()
    wall = time.perf_counter() - started

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == set(SITES) and metrics["dropped"] == []
    assert metrics["config"]["federation"]["registry"] == str(coordinator.registry)
    if KEEP_METRICS:
        shutil.copy(out / "metrics.json", KEEP_METRICS)
    assert len(metrics["share_bytes"]) == EPOCHS  # blind aggregation over the real SuperLink
    for site in metrics["sites"].values():
        assert 0.0 <= site["dice_mean"] <= 1.0 and site["n_test"] == 4
    assert (out / "report.md").is_file() and (out / "checkpoints" / "umn.pt").is_file()
    assert not (out / "keys").exists()  # no key at the coordinator
    for site in SITES:
        private = tmp_path / site / "out" / "sites" / site / "autoencoders.pt"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    print(f"deployment lock-down test: {wall:.0f} s wall")
