"""Wall time per UMN round and peak memory as the federation grows (N synthetic hospitals).

Each N runs the whole pipeline through the CLI in its own process (Ray started and stopped
with it) at fixed data per hospital; a sampler sums the resident memory of that process and
all its descendants (Ray's GCS, raylet and workers) every ``--sample-s`` seconds. A round is
one UMN round: the server asks every hospital for one fresh augmented pass of its training
latents (``federation.round_items = -1``) and trains the UMN on everything it holds. The script
fits time per round against N (least squares) and the exponent of a power law (log-log slope:
1 = linear).

    .venv/bin/python benchmarks/scale.py                                 # N = 3, 10, 25, 50
    .venv/bin/python benchmarks/scale.py --scenario simulations/scenarios/fifty-synthetic.toml

Resident memory summed over processes counts pages they share (e.g. Ray's object store) more
than once, so the peak is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tomli_w

FEDSEG = [sys.executable, "-m", "fedseg.cli", "run", "--no-baselines", "--no-verbose"]


def scale_scenario(n: int, train: int, test: int, rounds: int, ae_epochs: int) -> dict:
    """N hospitals of one synthetic style family, fixed data each, 64 px, tiny budgets."""
    return {
        "name": f"scale-{n}",
        "data": {"kind": "synthetic", "synthetic_train": train, "synthetic_test": test},
        "federation": {"round_timeout_s": 600.0, "node_wait_s": 300.0},
        "model": {"image_size": 64},
        "training": {
            "ae_epochs": ae_epochs,
            "augment_copies": 1,
            "umn_rounds": rounds,
            "umn_epochs_per_round": 1,
            "threads": 1,
        },
        "baselines": {"centralized_unet": False, "local_unet": False},
        "hospitals": [{"name": "site", "count": n}],
    }


class TreeMemory:
    """Peak summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(toml: Path, out: Path, sample_s: float) -> dict:
    """Run one scenario through the CLI; wall time, peak tree memory and per-round times."""
    started = time.perf_counter()
    proc = subprocess.Popen([*FEDSEG, "--config", str(toml), "--out", str(out)])
    memory = TreeMemory(proc.pid, sample_s)
    code = proc.wait()
    peak = memory.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{toml}: fedseg run exited with {code}")
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics.get("rounds") or []
    per_round = [r["participation"] + r["umn"] for r in rounds]
    drops = sum(len(r.get("dropped") or []) for r in rounds)
    return {
        "sites": len(metrics["sites"]),
        "wall_s": wall,
        "peak_rss_gib": peak / 2**30,
        "round_s": float(np.mean(per_round)) if per_round else float("nan"),
        "participation_s": float(np.mean([r["participation"] for r in rounds] or [np.nan])),
        "umn_s": float(np.mean([r["umn"] for r in rounds] or [np.nan])),
        "autoencoders_s": metrics["timing_s"].get("autoencoders", float("nan")),
        "dice": (metrics.get("mean") or {}).get("dice"),
        "round_drops": drops,
    }


def fit(ns: list[int], times: list[float]) -> tuple[float, float, float]:
    """(seconds per extra hospital, intercept, log-log exponent)."""
    slope, intercept = np.polyfit(ns, times, 1)
    exponent = np.polyfit(np.log(ns), np.log(times), 1)[0] if len(ns) > 1 else float("nan")
    return float(slope), float(intercept), float(exponent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 25, 50])
    parser.add_argument("--train", type=int, default=8, help="training images per hospital")
    parser.add_argument("--test", type=int, default=4, help="test images per hospital")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ae-epochs", type=int, default=2)
    parser.add_argument("--scenario", help="measure this scenario TOML once instead")
    parser.add_argument("--out", type=Path, default=Path("results/scale"))
    parser.add_argument("--sample-s", type=float, default=0.5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.scenario:
        r = run_measured(Path(args.scenario), args.out / Path(args.scenario).stem, args.sample_s)
        print(json.dumps(r, indent=2))
        return

    rows = []
    for n in args.sites:
        toml = args.out / f"scale-{n}.toml"
        toml.write_text(
            tomli_w.dumps(scale_scenario(n, args.train, args.test, args.rounds, args.ae_epochs))
        )
        rows.append({"n": n, **run_measured(toml, args.out / f"scale-{n}", args.sample_s)})
        r = rows[-1]
        print(
            f"N={n}: {r['round_s']:.2f} s/round, peak {r['peak_rss_gib']:.2f} GiB, "
            f"wall {r['wall_s']:.0f} s",
            flush=True,
        )
    print()
    print(
        "| N | s/round (participation + UMN) | participation s | UMN s | AE phase s | "
        "wall s | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['round_s']:.2f} | {r['participation_s']:.2f} | {r['umn_s']:.2f} "
            f"| {r['autoencoders_s']:.1f} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} |"
        )
    if len(rows) > 1:
        ns = [r["n"] for r in rows]
        slope, intercept, exponent = fit(ns, [r["round_s"] for r in rows])
        print(
            f"\ntime per round ~ {intercept:.2f} s + {slope:.3f} s x N; "
            f"log-log exponent {exponent:.2f} (1 = linear)"
        )
    (args.out / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
