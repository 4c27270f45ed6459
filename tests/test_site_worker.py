"""The hospitals' split-training workers (fedseg/site_worker.py): the same numbers as computing
in place, the state saved after the reply and never trained on when it is stale, a stranger
refused, and no worker left behind when its hospitals are done."""

from __future__ import annotations

import os
import signal
import stat
import time
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg import hospital, site_worker
from fedseg.config import demo_config
from fedseg.protocol import FINAL_STEP, SHARE_STEP, FinetuneRequest
from fedseg.site import resolve_site, site_models_path
from fedseg.split_training import BackwardCall, ForwardCall

pytestmark = [
    pytest.mark.skipif(not site_worker.available(), reason="Linux only"),
    pytest.mark.slow,  # each test starts a worker process (torch imports: seconds)
]

EPOCHS = 2
NODE = {"partition-id": 0}


def _site(tmp_path: Path):
    cfg = demo_config(str(tmp_path / "run"))
    cfg.training.finetune_epochs = EPOCHS
    cfg.training.threads = 1
    cfg.data.synthetic_train = 16  # 2 steps an epoch at batch 8
    cfg.data.synthetic_test = 4
    setup = resolve_site(cfg, NODE)
    hospital.register(cfg, setup, False)
    return cfg, setup


def _steps(run, n_steps: int = 2):
    """One epoch, pipelined as the demo runs it: (latents, grads) of every step."""
    first = run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 0, start=True)), 1)
    latents, out, owed = first.latents, [], None
    for step in range(n_steps):
        request = FinetuneRequest(0, EPOCHS, step)
        if owed is not None:
            request.grad_epoch, request.grad_step = 0, step - 1
        request.next_step = step + 1 if step + 1 < n_steps else None
        mapped = {k.replace("image", "mask"): v for k, v in latents.items()}
        answer = run("finetune_backward", BackwardCall(request, mapped, owed=owed))
        grad, loss, latents_next = answer.grad, answer.loss, answer.latents
        out.append((latents, grad, loss))
        owed = {k.replace("mask", "image"): v for k, v in grad.items()}
        latents = latents_next
    return out, owed


def _in_place(cfg, setup):
    return lambda fn, *a, **k: getattr(hospital, fn)(cfg, setup, *a, **k)


def _in_worker(cfg, setup):
    folder, slot, threads = site_worker.placement(cfg, NODE, setup.out_dir)
    return lambda fn, *a, **k: site_worker.call(folder, slot, fn, cfg, NODE, *a, threads=1, **k)


def _workers(under: Path) -> list[int]:
    """Live worker processes whose folder is under ``under``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                zombie = "zombie" in (entry / "status").read_text()
            except OSError:
                continue
            if not zombie and b"fedseg.site_worker" in cmd:
                if any(arg.startswith(str(under).encode()) for arg in cmd):
                    found.append(int(entry.name))
    return found


def _pid(folder: Path, slot: str) -> int:
    pids = _workers(folder)
    assert pids, f"no worker for {folder}"
    return pids[0]


@pytest.fixture(autouse=True)
def _no_worker_left(tmp_path):
    """A test that leaves its worker mid-run stops it (a run's end would)."""
    yield
    for pid in _workers(tmp_path):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int) -> None:
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 10
    while status.exists() and time.monotonic() < deadline:
        try:
            if "zombie" in status.read_text():
                return
        except OSError:
            return
        time.sleep(0.05)
    assert not status.exists(), f"worker {pid} still running"


def test_worker_computes_what_the_site_computes_in_place(tmp_path):
    cfg, setup = _site(tmp_path / "a")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker does: the thread count changes the last bits
    try:
        here, _ = _steps(_in_place(cfg, setup))
    finally:
        torch.set_num_threads(threads)
    cfg_w, setup_w = _site(tmp_path / "b")
    there, _ = _steps(_in_worker(cfg_w, setup_w))
    for (lat_a, grad_a, loss_a), (lat_b, grad_b, loss_b) in zip(here, there, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        for name in grad_a:
            np.testing.assert_allclose(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-7)
        for name in lat_a:
            np.testing.assert_array_equal(lat_a[name], lat_b[name])


def test_state_saved_after_the_reply_and_a_stale_state_refused(tmp_path):
    cfg, setup = _site(tmp_path)
    folder, slot, _ = site_worker.placement(cfg, NODE, setup.out_dir)
    run = _in_worker(cfg, setup)
    state = hospital.finetune_state_path(setup)
    marker = state.with_name(state.name + ".unsaved")
    _steps(run)
    # The worker replied before saving: the file is behind, and the marker says so ...
    assert marker.exists()
    assert stat.S_IMODE(os.stat(folder / "worker.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0
    # ... until it has been idle for a moment.
    deadline = time.monotonic() + 10
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marker.exists()
    # Another step, then the worker dies before it saves: the next worker must not go on
    # from the older state on disk.
    request = FinetuneRequest(0, EPOCHS, 0)
    mapped = {
        k.replace("image", "mask"): v
        for k, v in run("finetune_forward", ForwardCall(request), 1).latents.items()
    }
    run("finetune_backward", BackwardCall(request, mapped))
    assert marker.exists()
    pid = _pid(folder, slot)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    time.sleep(1.0)  # a zombie's socket can take a moment to read as closed
    with pytest.raises(RuntimeError, match="was not saved after its last step"):
        run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 1)), 1)


