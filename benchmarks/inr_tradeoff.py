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

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from fedseg.atomic import savefig_atomic  # noqa: E402
from fedseg.attacks.tradeoff import collect  # noqa: E402

FLOOR = 0.333  # the auxiliary images' mean image (docs/privacy.md)
SSIM = "reconstruction of the victim's images, SSIM"
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
    for run in args.run:  # sharing the raw images: the server holds them exactly
        metrics = json.loads((run / "metrics.json").read_text())
        central = metrics.get("baselines", {}).get("centralized_unet")
        if central:
            epochs = central.get("epochs")
            ssim[f"raw images, the same UNet ({epochs} epochs)"] = (1.0, central["mean"]["dice"])
    for label, (value, dice) in LATENT.items():
        ssim[label + " *"] = (value, dice)
    panels = {SSIM: ssim}
    if "membership AUC (loss)" in points:
        panels["membership AUC, server's network (inr)"] = points["membership AUC (loss)"]
    title = "us-nerve: Dice against the server's attacks (* recorded, 400 epochs; not re-run)"
    path = draw(args.out, panels, title)
    print(json.dumps({"figure": str(path), "points": panels, "rows": rows}, indent=2))


def draw(path: Path, panels: dict[str, dict[str, tuple[float, float]]], title: str) -> Path:
    """One panel per attack, x = its success, y = Dice; latent modes as squares."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (attack, points) in zip(axes[0], panels.items(), strict=True):
        for label, (x, y) in points.items():
            ax.scatter([x], [y], marker="s" if label.endswith("*") else "o", s=40)
            offset = (6, -12) if "SplitFed" in label else (6, 4)
            ax.annotate(label, (x, y), fontsize=8, xytext=offset, textcoords="offset points")
        if attack == SSIM:
            ax.axvline(FLOOR, color="grey", ls=":", lw=1)
            ax.text(FLOOR, ax.get_ylim()[0], " mean-image floor", fontsize=7, color="grey")
        xs = [x for x, _ in points.values()]
        pad = 0.15 * (max(xs) - min(xs) or 0.1)
        ax.set_xlim(min(xs + [FLOOR] if attack == SSIM else xs) - pad, max(xs) + 2.5 * pad)
        ax.set_xlabel(attack, fontsize=9)
        ax.set_ylabel("mean foreground Dice")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return savefig_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
