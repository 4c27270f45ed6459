"""CKKS encrypted query cost: encrypt (hospital), map on ciphertexts (server), decrypt
(hospital), bytes each way, one-time key bytes, the server's peak memory.

    .venv/bin/python benchmarks/ckks_query.py [--size 128] [--width 64] [--queries 20]

One image per query, the default model sizes (32 latent channels) with ``model.umn_arch =
"he"`` and the default CKKS parameters. The latents are a synthetic hospital's keyed test
latents (seeded encoder, KLT key); the network is the HE UMN with its input bases set from
them and weights moved off the identity start (timing does not depend on the weights). The
server runs in a child process (``--server-child``), so its peak RSS is its own: the figure
is the child's peak minus its RSS after imports. Server compute is from the query's bytes to
the reply's bytes (SEAL reads and writes included); compiling the network for a hospital's
keys (encoding every weight vector once) is reported apart. Also checks the replies against
the plaintext path (relative error) and prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedseg.config import RunConfig  # noqa: E402
from fedseg.coordinator import Coordinator  # noqa: E402
from fedseg.privacy import ckks  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_child(folder: Path) -> None:
    """The server side alone: load the bundle, compile, map every query."""
    state = pickle.loads((folder / "server.pkl").read_bytes())
    torch.set_num_threads(state["threads"])
    base = rss_mib()
    started = time.perf_counter()
    keys = ckks.ServerCkks.from_bundle(state["bundle"], 3)
    mapper = ckks.EncryptedMapper(keys, state["folded"], state["packing"])
    compile_s = time.perf_counter() - started
    times, replies = [], []
    for query in state["queries"]:
        start = time.perf_counter()
        replies.append(mapper.map(query, max_items=1))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"times": times, "compile_s": compile_s, "base_mib": base, "peak_mib": peak}
    (folder / "server_out.pkl").write_bytes(pickle.dumps((out, replies)))


def config(size: int, width: int) -> RunConfig:
    cfg = RunConfig(name="ckks-bench")
    cfg.model.umn_arch = "he"
    cfg.model.image_size = size
    cfg.model.umn_width = width
    cfg.data.synthetic_test = 8
    return cfg.validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server_child is not None:
        server_child(args.server_child)
        return
    torch.set_num_threads(args.threads)
    from fedseg.data import site_for_partition
    from fedseg.privacy.keys import simulated_secret
    from fedseg.privacy.transforms import keyed_transform
    from fedseg.site import SiteModels, query_chunk

    cfg = config(args.size, args.width)
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    torch.manual_seed(0)
    split = site_for_partition(cfg, 0)
    models = SiteModels.build(cfg, split.test.num_classes)
    transform = keyed_transform(cfg, simulated_secret(0, "federation"))
    test = split.test
    latents = [
        query_chunk(test, models, transform, i % len(test), i % len(test) + 1)
        for i in range(args.queries)
    ]
    coordinator = Coordinator(cfg, [split.name])
    coordinator.finetune_forward(split.name, query_chunk(test, models, transform, 0, len(test)))
    with torch.no_grad():
        for name, p in coordinator.umn.named_parameters():
            if "adapters" not in name:
                p.add_(0.1 * torch.randn_like(p))
    coordinator.umn.eval()
    umn = coordinator.umn
    plain_s = []
    for q in latents:
        start = time.perf_counter()
        plain = coordinator.map_query(split.name, q)
        plain_s.append(time.perf_counter() - start)

    started = time.perf_counter()
    hospital = ckks.HospitalCkks.create()
    keygen_s = time.perf_counter() - started
    packing = ckks.Packing(tuple(tuple(s) for s in coordinator.shapes), hospital.params.slots)
    started = time.perf_counter()
    bundle = hospital.public_bundle(packing)
    bundle_s = time.perf_counter() - started
    encrypt_s, queries = [], []
    for q in latents:
        start = time.perf_counter()
        queries.append(hospital.encrypt(q, packing))
        encrypt_s.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = {
            "bundle": bundle,
            "folded": umn.folded(split.name),  # type: ignore[operator]
            "packing": packing,
            "queries": queries,
            "threads": args.threads,
        }
        (folder / "server.pkl").write_bytes(pickle.dumps(state))
        subprocess.run(
            [sys.executable, __file__, "--server-child", str(folder)], check=True, cwd=ROOT
        )
        server, replies = pickle.loads((folder / "server_out.pkl").read_bytes())

    decrypt_s, errors = [], []
    for q, reply in zip(latents, replies, strict=True):
        start = time.perf_counter()
        mapped = hospital.decrypt(reply, packing)
        decrypt_s.append(time.perf_counter() - start)
        plain = coordinator.map_query(split.name, q)
        errors.append(
            max(
                float(
                    np.linalg.norm(mapped[k].astype(np.float64) - plain[k].astype(np.float64))
                    / np.linalg.norm(plain[k].astype(np.float64))
                )
                for k in plain
            )
        )

    def stats(seconds: list[float]) -> str:
        ms = np.array(seconds) * 1e3
        return f"median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms"

    up = [ckks.payload_size(q) for q in queries]
    down = [ckks.payload_size(r) for r in replies]
    key_bytes = {k: int(v.nbytes) for k, v in bundle.items()}
    params = hospital.params
    result = {
        "size": args.size,
        "width": args.width,
        "queries": args.queries,
        "params": params.to_dict(),
        "depth": umn.depth,  # type: ignore[union-attr]
        "table": params.table_line(),
        "packing": {
            "block": packing.block,
            "groups": packing.groups,
            "ciphertexts_per_image": packing.cts(packing.channels),
        },
        "encrypt_ms": np.array(encrypt_s).tolist(),
        "server_ms": server["times"],
        "decrypt_ms": np.array(decrypt_s).tolist(),
        "compile_s": server["compile_s"],
        "server_rss_base_mib": server["base_mib"],
        "server_rss_peak_mib": server["peak_mib"],
        "bytes_up": up,
        "bytes_down": down,
        "key_bytes": key_bytes,
        "max_relative_error_vs_plaintext": max(errors),
    }
    print(
        f"input {args.size} px, HE UMN width {args.width}, depth {result['depth']}, "
        f"{args.threads} threads, 1 image per query, {args.queries} queries"
    )
    print(
        f"CKKS: N = {params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)}, "
        f"scale 2^{params.scale_bits}; {params.table_line()}"
    )
    print(
        f"packing: {packing.groups} channels x {packing.block} slots per ciphertext, "
        f"{packing.cts(packing.channels)} ciphertexts per image"
    )
    print(f"encrypt (hospital): {stats(encrypt_s)}")
    print(f"server compute:     {stats(server['times'])}  (plaintext map_query: {stats(plain_s)})")
    print(f"decrypt (hospital): {stats(decrypt_s)}")
    print(
        f"bytes up {np.median(up) / 2**20:.2f} MiB, down {np.median(down) / 2**20:.2f} MiB "
        f"per query"
    )
    print(
        f"one-time key bytes per hospital: {sum(key_bytes.values()) / 2**20:.2f} MiB "
        f"(context {key_bytes[ckks.CONTEXT] / 2**20:.2f}, "
        f"Galois {key_bytes[ckks.GALOIS] / 2**20:.2f}); "
        f"keygen {keygen_s:.2f} s + bundle {bundle_s:.2f} s"
    )
    print(
        f"server: compile for a hospital's keys {server['compile_s']:.2f} s (once per model); "
        f"peak RSS {server['peak_mib']:.0f} MiB, {server['peak_mib'] - server['base_mib']:.0f} "
        f"MiB above its RSS after imports"
    )
    print(f"largest relative error against the plaintext path: {max(errors):.2e}")
    print("load average (1, 5, 15 min) after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_ms")}))


if __name__ == "__main__":
    main()
