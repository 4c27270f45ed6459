"""Does a federation with hospitals failing at random each round end near one without failures?

Runs a profiled scenario through the CLI twice (no baselines): as written, and with every
hospital's ``dropout`` set to 0. Prints both runs' per-site and mean foreground Dice, the
difference in percentage points, and who dropped in which round.

    .venv/bin/python benchmarks/dropout_dice.py                  # ten-synthetic-dropout (20%)
    .venv/bin/python benchmarks/dropout_dice.py --config simulations/scenarios/fifty-synthetic.toml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

FEDSEG = [sys.executable, "-m", "fedseg.cli", "run", "--no-baselines", "--no-verbose"]
DEFAULT = "simulations/scenarios/ten-synthetic-dropout.toml"


def without_failures(config: Path, out: Path) -> Path:
    """The same scenario with every dropout 0 (relative paths kept valid: written alongside)."""
    values = tomllib.loads(config.read_text())
    for hospital in values.get("hospitals", []):
        hospital["dropout"] = 0.0
    values["name"] = f"{values.get('name', config.stem)}-no-failures"
    path = config.parent / f".{config.stem}-no-failures.toml"
    path.write_text(tomli_w.dumps(values))
    return path


def run(config: Path, out: Path) -> dict:
    subprocess.run([*FEDSEG, "--config", str(config), "--out", str(out)], check=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path(DEFAULT))
    parser.add_argument("--out", type=Path, default=Path("results/dropout-dice"))
    args = parser.parse_args()
    clean_toml = without_failures(args.config, args.out)
    try:
        failing = run(args.config, args.out / "with-failures")
        clean = run(clean_toml, args.out / "no-failures")
    finally:
        clean_toml.unlink(missing_ok=True)
    drops = [d for d in failing["dropped"] if d.get("phase") == "umn_round"]
    rounds = len(failing.get("rounds") or [])
    sites = len(failing["sites"])
    print(
        f"\n{len(drops)} site-rounds failed of {rounds * sites} ({rounds} rounds x {sites} sites)"
    )
    for r in failing.get("rounds") or []:
        print(f"  round {r['round']}: dropped {r['dropped']} rejoined {r['rejoined']}")
    print("\n| site | Dice with failures | Dice without | difference (pp) |\n|---|---|---|---|")
    for site in clean["sites"]:
        a = failing["sites"].get(site, {}).get("dice_mean")
        b = clean["sites"][site]["dice_mean"]
        diff = "-" if a is None else f"{100 * (a - b):+.2f}"
        print(f"| {site} | {a if a is None else f'{a:.4f}'} | {b:.4f} | {diff} |")
    a, b = failing["mean"]["dice"], clean["mean"]["dice"]
    print(f"| **mean** | {a:.4f} | {b:.4f} | {100 * (a - b):+.2f} |")


if __name__ == "__main__":
    main()
