"""Per-image latency of ``fedseg segment`` over loopback HTTPS, and bytes per query.

For each input size a run folder is made with the default model config (untrained weights:
latency does not depend on them), ``fedseg serve`` is started in its own process, and the
site's client segments single images one request at a time. Printed per phase: client encode
(+ keying), network + server mapping (the HTTPS round trip), of which server mapping alone,
client decode (un-keying + mask decoder + argmax). Bytes are the latents each way, against the
reference paper's 0.875 MiB per query (114,688 fp32 values each way at 256 px).

With ``--run DIR`` (a finished client-custody simulation run) it also scores every site's test
split through the service (fp16 latents on the wire) and through the fp32 in-process path, to
show what fp16 costs in Dice.

    .venv/bin/python benchmarks/segment_latency.py [--sizes 128 256] [--n 50] [--run DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.checkpoint import checkpoint_dir, load_checkpoint
from fedseg.config import RunConfig, config_from_dict
from fedseg.coordinator import Coordinator
from fedseg.serving.client import SegmentationClient, SiteClientConfig
from fedseg.serving.server import prepare_tls
from fedseg.site import SiteModels, site_models_path, site_transform

REFERENCE_BYTES = 0.875 * 2**20  # both ways, fp32, 256 px
SITE = "hospital-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(root: Path, size: int, threads: int) -> RunConfig:
    cfg = RunConfig(name=f"latency-{size}", out_dir=str(root))
    cfg.model.image_size = size
    cfg.training.threads = threads  # the service's torch threads
    cfg.validate()
    torch.manual_seed(0)
    SiteModels.build(cfg, 3).save(site_models_path(root, SITE), ["background", "a", "b"])
    site_transform(cfg, root / "keys" / f"{SITE}.key", create=True)
    Coordinator(cfg, [SITE]).save_checkpoint(checkpoint_dir(cfg))
    return cfg


def start_service(run_dir: Path, port: int, tls: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedseg.cli", "serve", "--run", str(run_dir)]
    command += ["--port", str(port), "--tls-dir", str(tls)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connect(site_cfg: SiteClientConfig, service: subprocess.Popen) -> SegmentationClient:
    deadline = time.monotonic() + 120
    while True:
        try:
            return SegmentationClient(site_cfg)
        except Exception:
            if service.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stats(values: list[float]) -> str:
    ms = 1000 * np.asarray(values)
    return f"{np.median(ms):7.2f} {np.percentile(ms, 90):7.2f}"


def latency(size: int, n: int, threads: int, warmup: int = 5) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = make_run(root / "run", size, threads)
        tls = root / "tls"
        prepare_tls(tls, ["127.0.0.1", "localhost"], [SITE])  # mutual TLS, as fedseg serve
        port = free_port()
        service = start_service(root / "run", port, tls)
        try:
            site_cfg = SiteClientConfig(
                cfg,
                SITE,
                root / "run" / "keys" / f"{SITE}.key",
                site_models_path(root / "run", SITE),
                f"https://127.0.0.1:{port}",
                tls / "ca.pem",
                tls / "clients" / f"{SITE}.pem",
                tls / "clients" / f"{SITE}.key",
            )
            images = np.random.default_rng(0).standard_normal((n + warmup, 1, 1, size, size))
            with connect(site_cfg, service) as client:
                for image in images:
                    client.segment(image.astype(np.float32))
                calls = client.timing.calls[warmup:]
                sent = client.timing.sent // client.timing.images
                received = client.timing.received // client.timing.images
        finally:
            service.terminate()
            service.wait(timeout=20)
    phases = ["encode", "network_and_map", "server_map", "decode"]
    total = [sum(c[p] for p in phases if p != "server_map") for c in calls]
    print(f"\n{size}x{size} input, {len(calls)} single-image queries (median / p90, ms)")
    for phase in phases:
        print(f"  {phase:<26} {stats([c[phase] for c in calls])}")
    print(f"  {'total per image':<26} {stats(total)}")
    both = sent + received
    print(
        f"  latents per query: {sent} B sent + {received} B received = {both} B "
        f"({both / 2**20:.3f} MiB, {100 * both / REFERENCE_BYTES:.1f}% of the reference 0.875 MiB)"
    )


def fp16_dice(run_dir: Path) -> None:
    """Dice through the service's fp16 wire vs. the fp32 in-process path, per site."""
    from fedseg.data import site_for_partition
    from fedseg.evaluation import segmentation_metrics
    from fedseg.site import query_chunk, segment_mapped
    from fedseg.training import decode_masks, encode, map_latents

    state = torch.load(run_dir / "checkpoints" / "umn.pt", weights_only=True)
    cfg = config_from_dict(state["config"])
    cfg.out_dir = str(run_dir)
    if cfg.privacy.custody != "client":
        sys.exit("--run: the fp32 comparison is written for client custody")
    coordinator = Coordinator(cfg, list(state["sites"]))
    coordinator.restore_round(load_checkpoint(cfg, "umn.pt"))
    print(f"\nDice on {run_dir}: fp16 wire (service path) vs fp32 in-process")
    diffs = []
    for i, name in enumerate(coordinator.sites):
        test = site_for_partition(cfg, i).test
        assert test.name == name
        models, _ = SiteModels.load(cfg, site_models_path(run_dir, name))
        transform = site_transform(
            cfg, Path(cfg.privacy.key_dir or run_dir / "keys") / f"{name}.key", create=True
        )
        wire = coordinator.map_query(name, query_chunk(test, models, transform, 0, len(test)))
        pred16 = segment_mapped(cfg, models, transform, wire, test.images)
        with torch.no_grad():
            keyed = transform.forward(
                encode(models.image_ae, torch.from_numpy(test.images)), "image"
            )
            mapped = map_latents(coordinator.umn, name, keyed)
            pred32 = decode_masks(
                models.mask_ae, transform.inverse(mapped, "mask"), models.image_ae, test.images
            )
        spacing = test.spacing if test.spacing_known else None
        d16 = segmentation_metrics(pred16, test.masks, test.class_names, spacing)["dice_mean"]
        d32 = segmentation_metrics(pred32, test.masks, test.class_names, spacing)["dice_mean"]
        diffs.append(d16 - d32)
        print(f"  {name}: fp16 {d16:.4f}  fp32 {d32:.4f}  ({100 * (d16 - d32):+.2f} pp)")
    print(f"  largest difference {100 * max(map(abs, diffs)):.2f} pp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--n", type=int, default=50, help="timed queries per size")
    parser.add_argument("--run", type=Path, help="a finished client-custody run, for fp16 Dice")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, client and server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for size in args.sizes:
        latency(size, args.n, args.threads)
    if args.run:
        fp16_dice(args.run)


if __name__ == "__main__":
    main()
