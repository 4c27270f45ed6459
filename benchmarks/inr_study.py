"""Implicit neural obfuscation at several rho on the same fits (fedseg/privacy/inr.py).

Fitting does not depend on rho: each hospital's chunks are fit once, exactly as a hospital
fits them in the inr mode (the same seeds and settings), then rendered from codes mixed at each
rho (a fresh R per rho and chunk). Reports the fit time per chunk, the compression ratio, the
rendered images' SSIM/PSNR against the originals and, on a volume data set, re-identification
(fedseg/attacks/obfuscation.py's attacker) on the raw against the rendered training images.

    python benchmarks/inr_study.py --config simulations/scenarios/hippocampus-inr.toml \
        --rho 0 --rho 0.04 --rho 0.08 --reid --out results/inr-study-hippocampus.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.attacks.obfuscation import reid_compare, reid_records, reid_table
from fedseg.attacks.scores import image_quality
from fedseg.config import load_config
from fedseg.data import load_federation
from fedseg.obfuscation import spec
from fedseg.privacy import inr
from fedseg.privacy.keys import simulated_secret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rho", type=float, action="append", required=True)
    ap.add_argument("--reid", action="store_true", help="re-identification, raw vs each rho")
    ap.add_argument("--reid-epochs", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.set_num_threads(cfg.training.threads)
    if args.reid_epochs:
        cfg.attack.reid_epochs = args.reid_epochs
    out: dict = {"config": args.config, "rho": args.rho, "load_start": os.getloadavg()}
    sites = load_federation(cfg)
    secret = simulated_secret(cfg.training.seed, "federation")
    p = cfg.privacy
    rendered: dict[float, list[np.ndarray]] = {rho: [] for rho in args.rho}
    originals, fits, index = [], [], {}
    for split in sites:
        train = split.train
        bounds = inr.chunk_bounds(len(train), p.inr_chunk)
        index[split.name] = np.arange(len(train))
        for start, stop in bounds:
            seed = cfg.training.seed * 100_003 + start
            images = train.images[start:stop]
            net, stats = inr.fit(
                images, spec(cfg, train.channels), p.inr_steps, p.inr_lr, p.inr_batch, seed
            )
            fits.append(
                {
                    "site": split.name,
                    "start": start,
                    "stop": stop,
                    "seconds": stats.seconds,
                    "loss_start": stats.loss_start,
                    "loss_end": stats.loss_end,
                    "parameters": stats.parameters,
                    "pixels": stats.pixels,
                    "ratio": stats.ratio,
                }
            )
            print(json.dumps(fits[-1]), flush=True)
            originals.append(images)
            for rho in args.rho:
                label = f"study/{split.name}/{start}-{stop}/rho {rho:g}"
                rendered[rho].append(inr.render(net, rho, inr.release_generator(secret, label)))
    raw = np.concatenate(originals)
    out["fits"] = fits
    out["fit_seconds_per_chunk"] = float(np.mean([f["seconds"] for f in fits]))
    out["ratio_min"] = float(min(f["ratio"] for f in fits))
    out["ratio_mean"] = float(np.mean([f["ratio"] for f in fits]))
    out["quality"] = {
        f"{rho:g}": image_quality(torch.from_numpy(np.concatenate(r)), torch.from_numpy(raw))
        for rho, r in rendered.items()
    }
    print(json.dumps(out["quality"]), flush=True)
    if args.reid:
        started = time.perf_counter()
        raw_records, patients, slices, site_ids = reid_records(sites, index)
        records = {"raw": raw_records}
        records.update({f"inr rho {rho:g}": np.concatenate(r) for rho, r in rendered.items()})
        out["reid"] = reid_compare(records, patients, slices, site_ids, cfg.attack)
        out["reid_seconds"] = time.perf_counter() - started
        print(reid_table(out["reid"]))
    out["load_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
