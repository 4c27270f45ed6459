"""A long-lived process per hospital (or per slot of simulated hospitals) that keeps the
split-training state in memory and answers the training steps.

Why: Flower runs each message's ClientApp wherever it can. A simulation hands it to any free
Ray actor (a hospital moving to another actor reloaded its state from disk), and a deployed
SuperNode starts a fresh ``flwr-clientapp`` process per message (4 s of imports here). So every
step paid a save of the site's state before replying, a reload, and in a simulation the sites
ran one after another in one actor. A worker keeps each of its hospitals' fine-tuners, saves
the state *after* it has replied (while the server computes), and the simulated hospitals'
workers run side by side on the machine's cores.

The ClientApp stays the only thing that talks to the server: it decodes a message, calls the
worker over a local socket and encodes the reply, through the same guard as before. The worker
listens on an abstract Unix socket (Linux), and answers only a peer that proves it holds the
run's worker key (``multiprocessing.connection``'s HMAC challenge, before anything is
unpickled); the key file is 0600 in the run's ``workers/`` folder, beside the site's other
private files. It runs only the split-training functions of ``fedseg.hospital``, and exits
after ``IDLE_S`` without a call.

A worker that dies between its reply and its save would leave the state on disk one step
behind what the server believes: a marker written before the reply and removed after the
save makes the next worker refuse that state (the site drops out of split training) instead of
training on silently from a stale step.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from fedseg.atomic import write_bytes_atomic
from fedseg.data.dataset import DataError
from fedseg.privacy.keys import KeyFileError
from fedseg.protocol import FINAL_STEP

log = logging.getLogger("fedseg.worker")

IDLE_S = 60.0  # a worker with no call for this long exits (a run that stopped early)
SAVE_WHEN_IDLE_S = 1.0  # owed saves run once no call has come for this long
START_TIMEOUT_S = 120.0  # how long a caller waits for a new worker to listen
# What a worker runs (fedseg.hospital): a hospital's registration (when split training
# follows) and its split-training steps.
CALLS = ("register", "ckks_keys", "finetune_forward", "finetune_backward")
# Errors a worker passes back as themselves (the nearest of them); anything else arrives as a
# RuntimeError. fedseg's own keep their names, which the server's log shows.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e
    for e in (
        DataError,
        KeyFileError,
        ValueError,
        PermissionError,
        RuntimeError,
        KeyError,
        TypeError,
    )
}


class WorkerError(RuntimeError):
    """The worker could not be started or reached."""


def available() -> bool:
    """Abstract Unix sockets are Linux's; elsewhere the ClientApp computes in its own process."""
    return sys.platform.startswith("linux")


def slots(cfg: Any) -> int:
    """How many workers a simulation's hospitals share (0 = none: each message computes in
    the process Flower runs it in). Auto (-1): one per hospital up to 4, so a few hospitals
    run side by side and many do not start a process each."""
    wanted = cfg.federation.site_workers
    if not available() or wanted == 0:
        return 0
    return min(cfg.federation.num_sites, 4 if wanted < 0 else wanted)


# Image size from which the server's UMN splits well over threads (docs/performance.md "Time to
# Dice"): on 2 cores a second thread took us-nerve's UMN (128 px) from 1.90 to 1.30 s an epoch,
# while at 64 px (the demo) it cost more than it gave (353 -> 423 ms an epoch).
SERVER_THREADS_FROM_PX = 128


def cores_left(cfg: Any) -> int:
    """Torch threads for the server of a simulation whose hospitals' workers share its cores.
    A split step alternates (the sites wait while the server maps and steps, and the server
    while they decode), so the server may take the run's threads, where its maps are large
    enough to gain from a second one; else one."""
    if slots(cfg) == 0 or cfg.model.image_size >= SERVER_THREADS_FROM_PX:
        return cfg.training.threads
    return 1


