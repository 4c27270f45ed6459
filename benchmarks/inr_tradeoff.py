"""The privacy/utility figure with the inr mode beside the latent modes (us-nerve).

x: how well the curious server reconstructs a victim hospital's images (SSIM), by the best
attack the suite has on each mode; y: mean foreground Dice. The inr points are measured from
run folders (``fedseg attack --run DIR --attack all`` first: the released images' SSIM against
their originals, and the server network's membership AUC); the latent modes' points are the
figures docs/privacy.md and docs/results.md record, with their sources, not re-run here.

    python benchmarks/inr_tradeoff.py --run results/us-nerve-inr-rho0 \
        --run results/us-nerve-inr-rho0.04 --run results/us-nerve-inr-rho0.08 \
        --out docs/img/inr-tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedseg.attacks.figures import tradeoff
from fedseg.attacks.tradeoff import collect

FLOOR = 0.333  # the auxiliary images' mean image (docs/privacy.md)
SSIM = f"victim's images reconstructed, SSIM (mean-image floor {FLOOR})"
# (SSIM, Dice) of the latent modes on us-nerve, victim us-nerve-1, as recorded.
LATENT = {
    # surrogate-encoder inversion 0.366 (docs/privacy.md); Dice 0.728, seed 0 (docs/results.md,
    # recorded in 475f995)
    "blind split (default)": (0.366, 0.728),
    # server-side inversion 0.521 (docs/privacy.md); Dice 0.734 (docs/results.md)
    "SplitFed": (0.521, 0.734),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    points, rows = collect(args.run)
    ssim = dict(points.pop("inversion SSIM (pairs, no key)", {}))
    for label, (value, dice) in LATENT.items():
        ssim[label + " *"] = (value, dice)
    panels = {SSIM: ssim}
    if "membership AUC (loss)" in points:
        panels["membership AUC, server's network (inr)"] = points["membership AUC (loss)"]
    title = "us-nerve: Dice vs the curious server's attacks (* recorded, not re-run)"
    path = tradeoff(args.out, panels, title)
    print(json.dumps({"figure": str(path), "points": panels, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
