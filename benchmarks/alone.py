"""Each hospital of a profiled scenario in the federation versus trained alone.

Runs the scenario through the CLI with the local-UNet baseline (each site's UNet on its own
data), then the same scenario once per ``[[hospitals]]`` entry with only that entry (PPCMI-SF
with a single site: its own autoencoders and a mapping network trained on its latents only).
Prints per-site mean foreground Dice side by side.

    .venv/bin/python benchmarks/alone.py --config simulations/scenarios/mixed-ultrasound.toml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

FEDSEG = [sys.executable, "-m", "fedseg.cli", "run", "--no-verbose"]


def run(config: Path, out: Path, baselines: bool) -> dict:
    flag = "--baselines" if baselines else "--no-baselines"
    subprocess.run([*FEDSEG, flag, "--config", str(config), "--out", str(out)], check=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    values = tomllib.loads(args.config.read_text())
    name = values.get("name", args.config.stem)
    out = args.out or Path("results") / f"{name}-alone"
    values.setdefault("baselines", {}).update({"centralized_unet": False, "local_unet": True})
    fed_toml = args.config.parent / f".{args.config.stem}-fed.toml"
    fed_toml.write_text(tomli_w.dumps(values))
    alone: dict[str, dict] = {}
    try:
        federated = run(fed_toml, out / "federated", baselines=True)
        for hospital in values["hospitals"]:
            single = {**values, "hospitals": [hospital], "name": f"{name}-{hospital['name']}"}
            toml = args.config.parent / f".{args.config.stem}-{hospital['name']}.toml"
            toml.write_text(tomli_w.dumps(single))
            try:
                alone.update(run(toml, out / f"alone-{hospital['name']}", False)["sites"])
            finally:
                toml.unlink(missing_ok=True)
    finally:
        fed_toml.unlink(missing_ok=True)
    local = federated["baselines"].get("local_unet", {}).get("sites", {})
    print("\n| site | PPCMI-SF federated | PPCMI-SF alone | local UNet alone |")
    print("|---|---|---|---|")
    for site, m in federated["sites"].items():
        cells = [m, alone.get(site), local.get(site)]
        print(
            f"| {site} | "
            + " | ".join("-" if c is None else f"{c['dice_mean']:.3f}" for c in cells)
            + " |"
        )
    budget = federated["timing_s"].get("training_total", 0) / 60
    print(
        f"\nfederated training {budget:.1f} min; each local UNet got "
        f"{budget / max(len(federated['sites']), 1):.1f} min"
    )


if __name__ == "__main__":
    main()