def placement(cfg: Any, node_config: dict, out_dir: Path) -> tuple[Path, str, int] | None:
    """(workers folder, slot, torch threads) of a node's worker, or None to compute in place.
    A deployed hospital has one worker; simulated hospitals share ``slots(cfg)`` of them, each
    always the same one (its fine-tuner stays in memory), the cores split between them."""
    count = slots(cfg)
    if count == 0:
        return None
    folder = out_dir / "sites" / ".workers"
    if "partition-id" not in node_config:
        return folder, "site", cfg.training.threads
    cores = os.cpu_count() or 1
    slot = f"w{int(node_config['partition-id']) % count}"
    return folder, slot, max(1, cores // count)


def address(folder: Path, slot: str, key: bytes) -> str:
    """The abstract socket name of a worker: one per (workers folder, slot, key), so a folder
    made again (a new key) never reaches a worker left from the old one."""
    digest = hashlib.sha256(f"{folder.resolve()}/{slot}/".encode() + key).hexdigest()[:32]
    return f"\0fedseg-worker-{digest}"


def _authkey(folder: Path) -> bytes:
    """The run's worker key: made once (whole, 0600, never replaced), read by the callers and
    the workers."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "worker.key"
    if not path.is_file():
        with contextlib.suppress(FileExistsError):  # another caller made it first
            write_bytes_atomic(path, secrets.token_bytes(32), mode=0o600, replace=False)
    return path.read_bytes()


def call(
    folder: Path,
    slot: str,
    fn: str,
    cfg: Any,
    node_config: dict,
    *args: Any,
    threads: int = 1,
    **kwargs: Any,
) -> Any:
    """Run ``fedseg.hospital.<fn>(cfg, setup, *args)`` in the slot's worker, starting it if
    none listens; the worker resolves the site from ``node_config`` itself (its data stays
    loaded there, instead of travelling with every call)."""
    if fn not in CALLS:
        raise ValueError(f"a site worker runs {CALLS}, not {fn!r}")
    key = _authkey(folder)
    name = address(folder, slot, key)
    request = (fn, cfg, node_config, args, kwargs)
    conn = _CONNECTIONS.pop(name, None)
    try:
        if conn is None or conn.poll(0):  # a worker sends nothing unasked: readable = closed
            raise OSError
        _send(conn, request)
    except OSError:  # none yet, or the worker behind it has gone: a new one (not sent yet)
        conn = _connect(folder, slot, key, threads)
        _send(conn, request)
    try:
        status, value = _recv(conn)
    except (EOFError, OSError) as err:
        conn.close()
        raise WorkerError(
            f"the site worker stopped during {fn} (its log: {folder / f'{slot}.log'})"
        ) from err
    _CONNECTIONS[name] = conn
    if status == "ok":
        return value
    kind, message = value
    raise _ERRORS.get(kind, RuntimeError)(message)


_CONNECTIONS: dict[str, Any] = {}  # this process's open connection to each worker


def _send(conn, obj: Any) -> None:
    """Plain pickle, by value: ``Connection.send`` would hand torch tensors over as shared
    memory through multiprocessing's resource sharer, which only its own children can reach."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _kind(err: Exception) -> str:
    """The nearest error type a caller re-raises as itself (a WireError is a ValueError)."""
    return next((c.__name__ for c in type(err).__mro__ if c.__name__ in _ERRORS), "RuntimeError")


def _connect(folder: Path, slot: str, key: bytes, threads: int):
    name = address(folder, slot, key)
    try:
        return Client(name, family="AF_UNIX", authkey=key)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    with open(folder / f".{slot}.start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one caller starts it; the others wait for it
        try:
            return Client(name, family="AF_UNIX", authkey=key)
        except (ConnectionRefusedError, FileNotFoundError):
            _start(folder, slot, threads)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return Client(name, family="AF_UNIX", authkey=key)
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"the site worker did not start within {START_TIMEOUT_S:.0f} s "
                        f"(its log: {folder / f'{slot}.log'})"
                    ) from None
                time.sleep(0.05)


def _start(folder: Path, slot: str, threads: int) -> None:
    logfile = open(folder / f"{slot}.log", "ab")  # noqa: SIM115 (the child keeps it)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}
    subprocess.Popen(
        [sys.executable, "-m", "fedseg.site_worker", str(folder), slot, "--threads", str(threads)],
        stdin=subprocess.DEVNULL,
        stdout=logfile,
        stderr=logfile,
        start_new_session=True,  # outlives a deployed node's one-message process
        env=env,
    )
    logfile.close()


def serve(folder: Path, slot: str, threads: int = 1, idle_s: float = IDLE_S) -> None:
    """Answer calls until ``idle_s`` passes without one. Each caller process keeps its
    connection; calls run one at a time."""
    import torch

    from fedseg import hospital
    from fedseg.site import resolve_site

    torch.set_num_threads(threads)
    key = _authkey(folder)
    listener = Listener(address(folder, slot, key), family="AF_UNIX", authkey=key)
    state = _WorkerState(hospital, resolve_site)
    threading.Thread(target=state.watch, args=(idle_s,), daemon=True).start()
    log.info("worker %s listening (%d threads)", slot, threads)
    while True:
        try:
            conn = listener.accept()
        except Exception:  # a peer without the key, or one that hung up: not a reason to stop
            log.warning("refused a connection", exc_info=True)
            continue
        threading.Thread(target=state.serve_connection, args=(conn,), daemon=True).start()


class _WorkerState:
    """What a worker's threads share: one call at a time, and the saves still owed."""

    def __init__(self, hospital, resolve_site) -> None:
        self.hospital = hospital
        self.resolve_site = resolve_site
        self.busy = threading.Lock()
        self.pending = hospital.PendingSaves()
        self.last = time.monotonic()
        self.sites: set[str] = set()  # the hospitals it serves that have not finished

    def watch(self, idle_s: float) -> None:
        """Save what is owed once nothing has come for a second; exit after ``idle_s``."""
        while True:
            time.sleep(0.5)
            with self.busy:
                quiet = time.monotonic() - self.last
                if self.pending and quiet > SAVE_WHEN_IDLE_S:
                    self._save_owed()
                if quiet > idle_s:
                    log.info("idle for %.0f s: exiting", idle_s)
                    os._exit(0)

    def serve_connection(self, conn) -> None:
        with conn:
            while True:
                try:
                    fn, cfg, node_config, args, kwargs = _recv(conn)
                except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                    return
                with self.busy:
                    reply = self._run(fn, cfg, node_config, args, kwargs)
                    try:
                        _send(conn, reply)
                    except OSError:
                        log.warning("the caller hung up before the reply to %s", fn)
                    if self.pending.urgent:  # an epoch ended: its state goes to disk now
                        self._save_owed()
                    self.last = time.monotonic()
                    if self._finished(fn, node_config, args):
                        log.info("its hospitals have finished split training: exiting")
                        os._exit(0)

    def _save_owed(self) -> None:
        """A failed save (a full disk) is logged, not fatal: its marker stays, so a later
        worker refuses that state instead of using an older one."""
        try:
            self.pending.run()
        except Exception:
            log.error("saving the split-training state failed", exc_info=True)

    def _finished(self, fn: str, node_config: dict, args: tuple) -> bool:
        """Whether the last of its hospitals has just had its final step (the run's end)."""
        site = repr(sorted(node_config.items()))
        self.sites.add(site)
        call = args[0] if args else None
        request = getattr(call, "request", None)
        if fn == "finetune_forward" and getattr(request, "step", None) == FINAL_STEP:
            self.sites.discard(site)
            return not self.sites and not self.pending
        return False

    def _run(self, fn, cfg, node_config, args, kwargs) -> tuple[str, Any]:
        try:
            if fn not in CALLS:
                raise ValueError(f"not a worker call: {fn!r}")
            setup = self.resolve_site(cfg, node_config)
            with self.hospital.deferred_saves(self.pending):
                return "ok", getattr(self.hospital, fn)(cfg, setup, *args, **kwargs)
        except Exception as err:
            log.error("%s failed", fn, exc_info=True)
            return "error", (_kind(err), str(err))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedseg site worker (started by the ClientApp)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("slot")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--idle", type=float, default=IDLE_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.folder, args.slot, args.threads, args.idle)


if __name__ == "__main__":
    main()
