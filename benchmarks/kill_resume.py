"""Kill runs mid-write, then check every file they left and resume them to the end.

    .venv/bin/python benchmarks/kill_resume.py --out results/bench/kill-resume.json

For each scenario (the default mode, and the paper preset, which writes a checkpoint every UMN
round and, here, an audit copy of every payload), a ``fedseg run`` is started and killed with
SIGKILL (the whole process tree: driver, Ray, site workers) at a few moments; after each kill
every file in the results folder is read back (torch checkpoints, ``.npz`` audit copies, JSON,
figures, key files) and any temporary file left behind is counted; then the run is resumed
with ``--resume``, killed again later, and finally resumed to the end. What is reported: torn
files, leftover temporaries, and whether the last resume finished with its metrics.

Runs a few minutes on 2 cores; run it with nothing else heavy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS = {
    "default": """
name = "kill-default"
[data]
kind = "synthetic"
synthetic_train = 16
synthetic_test = 4
[model]
image_size = 64
[training]
finetune_epochs = 30
[baselines]
centralized_unet = false
local_unet = false
""",
    "paper": """
name = "kill-paper"
preset = "paper"
[data]
kind = "synthetic"
synthetic_train = 16
synthetic_test = 4
[model]
image_size = 64
[training]
ae_epochs = 20
umn_rounds = 6
umn_epochs_per_round = 4
[privacy]
audit_dir = "AUDIT"
[baselines]
centralized_unet = false
local_unet = false
""",
}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read before a kill: orphans lose their parent link)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def check_files(folder: Path) -> dict:
    """Read back everything a killed run left; return what was torn or left over."""
    import torch
    from PIL import Image

    torn, temps, checked = [], [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith((".tmp", ".log")) or ".tmp." in name or name.startswith(".tmp"):
            if not name.endswith(".log"):
                temps.append(str(path.relative_to(folder)))
            continue
        try:
            if path.suffix == ".pt":
                torch.load(path, weights_only=True)
            elif path.suffix == ".npz":
                with np.load(path) as data:
                    for key in data.files:
                        data[key]
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.verify()
            elif path.name == "worker.key":  # the site workers' 32 random bytes
                if len(path.read_bytes()) != 32:
                    raise ValueError("not 32 bytes")
            elif path.suffix == ".key":
                if not path.read_text().startswith("fedseg-secret-v1:"):
                    raise ValueError("not a key")
            elif path.suffix in (".md", ".config") and path.stat().st_size == 0:
                raise ValueError("empty")
            checked += 1
        except Exception as err:  # a torn file, whatever its kind
            torn.append(f"{path.relative_to(folder)}: {type(err).__name__}")
    return {"checked": checked, "torn": torn, "temporaries": temps}


def run(config: Path, out: Path, resume: bool, log: Path) -> subprocess.Popen:
    command = [str(ROOT / ".venv/bin/fedseg"), "run", "--config", str(config), "--out", str(out)]
    command += ["--no-baselines", "--resume" if resume else "--no-resume"]
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def scenario(name: str, text: str, kills: list[float], work: Path) -> dict:
    out = work / name
    config = work / f"{name}.toml"
    config.write_text(text.replace("AUDIT", str(work / f"{name}-audit")))
    log = work / f"{name}.log"
    events = []
    for i, after in enumerate(kills):
        proc = run(config, out, resume=i > 0, log=log)
        time.sleep(after)
        finished = proc.poll() is not None
        if not finished:
            kill_tree(proc)
        files = check_files(out)
        audit = work / f"{name}-audit"
        if audit.exists():
            audit_files = check_files(audit)
            files["checked"] += audit_files["checked"]
            files["torn"] += audit_files["torn"]
            files["temporaries"] += audit_files["temporaries"]
        events.append({"killed_after_s": after, "finished_before_kill": finished, **files})
        print(name, events[-1], flush=True)
    proc = run(config, out, resume=True, log=log)
    rc = proc.wait()
    metrics = out / "metrics.json"
    final = check_files(out)
    dice = json.loads(metrics.read_text())["mean"]["dice"] if metrics.is_file() else None
    result = {
        "events": events,
        "final_rc": rc,
        "final_metrics": metrics.is_file(),
        "final_dice": dice,
        "final_files": final,
        "log_tail": log.read_text(errors="replace")[-600:],
    }
    print(name, {k: v for k, v in result.items() if k != "log_tail"}, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=float, nargs="+", default=[25, 40, 30, 45])
    parser.add_argument(
        "--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS)
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            text = SCENARIOS[name]
            results[name] = scenario(name, text, args.kills, Path(tmp))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