def test_errors_come_back_as_their_kind_and_the_worker_goes_on(tmp_path):
    cfg, setup = _site(tmp_path)
    run = _in_worker(cfg, setup)
    run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 0, start=True)), 1)
    with pytest.raises(ValueError, match="outside"):
        run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 99)), 1)
    assert run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 0)), 1).latents


def test_a_stranger_without_the_key_is_refused(tmp_path):
    cfg, setup = _site(tmp_path)
    folder, slot, _ = site_worker.placement(cfg, NODE, setup.out_dir)
    run = _in_worker(cfg, setup)
    run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 0, start=True)), 1)
    key = (folder / "worker.key").read_bytes()
    with pytest.raises(Exception, match="digest"):
        Client(site_worker.address(folder, slot, key), family="AF_UNIX", authkey=b"x" * 32)
    assert run(
        "finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, 0)), 1
    ).latents  # still serving
    with pytest.raises(ValueError, match="runs"):
        site_worker.call(folder, slot, "segment", cfg, NODE)


def test_the_worker_exits_when_its_hospitals_are_done(tmp_path):
    cfg, setup = _site(tmp_path)
    folder, slot, _ = site_worker.placement(cfg, NODE, setup.out_dir)
    run = _in_worker(cfg, setup)
    _, owed = _steps(run)
    pid = _pid(folder, slot)
    share = FinetuneRequest(0, EPOCHS, SHARE_STEP)
    share.share_epoch = 0
    share.grad_epoch, share.grad_step = 0, 1
    assert run("finetune_forward", ForwardCall(share, grad=owed), 1).blinded is not None
    assert run("finetune_forward", ForwardCall(FinetuneRequest(0, EPOCHS, FINAL_STEP)), 1).done
    _wait_gone(pid)
    # The fine-tuned models are the site's now, and no state is left to resume from.
    assert not hospital.finetune_state_path(setup).exists()


ONE_MESSAGE = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
from clients.app import app
from fedseg import protocol
from fedseg.protocol import FinetuneRequest

node, scenario, kind = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind == "train.autoencoders":  # registration
    content = RecordDict({protocol.CONFIG: ConfigRecord({"reuse": False})})
else:
    request = FinetuneRequest(0, 2, 0, start=True)
    content = RecordDict({protocol.REQUEST: ConfigRecord(request.to_config())})
message = Message(content, dst_node_id=1, message_type=kind)
reply = app(message, Context(1, 1, node, RecordDict(), {"scenario": scenario}))
ok = not reply.has_error()
print(json.dumps({
    "error": None if ok else reply.error.reason,
    "latents": sorted(reply.content.array_records.get(protocol.LATENTS, {}).keys()) if ok else [],
    "site": dict(reply.content.config_records.get(protocol.SITE, {})) if ok else {},
    "heavy": sorted(m for m in ("torch", "monai") if m in sys.modules),
}))
"""


def test_a_deployed_message_process_hands_the_step_to_the_worker_without_torch(tmp_path):
    """Flower starts a deployed hospital's ClientApp in a new process for every message. For
    its registration and a split step that process only decodes, calls the hospital's worker
    and checks the reply, so it must not import torch or MONAI (4 of its 6 s per message
    before) nor load the site's data; the worker computes, and the key guard still checks what
    leaves."""
    import json
    import subprocess
    import sys

    import tomli_w

    from fedseg.privacy.keys import write_key_file
    from tests.helpers import blind_config, write_site_data

    root = Path(__file__).resolve().parents[1]
    write_site_data(tmp_path / "data", 0)
    cfg = blind_config(tmp_path / "ignored", sites=1, epochs=2)
    cfg.data.kind, cfg.data.path = "pairs", str(tmp_path / "data")
    cfg.training.threads = 1
    values = cfg.validate().to_dict()
    del values["out_dir"], values["resume"]
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(tomli_w.dumps(values))
    node = {
        "data-dir": str(tmp_path / "data"),
        "key-file": str(write_key_file(tmp_path / "federation.key")),
        "site-name": "hospital-a",
        "out-dir": str(tmp_path / "out"),
    }

    def one_message(kind: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", ONE_MESSAGE, json.dumps(node), str(scenario), kind],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reply = json.loads(done.stdout.strip().splitlines()[-1])
        assert reply["error"] is None, reply["error"]
        assert reply["heavy"] == [], f"the {kind} process imported {reply['heavy']}"
        return reply

    # Registration too: the worker loads the data and torch it will train with.
    assert one_message("train.autoencoders")["site"]["site"] == "hospital-a"
    assert _workers(tmp_path / "out"), "no site worker registered the hospital"
    assert site_models_path(tmp_path / "out", "hospital-a").is_file()
    reply = one_message("train.finetune_forward")
    assert reply["latents"] and all(k.startswith("image") for k in reply["latents"]), reply
