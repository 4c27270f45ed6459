"""Dice of the encrypted path against the plaintext path of the same trained network.

    .venv/bin/python benchmarks/ckks_dice.py --run results/us-nerve-he [--threads 2]

For a finished run with ``model.umn_arch = "he"`` (its ``checkpoints/umn.pt``, each site's
``sites/<site>/autoencoders.pt`` and ``keys/``), every site's test split is segmented twice
with the same encoder, key, UMN and decoder: once through ``Coordinator.map_query`` (keyed fp16
latents, what evaluation does with ``privacy.query = "plain"``) and once through CKKS (a fresh
hospital key, the public bundle, encrypted queries of 16 images, ``Coordinator.map_encrypted``,
decryption), as the Flower evaluation does with ``privacy.query = "ckks"``. Prints mean
foreground Dice per site and over sites for both, their difference, and the fraction of pixels
whose predicted class differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedseg.checkpoint import UMN_NAME, read_checkpoint  # noqa: E402
from fedseg.config import config_from_dict  # noqa: E402
from fedseg.coordinator import Coordinator  # noqa: E402
from fedseg.data import site_for_partition  # noqa: E402
from fedseg.privacy import ckks  # noqa: E402
from fedseg.privacy.keys import read_key_file  # noqa: E402
from fedseg.privacy.transforms import keyed_transform  # noqa: E402
from fedseg.site import (  # noqa: E402
    SiteModels,
    evaluate_predictions,
    query_chunk,
    segment_mapped,
    site_models_path,
)

CHUNK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = read_checkpoint(args.run / "checkpoints" / UMN_NAME)
    cfg = config_from_dict(state["config"])
    cfg.out_dir = str(args.run)
    if cfg.model.umn_arch != "he":
        raise SystemExit(f"{args.run}: model.umn_arch is {cfg.model.umn_arch!r}, not 'he'")
    coordinator = Coordinator(cfg, list(state["sites"]))
    coordinator.restore_round(state)
    key_dir = Path(cfg.privacy.key_dir or args.run / "keys")
    rows = {}
    for index in range(len(state["sites"])):
        split = site_for_partition(cfg, index)
        name, test = split.name, split.test
        models, _ = SiteModels.load(cfg, site_models_path(args.run, name))
        owner = "federation" if cfg.privacy.key_scope == "federation" else name
        secret = (
            read_key_file(key_dir / f"{owner}.key") if cfg.privacy.transform != "none" else None
        )
        transform = keyed_transform(cfg, secret)
        query = query_chunk(test, models, transform, 0, len(test))
        plain_pred = segment_mapped(
            cfg, models, transform, coordinator.map_query(name, query), test.images
        )
        hospital = ckks.HospitalCkks.create()
        packing = ckks.query_packing(coordinator.shapes, hospital.params)
        coordinator.register_ckks(name, hospital.public_bundle(packing))
        started, parts = time.perf_counter(), []
        for a in range(0, len(test), CHUNK):
            b = min(a + CHUNK, len(test))
            encrypted = hospital.encrypt(query_chunk(test, models, transform, a, b), packing)
            parts.append(coordinator.map_encrypted(name, encrypted, max_items=b - a))
        seconds = time.perf_counter() - started
        mapped = hospital.decrypt(ckks.concat(parts), packing)
        enc_pred = segment_mapped(cfg, models, transform, mapped, test.images)
        plain = evaluate_predictions(test, plain_pred)["dice_mean"]
        enc = evaluate_predictions(test, enc_pred)["dice_mean"]
        rows[name] = {
            "images": len(test),
            "dice_plain": plain,
            "dice_encrypted": enc,
            "pixels_differing": float(np.mean(plain_pred != enc_pred)),
            "encrypt_map_s_per_image": seconds / len(test),
        }
        print(json.dumps({name: rows[name]}))
    plain_mean = float(np.mean([r["dice_plain"] for r in rows.values()]))
    enc_mean = float(np.mean([r["dice_encrypted"] for r in rows.values()]))
    print(
        f"mean foreground Dice over sites: plaintext {plain_mean:.4f}, encrypted {enc_mean:.4f} "
        f"({100 * (enc_mean - plain_mean):+.2f} pp)"
    )


if __name__ == "__main__":
    main()
