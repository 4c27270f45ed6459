"""Times a few functions in every process of a run (the server, Ray's actors or a deployed
node's one-message ClientApp processes, the site workers) for benchmarks/split_profile.py and
benchmarks/deploy_profile.py: each call appends ``label pid start end`` to
``$FEDSEG_PROFILE_LOG``, and each process its start (``process.start:<program>``) and end.
Python imports this file at start-up when its folder is on PYTHONPATH; without that variable
it does nothing."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import time

LOG = os.environ.get("FEDSEG_PROFILE_LOG", "")
TIMED = {
    "strategies.common": [("", "exchange")],
    "clients.app": [
        ("Hospital", "finetune_forward"),
        ("Hospital", "finetune_backward"),
        ("Hospital", "outgoing_guard"),
    ],
    "fedseg.hospital": [("", "finetune_forward"), ("", "finetune_backward")],
    "fedseg.coordinator": [
        ("Coordinator", "finetune_map"),
        ("Coordinator", "finetune_backward"),
    ],
    "fedseg.checkpoint": [("", "save_private")],
    # a deployed node's ClientApp process (flwr-clientapp): its task, FAB, app call and reply
    "flwr.supernode.runtime.run_clientapp": [("", "pull_task_input"), ("", "push_message")],
    "flwr.cli.install": [("", "install_from_fab")],
    "flwr.clientapp.client_app": [("ClientApp", "__call__")],
}


def _timed(owner: object, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return inner(*args, **kwargs)
        finally:
            with open(LOG, "a") as out:
                out.write(f"{label} {os.getpid()} {start:.6f} {time.time():.6f}\n")

    setattr(owner, name, wrapper)


class _TimingFinder(importlib.abc.MetaPathFinder):
    """Wraps the listed functions as their modules finish importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TIMED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            for cls, name in TIMED[fullname]:
                owner = getattr(module, cls) if cls else module
                _timed(owner, name, f"{fullname}.{cls + '.' if cls else ''}{name}")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _log_process() -> None:
    """The process's start (about when Python started: this runs at start-up) and its end."""
    import atexit

    started = time.time()
    argv = sys.orig_argv
    program = os.path.basename(argv[1] if len(argv) > 1 else argv[0]).replace(" ", "_")
    with open(LOG, "a") as out:
        out.write(f"process.start:{program} {os.getpid()} {started:.6f} {started:.6f}\n")

    def end() -> None:
        with open(LOG, "a") as out:
            out.write(f"process.end {os.getpid()} {started:.6f} {time.time():.6f}\n")

    atexit.register(end)


if LOG:
    sys.meta_path.insert(0, _TimingFinder())
    _log_process()
