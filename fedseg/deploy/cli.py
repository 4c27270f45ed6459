"""``fedseg deploy``: the commands of a real deployment, with TLS and SuperNode authentication.

Coordinator: ``init`` (once), ``superlink`` (keeps running), ``register`` (once per hospital),
``run`` (each federated run). Hospital: ``node-key`` (once), ``supernode`` (keeps running).
Each command prints or runs the exact Flower command, so an operator can also run it by hand.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fedseg.clierror import fail
from fedseg.deploy import runtime
from fedseg.deploy.certs import check_ca_file, supernode_keypair
from fedseg.deploy.registry import check_site_name
from fedseg.privacy.keys import KeyFileError, read_key_file

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,  # no secret from a local variable in a traceback
    help="Run fedseg across machines (Flower SuperLink/SuperNodes).",
)
console = Console()
REPO = Path(__file__).resolve().parents[2]


def _exec(command: list[str], env: dict[str, str]) -> None:
    console.print(f"$ {shlex.join(command)}")
    os.execvpe(command[0], command, env)


@app.command()
def init(
    folder: Path = typer.Option(Path("deployment"), "--dir", help="coordinator folder to create"),
    address: str = typer.Option(..., help="host:port where hospitals reach the coordinator"),
    host: list[str] = typer.Option(
        [], help="extra name or IP in the SuperLink certificate (repeatable)"
    ),
    internal_port: int = typer.Option(
        runtime.INTERNAL_PORT, help="the SuperLink's own port, on loopback only"
    ),
) -> None:
    """Create the federation's CA, the SuperLink certificate and the Flower CLI connection."""
    try:  # every argument checked before anything is written
        name, port = runtime.parse_address(address)
        runtime.check_path(folder, "--dir")
        if not 1 <= internal_port <= 65535 or internal_port == port:
            raise runtime.DeployError(
                f"--internal-port {internal_port}: a port in 1-65535 other than {port}"
            )
        layout = runtime.init_coordinator(folder, [name, *host], internal_port)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    console.print(
        f"CA certificate for the hospitals: {layout.ca}  (keep {layout.ca.parent / 'ca.key'} here)",
        soft_wrap=True,
    )
    console.print(
        f"next: fedseg deploy superlink --dir {shlex.quote(str(folder))} --port {port}",
        soft_wrap=True,
    )


@app.command()
def superlink(
    folder: Path = typer.Option(Path("deployment"), "--dir", help="coordinator folder (init)"),
    host: str = typer.Option("0.0.0.0", help="public listen address (nginx)"),
    port: int = typer.Option(9093, help="public HTTPS port: the Fleet API only"),
    internal_port: int = typer.Option(
        runtime.INTERNAL_PORT, help="the SuperLink's own port, on loopback only"
    ),
    database: Path | None = typer.Option(None, help="SQLite file; registrations survive restarts"),
) -> None:
    """Start the SuperLink on loopback (TLS, SuperNode authentication, no runtime dependency
    installation) and nginx in front of it, forwarding only the Fleet API. Keeps running."""
    layout = runtime.Coordinator(folder.resolve())
    try:
        check_ca_file(layout.ca, "--dir")
        runtime.proxy_config(layout, host, port, internal_port)
        commands = [
            runtime.superlink_command(layout, "127.0.0.1", internal_port, database),
            runtime.proxy_command(layout),
        ]
    except (ValueError, OSError) as err:
        raise fail(f"{err} (a coordinator folder made by fedseg deploy init?)") from None
    env = runtime.environment(layout.flwr_home)
    processes = []
    for command in commands:
        console.print(f"$ {shlex.join(command)}")
        processes.append(subprocess.Popen(command, env=env))
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=30)
    raise typer.Exit(max(abs(p.returncode or 0) for p in processes))


@app.command("node-key")
def node_key(
    folder: Path = typer.Option(..., "--dir", help="where the hospital keeps its SuperNode key"),
    site: str = typer.Option(..., help="site name"),
) -> None:
    """At a hospital: create its SuperNode key pair; send only the .pub file to the coordinator."""
    try:
        check_site_name(site)
        private, public = supernode_keypair(folder, site)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    console.print(f"private key (stays here, mode 600): {private}\npublic key (send it): {public}")


