"""The cost of blind aggregation for one aggregation round, against plain averaging.

Times a site's masking (``blind``) and unmasking (``unblind``), the server's sum, and the plain
weighted average of the same shared weights (the image encoder and mask decoder of a scenario's
models), and counts the bytes each way per site. Prints JSON (and writes it with ``--out``).

    .venv/bin/python benchmarks/blind_cost.py --config simulations/scenarios/us-nerve.toml
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.config import load_config
from fedseg.finetune import shared_weights
from fedseg.privacy.blind import add_blinded, blind, unblind
from fedseg.privacy.keys import generate_secret
from fedseg.site import SiteModels
from simulations.in_process import weighted_mean


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/scenarios/us-nerve.toml")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    states = []
    for i in range(args.sites):
        torch.manual_seed(i)
        shared = shared_weights(SiteModels.build(cfg, args.classes), cfg.training)
        states.append({k: v for k, v in shared.items() if v.is_floating_point()})
    names = [f"site-{i}" for i in range(args.sites)]
    secret, weights = generate_secret(), [68] * args.sites
    vectors = [
        blind(s, w, secret, "r/0", n) for s, w, n in zip(states, weights, names, strict=True)
    ]
    total = add_blinded(vectors)
    values = sum(v.numel() for v in states[0].values())
    plain_bytes = sum(v.numel() * v.element_size() for v in states[0].values())
    result = {
        "config": args.config,
        "shared_values": values,
        "bytes_per_site_each_way": {"plain": plain_bytes, "blind": int(vectors[0].nbytes)},
        "seconds": {
            "site_blind": median_seconds(
                lambda: blind(states[0], 68, secret, "r/1", names[0]), args.repeats
            ),
            "server_sum": median_seconds(lambda: add_blinded(vectors), args.repeats),
            "site_unblind": median_seconds(
                lambda: unblind(total, secret, "r/0", names, states[0]), args.repeats
            ),
            "plain_average": median_seconds(
                lambda: weighted_mean(dict(enumerate(states)), dict(enumerate(weights))),
                args.repeats,
            ),
        },
        "load_average": os.getloadavg()[0],
        "threads": 1,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
