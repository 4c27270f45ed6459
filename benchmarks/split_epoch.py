"""Seconds per epoch of split training through Flower and Ray, on the embedded demo config.

    .venv/bin/python benchmarks/split_epoch.py --epochs 10 --pipeline on
    .venv/bin/python benchmarks/split_epoch.py --epochs 10 --pipeline off

Run one at a time with nothing else heavy on the machine; the load is printed beside the
figure. No baselines are trained; the Dice after so few epochs is a sanity check, not a score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kill_resume import descendants  # noqa: E402
from fedseg.config import apply_overrides, demo_config  # noqa: E402
from simulations.engine import simulate  # noqa: E402


class PeakMemory:
    """The largest resident memory of this process and all its descendants (Ray's processes,
    the site workers), sampled twice a second."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            pids = [os.getpid(), *descendants(os.getpid())]
            self.peak = max(self.peak, sum(_rss(pid) for pid in pids))


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _override(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    return key, json.loads(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pipeline", choices=("on", "off"), default="on")
    parser.add_argument("--actors", type=int, default=0, help="federation.actors (0 = default)")
    parser.add_argument(
        "--client-cpus", type=float, default=0.0, help="federation.client_cpus (0 = default)"
    )
    parser.add_argument("--threads", type=int, default=0, help="training.threads (0 = default)")
    parser.add_argument(
        "--workers", type=int, default=-1, help="federation.site_workers (-1 = auto, 0 = off)"
    )
    parser.add_argument("--sites", type=int, default=3, help="synthetic hospitals (32 images)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=JSON",
        help="any other config field, e.g. --set 'model.ae_widths=[24,48,72,96,144]'",
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]
    peak = PeakMemory()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.environ.get("SPLIT_EPOCH_DIR", tmp)
        cfg = demo_config(str(Path(tmp) / "run"))
        cfg.training.finetune_epochs = args.epochs
        cfg.training.finetune_pipeline = args.pipeline == "on"
        cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
        cfg.federation.actors = args.actors or cfg.federation.actors
        cfg.federation.client_cpus = args.client_cpus or cfg.federation.client_cpus
        cfg.training.threads = args.threads or cfg.training.threads
        cfg.federation.site_workers = args.workers
        cfg.federation.num_sites = args.sites
        apply_overrides(cfg, dict(_override(item) for item in args.set))
        with peak:
            simulate(cfg.validate())
        metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    result = {
        "epochs": args.epochs,
        "pipeline": args.pipeline == "on",
        "seconds_per_epoch": metrics["timing_s"]["finetuning"] / args.epochs,
        "dice": metrics["mean"]["dice"],
        "actors": cfg.federation.actors,
        "client_cpus": cfg.federation.client_cpus,
        "threads": cfg.training.threads,
        "workers": args.workers,
        "sites": args.sites,
        "peak_rss_mib": round(peak.peak / 2**20),
        "load_before": load,
        "set": args.set,
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
