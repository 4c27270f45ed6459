"""Where a split-training epoch's time goes, end to end through Flower and Ray.

Runs a scenario's split training (no baselines) with a few functions timed in every process
(``benchmarks/profiling/sitecustomize.py``: the server's exchanges and UMN steps, the
ClientApp's handlers and key guard, the site workers' compute and state saves), then splits
each epoch's wall-clock, on the critical path, into:

- sites' compute: encoder, decoder and their steps (per exchange, the slowest site);
- server's UMN compute: its forward, backward and optimizer steps;
- server bookkeeping: the rest of the server's time between two exchanges (records, checks);
- key guard: the outgoing check of the slowest site's reply;
- site call: the ClientApp handler beyond the compute (decoding, the call to the site
  worker, encoding);
- Flower and Ray messaging: from the server's push to the handler's start, and from the
  handler's end to the reply's pull (Flower's simulation polls for new messages every 100 ms).

State saves happen in the site workers after the reply is sent; their time is shown beside.
The first epoch (registration, worker start-up) is left out of the split and timed apart
(``start_up``: when the hospitals' registrations and their first batches came back).

    .venv/bin/python benchmarks/split_profile.py --config simulations/scenarios/us-nerve.toml \\
        --epochs 8 --out results/bench/profile-us-nerve.json
    .venv/bin/python benchmarks/split_profile.py --epochs 10 --set training.finetune_pipeline=false
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Call = tuple[str, int, float, float]  # label, pid, start, end

SITE_HANDLERS = ("clients.app.Hospital.finetune_forward", "clients.app.Hospital.finetune_backward")
SITE_COMPUTE = ("fedseg.hospital.finetune_forward", "fedseg.hospital.finetune_backward")
UMN = (
    "fedseg.coordinator.Coordinator.finetune_map",
    "fedseg.coordinator.Coordinator.finetune_backward",
)
GUARD = "clients.app.Hospital.outgoing_guard"
EXCHANGE = "strategies.common.exchange"
SAVE = "fedseg.checkpoint.save_private"


def read_calls(path: Path) -> list[Call]:
    calls = []
    for line in path.read_text().splitlines():
        label, pid, start, end = line.split()
        calls.append((label, int(pid), float(start), float(end)))
    return calls


def _within(calls: list[Call], labels: tuple[str, ...], start: float, end: float) -> list[Call]:
    return [c for c in calls if c[0] in labels and c[2] >= start and c[3] <= end + 1e-3]


def start_up(calls: list[Call]) -> dict:
    """Seconds from the run's start (its first process) to the hospitals' registration replies
    and to the end of split training's first exchange (the sites' first batch: their workers
    started, data loaded), and how long those two exchanges took."""
    begin = min(c[2] for c in calls)
    exchanges = sorted((c for c in calls if c[0] == EXCHANGE), key=lambda c: c[2])
    registration, first = exchanges[0], exchanges[1]
    return {
        "registered_at_s": registration[3] - begin,
        "registration_s": registration[3] - registration[2],
        "first_batch_at_s": first[3] - begin,
        "first_exchange_s": first[3] - first[2],
    }


def breakdown(calls: list[Call], epochs: int) -> dict:
    """Milliseconds an epoch on the critical path, by part, over epochs 2..``epochs``."""
    handlers = sorted(c[2] for c in calls if c[0] in SITE_HANDLERS)
    first, last = handlers[0], max(c[3] for c in calls if c[0] in SITE_HANDLERS)
    exchanges = sorted(
        (c for c in calls if c[0] == EXCHANGE and c[3] >= first and c[2] <= last),
        key=lambda c: c[2],
    )
    exchanges = exchanges[len(exchanges) // epochs :]  # leave the first epoch out
    parts: dict[str, float] = defaultdict(float)
    for i, (_, _, start, end) in enumerate(exchanges):
        handled = _within(calls, SITE_HANDLERS, start, end)
        if not handled:
            continue
        compute = _within(calls, SITE_COMPUTE, start, end)
        guards = _within(calls, (GUARD,), start, end)
        slowest = max(handled, key=lambda c: c[3] - c[2])
        site_compute = max((c[3] - c[2] for c in compute), default=0.0)
        guard = max((g[3] - g[2] for g in guards), default=0.0) - (slowest[3] - slowest[2])
        parts["sites' compute"] += site_compute
        parts["site call (decode, worker call, encode)"] += slowest[3] - slowest[2] - site_compute
        parts["key guard"] += max(guard, 0.0)
        messaging = (end - start) - (slowest[3] - slowest[2]) - max(guard, 0.0)
        parts["Flower and Ray messaging"] += messaging
        if i + 1 < len(exchanges):
            gap_end = exchanges[i + 1][2]
            umn = sum(c[3] - c[2] for c in _within(calls, UMN, end, gap_end))
            parts["server's UMN compute"] += umn
            parts["server bookkeeping"] += gap_end - end - umn
    counted = epochs - 1
    wall = exchanges[-1][2] - exchanges[0][2]
    saves = [c for c in calls if c[0] == SAVE and first <= c[2] <= last]
    ms = {k: 1000 * v / counted for k, v in parts.items()}
    total = sum(ms.values())
    compute = ms["sites' compute"] + ms["server's UMN compute"]
    return {
        "epochs_counted": counted,
        "exchanges_per_epoch": len(exchanges) / counted,
        "ms_per_epoch": ms,
        "ms_per_epoch_total": total,
        "wall_ms_per_epoch": 1000 * wall / counted,
        "non_compute_share": 1 - compute / total if total else None,
        "state_saves_ms_per_epoch": 1000 * sum(c[3] - c[2] for c in saves) / counted,
    }


def run(args: argparse.Namespace, log: Path) -> None:
    from benchmarks.split_epoch import _override
    from fedseg.config import apply_overrides, demo_config, load_config
    from simulations.engine import simulate

    cfg = load_config(args.config) if args.config else demo_config()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = str(Path(tmp) / "run")
        cfg.training.finetune_epochs = args.epochs
        cfg.baselines.centralized_unet = cfg.baselines.local_unet = cfg.baselines.unet3d = False
        apply_overrides(cfg, dict(_override(item) for item in args.set))
        load = os.getloadavg()[0]
        simulate(cfg.validate())
        metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    result = {
        "command": " ".join(sys.argv),
        "scenario": cfg.name,
        "pipeline": cfg.training.finetune_pipeline,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "seconds_per_epoch": metrics["timing_s"]["finetuning"] / args.epochs,
        **breakdown(read_calls(log), args.epochs),
        "start_up": start_up(read_calls(log)),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="scenario TOML (default: the embedded demo)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is left out)")
    if os.environ.get("FEDSEG_PROFILE_LOG"):
        run(args, Path(os.environ["FEDSEG_PROFILE_LOG"]))
        return
    # Again, with the timing hook on PYTHONPATH, so that Ray's actors and the site workers
    # load it too.
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
        pass
    hook = str(Path(__file__).resolve().parent / "profiling")
    env = {
        **os.environ,
        "FEDSEG_PROFILE_LOG": log.name,
        "PYTHONPATH": os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")])),
    }
    try:
        raise SystemExit(subprocess.call([sys.executable, *sys.argv], env=env))
    finally:
        os.unlink(log.name)


if __name__ == "__main__":
    main()
