"""Does a killed and resumed run end where an uninterrupted one ends?

Runs a scenario twice through the CLI (no baselines): once straight through, once killed with
SIGKILL (whole process group: CLI, Ray, workers) right after UMN round ``--kill-after`` is
checkpointed, then resumed with ``--resume``. Prints both runs' mean foreground Dice.

    .venv/bin/python benchmarks/resume_dice.py                      # the demo scenario
    .venv/bin/python benchmarks/resume_dice.py --config simulations/scenarios/us-nerve.toml
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
import torch

from fedseg.config import demo_config

FEDSEG = [sys.executable, "-m", "fedseg.cli", "run", "--no-baselines", "--no-verbose"]


def scenario_file(config: str | None, out: Path, threads: int) -> Path:
    if config:
        return Path(config)
    cfg = demo_config(str(out))
    cfg.training.threads = threads  # 1 thread: far faster than 2 on an oversubscribed machine
    values = cfg.to_dict()
    for key in ("out_dir", "resume"):
        values.pop(key, None)
    path = out / "demo.toml"
    path.write_text(tomli_w.dumps(values))
    return path


def checkpointed_round(run: Path) -> int:
    path = run / "checkpoints" / "umn.pt"
    try:
        return int(torch.load(path, weights_only=True)["round"]) if path.is_file() else 0
    except Exception:  # being replaced
        return 0


def dice(run: Path) -> tuple[float, dict[str, float]]:
    metrics = json.loads((run / "metrics.json").read_text())
    sites = {name: s["dice_mean"] for name, s in metrics["sites"].items()}
    return metrics["mean"]["dice"], sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="scenario TOML (default: the demo)")
    parser.add_argument("--out", default="results/resume-check")
    parser.add_argument("--kill-after", type=int, default=1, help="UMN round to kill after")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (demo scenario)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenario = scenario_file(args.config, out, args.threads)
    straight, killed = out / "uninterrupted", out / "killed"

    started = time.perf_counter()
    subprocess.run([*FEDSEG, "--config", str(scenario), "--out", str(straight)], check=True)
    print(f"uninterrupted run: {time.perf_counter() - started:.0f} s", flush=True)

    command = [*FEDSEG, "--config", str(scenario), "--out", str(killed)]
    first = subprocess.Popen(command, start_new_session=True)
    try:
        while checkpointed_round(killed) < args.kill_after:
            if first.poll() is not None:
                sys.exit("the run ended before it could be killed")
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    print(f"killed after UMN round {checkpointed_round(killed)}", flush=True)
    subprocess.run([*command, "--resume"], check=True)

    (d_straight, s_straight), (d_resumed, s_resumed) = dice(straight), dice(killed)
    print(f"uninterrupted mean Dice {d_straight:.4f}  per site {s_straight}")
    print(f"killed+resumed mean Dice {d_resumed:.4f}  per site {s_resumed}")
    print(f"difference {100 * (d_resumed - d_straight):+.2f} pp")


if __name__ == "__main__":
    main()
