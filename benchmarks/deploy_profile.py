"""Where a deployed split-training exchange's time goes: a real SuperLink behind nginx and one
SuperNode per hospital (the lock-down test, ``tests/test_deploy.py``, run for more epochs).

Flower 1.41 runs a deployed hospital's ClientApp in a new ``flwr-clientapp`` process for every
message, and its SuperNode asks the SuperLink for work every 3 s while it has none. This runs
the test with every process timed (``benchmarks/profiling/sitecustomize.py``) and splits each
exchange into: the wait until the message's process starts (the SuperNode's poll, the SuperExec
starting the process), the process's own start (Python and Flower), its pull of the task and
the app bundle, loading the ClientApp (imports), the app's call (the handler, the worker call,
the key guard), its reply, and the wait until the server has the reply. Needs root and nginx,
as the test does.

    .venv/bin/python benchmarks/deploy_profile.py --epochs 4 --out results/bench/deploy-profile.json
    .venv/bin/python benchmarks/deploy_profile.py --epochs 4 --set training.finetune_pipeline=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.split_epoch import _override  # noqa: E402
from benchmarks.split_profile import SITE_COMPUTE, read_calls  # noqa: E402

CLIENTAPP = "process.start:flwr-clientapp"
STAGES = {  # label in the log -> the stage it ends
    "pull": "flwr.supernode.runtime.run_clientapp.pull_task_input",
    "bundle": "flwr.cli.install.install_from_fab",
    "call": "flwr.clientapp.client_app.ClientApp.__call__",
    "reply": "flwr.supernode.runtime.run_clientapp.push_message",
}


def message_processes(calls) -> list[dict[str, float]]:
    """Each ClientApp process's stages, in seconds."""
    by_pid: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)
    for label, pid, start, end in calls:
        by_pid[pid].setdefault(label, (start, end))
    out = []
    for seen in by_pid.values():
        if CLIENTAPP not in seen or not all(label in seen for label in STAGES.values()):
            continue
        born = seen[CLIENTAPP][0]
        pull, bundle = seen[STAGES["pull"]], seen[STAGES["bundle"]]
        call, reply = seen[STAGES["call"]], seen[STAGES["reply"]]
        end = seen.get("process.end", (0.0, reply[1]))[1]
        out.append(
            {
                "born": born,
                "ended": end,
                "process start (Python, Flower)": pull[0] - born,
                "task and app bundle": (pull[1] - pull[0]) + (bundle[1] - bundle[0]),
                "loading the ClientApp (imports)": call[0] - bundle[1],
                "the app's call (handler, worker, guard)": call[1] - call[0],
                "reply and exit": end - call[1],
            }
        )
    return out


def breakdown(calls) -> dict:
    processes = message_processes(calls)
    exchanges = sorted(
        (start, end) for label, _, start, end in calls if label == "strategies.common.exchange"
    )
    waits_in, waits_out, lengths = [], [], []
    for start, end in exchanges:
        inside = [p for p in processes if start <= p["born"] <= end]
        if not inside:
            continue
        waits_in.append(min(p["born"] for p in inside) - start)
        waits_out.append(end - max(p["ended"] for p in inside))
        lengths.append(end - start)
    handled = [c for c in calls if c[0] in SITE_COMPUTE]  # in the site workers
    first, last = min(c[2] for c in handled), max(c[3] for c in handled)
    split_exchanges = [e for e in exchanges if e[1] >= first and e[0] <= last]
    median = statistics.median
    stages = [k for k in processes[0] if k not in ("born", "ended")] if processes else []
    return {
        "exchanges": len(lengths),
        "split_training_exchanges": len(split_exchanges),
        "message_processes": len(processes),
        "exchange_s_median": median(lengths),
        "exchange_s_mean": statistics.mean(lengths),
        "per_exchange_s_median": {
            "until the message's process starts (SuperNode poll, SuperExec)": median(waits_in),
            **{k: median([p[k] for p in processes]) for k in stages},
            "until the server has the reply (SuperNode, SuperLink)": median(waits_out),
        },
        "process_s_median": median(p["ended"] - p["born"] for p in processes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log, metrics_file = Path(tmp) / "calls.log", Path(tmp) / "metrics.json"
        hook = str(ROOT / "benchmarks" / "profiling")
        env = {
            **os.environ,
            "FEDSEG_PROFILE_LOG": str(log),
            "FEDSEG_DEPLOY_EPOCHS": str(args.epochs),
            "FEDSEG_DEPLOY_METRICS": str(metrics_file),
            "FEDSEG_DEPLOY_SET": json.dumps(dict(_override(item) for item in args.set)),
            "PYTHONPATH": os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")])),
        }
        load = os.getloadavg()[0]
        test = [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider"]
        done = subprocess.run([*test, "tests/test_deploy.py"], cwd=ROOT, env=env)
        if done.returncode != 0 or not metrics_file.is_file():
            raise SystemExit(f"the deployment test failed (rc {done.returncode})")
        metrics = json.loads(metrics_file.read_text())
        calls = read_calls(log)
    seconds = metrics["timing_s"]["finetuning"]
    result = {
        "command": " ".join(sys.argv),
        "epochs": args.epochs,
        "overrides": args.set,
        "hospitals": len(metrics["sites"]),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "finetuning_s": seconds,
        "seconds_per_epoch": seconds / args.epochs,
        **breakdown(calls),
    }
    result["split_exchanges_per_epoch"] = result["split_training_exchanges"] / args.epochs
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
