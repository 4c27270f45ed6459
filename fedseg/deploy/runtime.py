"""The commands of a real deployment: one SuperLink (coordinator), one SuperNode per hospital.

Everything runs under TLS with certificates from the federation's own CA (``certs.py``), and the
SuperLink admits only SuperNodes whose public key was registered (``--enable-supernode-auth``).

The SuperLink serves its Fleet, Control and Runtime APIs on one port, and open-source Flower has
no authentication on the Control API (list runs, register SuperNodes, submit apps). So the
SuperLink listens on loopback only, and the hospitals reach it through nginx, which terminates
TLS on the public port and forwards ``/v1/fleet/`` and nothing else (``proxy_config``). An
operator submits runs and registers SuperNodes on the coordinator itself (the Flower CLI's
connection is the loopback port), or through an SSH tunnel to it.
Flower's runtime dependency installation (``uv sync`` of the app's dependencies on every run)
is turned off everywhere: hospitals install fedseg once, like any other software.

Files on the coordinator, under one folder::

    ca/ca.pem, ca/ca.key                  the CA (ca.pem goes to every hospital; ca.key stays)
    superlink/superlink.pem, .key         the SuperLink's TLS certificate (also nginx's)
    flwr/config.toml                      the Flower CLI's connection to the SuperLink (loopback)
    proxy/nginx.conf, proxy/*.log         the public face: TLS, the Fleet API only
    sites.json                            node id -> site name, one entry per ``register``

Files at a hospital: ca.pem (from the coordinator), its SuperNode key pair (made there; only
the ``.pub`` file goes to the coordinator), its data, and its fedseg secret.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedseg.atomic import write_text_atomic
from fedseg.deploy.certs import ensure_ca, issue_server_cert
from fedseg.deploy.registry import RegistryError, check_free, record_node

CONNECTION = "fedseg"
INTERNAL_PORT = 9091  # the SuperLink's own port, on loopback only
FLEET_PREFIX = "/v1/fleet/"  # the only routes the hospitals need


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's deployment folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.root / "superlink" / "superlink.pem"

    @property
    def key(self) -> Path:
        return self.root / "superlink" / "superlink.key"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def proxy_dir(self) -> Path:
        return self.root / "proxy"

    @property
    def registry(self) -> Path:
        """node id -> site name, written by ``register`` (``fedseg/deploy/registry.py``)."""
        return self.root / "sites.json"


class DeployError(ValueError):
    """A deployment argument that would fail later (or leave a half-made folder): refused
    before anything is written, naming the argument."""


_UNSAFE = set(" \t\n\"';{}$#")  # nginx.conf and Flower's node config take paths unquoted


def parse_address(address: str, option: str = "--address") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), or a DeployError saying what is wrong."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise DeployError(
            f"{option} {address!r}: give host:port, e.g. coordinator.example.org:9093"
        )
    if host.startswith("["):
        if not host.endswith("]"):
            raise DeployError(f"{option} {address!r}: an IPv6 address goes in brackets, [::1]:9093")
        host = host[1:-1]
    elif ":" in host:
        raise DeployError(f"{option} {address!r}: an IPv6 address goes in brackets, [::1]:9093")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DeployError(f"{option} {address!r}: the port must be a number in 1-65535")
    try:
        return check_host(host, option), int(port_text)
    except DeployError:
        raise DeployError(
            f"{option} {address!r}: host {host!r} is not an IP address or a DNS name"
        ) from None


def check_host(host: str, option: str = "--host") -> str:
    """An IP address or a DNS name (letters, digits, '-', '.'), as a certificate can name it."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise DeployError(f"{option} {host!r}: not an IP address or a DNS name")
    return host


_DNS_LABEL = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_path(path: Path, option: str) -> Path:
    """A path that nginx.conf and Flower's node config can hold (they take paths unquoted)."""
    text = str(path.resolve())
    bad = sorted(set(text) & _UNSAFE)
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise DeployError(f"{option} {text!r}: the path may not contain {shown}; choose another")
    return path


def init_coordinator(
    root: str | Path, hosts: list[str], internal_port: int = INTERNAL_PORT
) -> Coordinator:
    """CA, the SuperLink certificate for ``hosts`` (the names hospitals use) and loopback, and
    the Flower CLI's connection to the SuperLink's loopback port."""
    check_path(Path(root), "--dir")
    hosts = [check_host(h) for h in hosts]
    layout = Coordinator(Path(root).resolve())
    ensure_ca(layout.ca.parent)
    names = [*hosts, "127.0.0.1", "localhost"]
    issue_server_cert(layout.ca.parent, layout.cert.parent, "superlink", names)
    write_flwr_config(layout.flwr_home, f"127.0.0.1:{internal_port}", layout.ca)
    return layout


def write_flwr_config(flwr_home: Path, address: str, ca: Path) -> Path:
    """``$FLWR_HOME/config.toml``: how ``flwr run`` / ``flwr supernode`` reach the SuperLink."""
    path = flwr_home / "config.toml"
    return write_text_atomic(
        path,
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca.resolve()}"\n',
    )