@app.command()
def register(
    public_key: Path = typer.Argument(..., help="a hospital's SuperNode public key (.pub)"),
    site: str = typer.Option(..., help="the hospital's site name, as its SuperNode reports it"),
    folder: Path = typer.Option(Path("deployment"), "--dir", help="coordinator folder (init)"),
) -> None:
    """On the coordinator: admit one hospital's SuperNode and record which site it is."""
    layout = runtime.Coordinator(folder.resolve())
    console.print(
        f"$ FLWR_HOME={layout.flwr_home} {shlex.join(runtime.register_command(public_key))}"
    )
    try:
        node_id = runtime.register_site(layout, public_key, site)
    except ValueError as err:  # RegistryError, or a bad site name
        console.print(f"[red]not registered:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    console.print(f"node {node_id} registered as {site!r} in {layout.registry}")


@app.command()
def supernode(
    superlink_address: str = typer.Option(..., "--superlink", help="SuperLink host:port"),
    ca: Path = typer.Option(..., help="the federation's CA certificate (ca.pem)"),
    private_key: Path = typer.Option(..., help="this SuperNode's private key (node-key)"),
    data_dir: Path = typer.Option(..., help="the site's data folder (test/ = its test split)"),
    key_file: Path = typer.Option(..., help="the site's fedseg secret (fedseg keygen)"),
    site_name: str = typer.Option(..., help="the site's name"),
    out_dir: Path = typer.Option(
        Path("fedseg-site"), help="where the site keeps its AEs, overlays"
    ),
    runtime_port: int = typer.Option(9094, help="local ClientApp API port (one per SuperNode)"),
) -> None:
    """At a hospital: start its SuperNode (TLS to the SuperLink, authenticated by its key)."""
    try:  # before anything starts: a missing or mistyped file or folder is a clear error
        read_key_file(key_file)
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir}: data folder not found")
        check_ca_file(ca)
        if not private_key.is_file():
            raise ValueError(f"--private-key {private_key}: not found (fedseg deploy node-key)")
        runtime.parse_address(superlink_address, "--superlink")
        config = runtime.node_config(
            data_dir.resolve(), key_file.resolve(), site_name, out_dir.resolve()
        )
    except (KeyFileError, ValueError, OSError) as err:
        raise fail(str(err)) from None
    command = runtime.supernode_command(superlink_address, ca, private_key, config, runtime_port)
    _exec(command, runtime.environment())


@app.command()
def run(
    folder: Path = typer.Option(Path("deployment"), "--dir", help="coordinator folder (init)"),
    scenario: Path | None = typer.Option(
        None, help="scenario TOML (its [data] settings apply at every site)"
    ),
    out: Path = typer.Option(Path("results/deployment"), help="results folder on the coordinator"),
    resume: bool = typer.Option(False, help="continue a stopped run from its checkpoints"),
    overwrite: bool = typer.Option(False, help="replace an earlier run in the results folder"),
) -> None:
    """On the coordinator: run the federation on the registered SuperNodes."""
    layout = runtime.Coordinator(folder.resolve())
    if not layout.flwr_home.is_dir():
        raise fail(f"--dir {folder}: not a coordinator folder (fedseg deploy init)")
    if resume and overwrite:
        raise fail("--resume and --overwrite exclude each other: choose one")
    values: dict[str, object] = {"out-dir": str(out.resolve()), "quick": False, "resume": resume}
    values["overwrite"] = overwrite  # the ServerApp refuses a folder holding a run otherwise
    if layout.registry.is_file():  # sites are who the operator registered, not who they say
        values["federation.registry"] = str(layout.registry)
    else:
        console.print(f"[yellow]no {layout.registry}: site names are as the nodes report them")
    if scenario:
        values["scenario"] = str(scenario.resolve())
    command = runtime.run_command(REPO, values)
    console.print(f"$ FLWR_HOME={layout.flwr_home} {shlex.join(command)}")
    env = runtime.environment(layout.flwr_home)
    raise typer.Exit(subprocess.run(command, env=env, cwd=REPO).returncode)
