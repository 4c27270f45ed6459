"""KNT and KLT cost per inference query, on the client: key the image latents (forward) and
un-key the mapped mask latents (inverse), at the latent shapes of a 128 px input.

    .venv/bin/python benchmarks/knt_overhead.py [--size 128] [--threads 2] [--repeats 500]

Prints the median (and 10th/90th percentiles) of forward+inverse per query, batch 1, fp32, and
the machine's load average before and after (the medians move with other processes' load), and
checks the KNT round trip on the benchmark's latents.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from fedseg.config import ModelConfig
from fedseg.models.autoencoder import latent_shapes
from fedseg.privacy.keys import KeyRing, generate_secret
from fedseg.privacy.klt import LatentTransform
from fedseg.privacy.knt import KntKeyRing, KntTransform


def per_query(transform, latents, repeats: int) -> np.ndarray:
    times = []
    with torch.inference_mode():
        for _ in range(10):  # warm-up (parameter tensors are built on first use)
            transform.inverse(transform.forward(latents, "image"), "mask")
        for _ in range(repeats):
            start = time.perf_counter()
            transform.inverse(transform.forward(latents, "image"), "mask")
            times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels = ModelConfig().latent_channels
    shapes = latent_shapes(args.size, channels)
    latents = [torch.randn(1, *s) for s in shapes]
    secret = generate_secret()
    print(f"input {args.size} px, latents {shapes}, {args.threads} threads, batch 1")
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    for name, t in (
        ("KLT", LatentTransform(KeyRing.from_secret(secret, channels))),
        ("KNT", KntTransform(KntKeyRing.from_secret(secret, channels))),
    ):
        ms = per_query(t, latents, args.repeats)
        p10, p50, p90 = np.percentile(ms, [10, 50, 90])
        with torch.inference_mode():
            back = t.inverse(t.forward(latents, "image"), "image")
        error = max((a - b).abs().max().item() for a, b in zip(latents, back, strict=True))
        print(
            f"{name}: forward+inverse median {p50:.3f} ms (p10 {p10:.3f}, p90 {p90:.3f}); "
            f"round-trip max error {error:.1e}"
        )
    print("load average (1, 5, 15 min) after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