def binary(name: str) -> str:
    """A Flower executable next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install flwr in this environment")
    return found


def environment(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: venv first on PATH (SuperExec is started by name)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_command(
    layout: Coordinator, host: str, port: int, database: Path | None
) -> list[str]:
    return [
        binary("flower-superlink"),
        "--ssl-ca-certfile",
        str(layout.ca),
        "--ssl-certfile",
        str(layout.cert),
        "--ssl-keyfile",
        str(layout.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database) if database else ":flwr-in-memory:",
    ]


def proxy_config(layout: Coordinator, host: str, port: int, internal_port: int) -> Path:
    """nginx's configuration: TLS on ``host:port`` with the SuperLink's certificate, the Fleet
    API forwarded to the loopback SuperLink (verified against the CA), every other path 403."""
    folder = layout.proxy_dir
    check_path(folder, "--dir")
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = folder / "nginx.conf"
    write_text_atomic(
        path,
        f"""daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {folder / "access.log"};
    client_body_temp_path {folder / "body"};
    proxy_temp_path {folder / "proxy"};
    fastcgi_temp_path {folder / "fastcgi"};
    uwsgi_temp_path {folder / "uwsgi"};
    scgi_temp_path {folder / "scgi"};
    server_tokens off;
    client_max_body_size 300m;  # fedseg refuses replies over 256 MiB itself
    client_body_timeout 60s;
    client_header_timeout 30s;
    keepalive_timeout 30s;
    server {{
        listen {listen} ssl;
        ssl_certificate {layout.cert};
        ssl_certificate_key {layout.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            proxy_pass https://127.0.0.1:{internal_port};
            proxy_ssl_trusted_certificate {layout.ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # nginx checks DNS names only, not IP SANs
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 403; }}
    }}
}}
""",
    )
    return path


def proxy_command(layout: Coordinator) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).is_file():
        raise FileNotFoundError("nginx not found: install it (Debian: apt-get install nginx-light)")
    conf = layout.proxy_dir / "nginx.conf"
    return [
        nginx,
        "-p",
        str(layout.proxy_dir),
        "-e",
        str(layout.proxy_dir / "error.log"),
        "-c",
        str(conf),
    ]


def node_config(data_dir: Path, key_file: Path, site: str, out_dir: Path) -> str:
    values = {
        "data-dir": data_dir,
        "key-file": key_file,
        "site-name": site,
        "out-dir": out_dir,
    }
    for key, value in values.items():
        if any(c in str(value) for c in " \"'"):
            raise DeployError(f"node config {key}={value!r}: no spaces or quotes, please")
    return " ".join(f'{key}="{value}"' for key, value in values.items())


def supernode_command(
    superlink: str,
    ca: Path,
    private_key: Path,
    config: str,
    runtime_port: int,
) -> list[str]:
    """A hospital's SuperNode. ``runtime_port``: its local ClientApp API (one per SuperNode)."""
    return [
        binary("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(private_key),
        "--node-config",
        config,
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--max-retries",
        "3",
    ]


def register_command(public_key: Path) -> list[str]:
    """Admit a hospital's SuperNode (run on the coordinator, with ``environment(flwr_home)``)."""
    return [binary("flwr"), "supernode", "register", str(public_key), CONNECTION]


def register_site(layout: Coordinator, public_key: Path, site: str) -> int:
    """Admit a hospital's SuperNode with Flower and record its node id as ``site``."""
    check_free(layout.registry, site)  # before Flower admits the key
    if not public_key.is_file():
        raise RegistryError(f"{public_key}: no such public key (fedseg deploy node-key)")
    done = subprocess.run(
        [*register_command(public_key), "--format", "json"],  # prints the node id
        env=environment(layout.flwr_home),
        capture_output=True,
        text=True,
    )
    try:
        reply = json.loads(done.stdout)
        node_id = int(reply["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # also {"success": false}
        said = (done.stdout + done.stderr).strip()[-500:]
        raise RegistryError(
            f"flwr supernode register did not register {public_key}: {said}"
        ) from None
    record_node(layout.registry, node_id, site)
    return node_id


def run_command(app_dir: Path, run_config: dict[str, object]) -> list[str]:
    """Start the federation. Values follow TOML: strings are quoted here."""

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return f'"{value}"'
        return str(value)

    overrides = " ".join(f"{k}={toml(v)}" for k, v in run_config.items())
    command = [binary("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    return command + (["--run-config", overrides] if overrides else [])


def resolve_scenario(run_config: dict, app_dir: Path) -> dict:
    """A relative ``scenario`` is looked up inside the app (the FAB every node received), so a
    hospital needs no copy of the scenario file at a matching path."""
    scenario = str(run_config.get("scenario", ""))
    if scenario and not Path(scenario).is_absolute() and (app_dir / scenario).is_file():
        return {**run_config, "scenario": str(app_dir / scenario)}
    return run_config


@dataclass(frozen=True)
class DeployedSite:
    """A deployed hospital as its node config names it (``node_config`` above)."""

    name: str
    key_file: Path | None


def deployed_site(node: dict) -> DeployedSite | None:
    """The hospital a deployed node serves, read from its node config alone: no data loaded,
    so a ClientApp process that lives for one message (Flower starts one per message) can
    check its reply without loading the hospital's images. None for a simulated node."""
    if "data-dir" not in node:
        return None
    name = str(node.get("site-name", Path(str(node["data-dir"])).name))
    key_file = node.get("key-file")
    return DeployedSite(name, Path(str(key_file)) if key_file else None)


def node_out_dir(out_dir: str, node: dict) -> Path:
    """Where a node keeps its outputs: its ``out-dir`` (deployed), else the run's."""
    return Path(str(node.get("out-dir", out_dir)))
