"""Privacy against utility: Dice beside each attack's success, one point per mode (run).

Reads what ``fedseg attack`` stored in each run's metrics.json (so run the attacks first); each
run contributes the attack results for its own transform.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedseg.attacks.context import RunFolderError
from fedseg.attacks.figures import tradeoff
from fedseg.attacks.report import figure_dir, table

# (label, where in metrics["attacks"] for a run of mode m); higher = attack more successful.
# An inr run (mode "inr", fedseg/attacks/obfuscation.py): the released image is the inversion.
INVERSION_VARIANT = {"none": "no key", "inr": "shared image"}
MEASURES = {
    "cross-decoder SSIM": lambda a, m: a["cross-decoder"][m + "_mean"]["ssim"],
    "inversion SSIM (pairs, no key)": lambda a, m: a["inversion"][m][
        INVERSION_VARIANT.get(m, "pairs, no key")
    ]["ssim"],
    "inversion SSIM (encoder, no key)": lambda a, m: a["inversion"][m][
        "no key" if m == "none" else "encoder, no key"
    ]["ssim"],
    "membership AUC (loss)": lambda a, m: a["membership"]["loss_threshold"]["auc"],
    "membership AUC (trained)": lambda a, m: a["membership"]["trained_model"]["auc"],
    "re-identification AUC": lambda a, m: a["reid"][m]["auc"],
}


def collect(runs: list[Path]) -> tuple[dict, list[list]]:
    """Cross-decoder, inversion and re-identification evaluate every mode on one run's AEs, so
    their value for a mode may come from any of the runs; membership inference attacks each
    run's own UMN, so it comes from that run."""
    loaded = []
    for run in runs:
        path = run / "metrics.json"
        if not path.is_file():
            raise RunFolderError(f"{path} not found")
        loaded.append(json.loads(path.read_text()))
    points: dict[str, dict[str, tuple[float, float]]] = {}
    rows = []
    for metrics in loaded:
        if "mean" not in metrics:  # an attack-only folder (no UMN, no Dice): a source only
            continue
        mode, label = run_mode(metrics["config"])
        dice = metrics["mean"]["dice"]
        row = [label, dice]
        for name, get in MEASURES.items():
            sources = [metrics] if name.startswith("membership") else [metrics, *loaded]
            value = None
            for source in sources:
                try:
                    value = float(get(source.get("attacks", {}), mode))
                    break
                except (KeyError, TypeError):
                    continue
            row.append("-" if value is None else value)
            if value is not None:
                points.setdefault(name, {})[label] = (value, dice)
        rows.append(row)
    return points, rows


def run_mode(config: dict) -> tuple[str, str]:
    """(the key of a run's results in each attack's entry, its label in the figure)."""
    privacy = config["privacy"]
    if config.get("mode") == "inr":
        return "inr", f"inr (rho {privacy['inr_rho']:g})"
    return privacy["transform"], f"{privacy['transform']} ({privacy['custody']})"


def run(runs: list[Path], out: Path) -> tuple[dict, str]:
    points, rows = collect(runs)
    if not points:
        raise RunFolderError("no attack results in these runs: run `fedseg attack` on each first")
    fig = tradeoff(figure_dir(out) / "tradeoff.png", points, "Dice vs attack success per mode")
    md = (
        "## Privacy / utility\n\n"
        "Mean foreground Dice of each run beside each attack's success on it (higher = the "
        "attack did better). Runs: "
        + ", ".join(f"`{r}`" for r in runs)
        + ".\n\n"
        + table(["mode (custody)", "Dice", *MEASURES], rows)
        + f"\n\n![trade-off]({fig.relative_to(out)})\n"
    )
    return {"runs": [str(r) for r in runs], "points": points}, md
