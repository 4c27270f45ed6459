"""Performance suite: latency, throughput, wire bytes, size, compute and memory of the two UMNs.

Everything here goes through the project's own calls (``fedseg.site``, ``fedseg.coordinator``,
``fedseg.training``), so the figures are those of the real query path:

- client encode + transform: ``site.query_chunk`` (image AE encoder, KLT, fp16 pack);
- server mapping: ``Coordinator.map_query`` (unpack and validate, UMN, fp16 pack);
- client inverse + decode: ``site.segment_mapped`` (unpack, inverse KLT, mask decoder, argmax).

Modes::

    python benchmarks/suite.py --quick --out results/bench/quick.json     # synthetic, ~1-2 min
    python benchmarks/suite.py --out results/bench/suite.json             # full timing
    python benchmarks/suite.py --dice --config simulations/scenarios/us-nerve.toml \\
        --out results/bench/dice.json                                     # tens of minutes

Timings are medians and 90th percentiles over repeated runs after warm-up, with the torch
thread count and the machine's load average (``os.getloadavg``) recorded next to them. Each
architecture is measured in its own child process, so its peak resident memory is its own.
``--dice`` trains the sites' autoencoders once (or takes them from ``--ae-cache``), collects
the keyed latents once, then trains each UMN variant on those same latents with the same epoch
budget (in parallel child processes, one torch thread each) and scores it with the project's
MONAI evaluation.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedseg.config import RunConfig, load_config  # noqa: E402
from fedseg.coordinator import Coordinator  # noqa: E402
from fedseg.models.autoencoder import latent_shapes  # noqa: E402
from fedseg.privacy.keys import KeyRing, generate_secret  # noqa: E402
from fedseg.privacy.klt import LatentTransform  # noqa: E402
from fedseg.site import (  # noqa: E402
    SiteModels,
    evaluate_predictions,
    query_chunk,
    segment_mapped,
    site_transform,
    stream_length,
    train_site,
    training_chunk,
)
from fedseg.training import Budget, SiteLatents, train_autoencoders, train_umn  # noqa: E402
from fedseg.wire import pack, payload_bytes  # noqa: E402

REFERENCE_BYTES = 114_688 * 4 * 2  # the reference: 114,688 fp32 values each way = 0.875 MiB
SITES = ["site-a", "site-b", "site-c"]
ARCHS = ("fast", "reference")


# --------------------------------------------------------------------------- helpers


def load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def timed(fn, repeats: int, warmup: int) -> dict[str, float]:
    """Median and p90 milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "repeats": repeats,
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """``fast``, ``reference`` or ``fast:<width>x<blocks>`` applied to a copy of ``cfg``."""
    out = copy.deepcopy(cfg)
    arch, _, size = variant.partition(":")
    if arch not in ARCHS:
        raise SystemExit(f"unknown variant {variant!r}: fast, reference or fast:<width>x<blocks>")
    out.model.umn_arch = arch
    if size:
        width, blocks = size.split("x")
        out.model.umn_width, out.model.umn_blocks = int(width), int(blocks)
    return out


def synthetic_cfg(image_size: int, threads: int) -> RunConfig:
    cfg = RunConfig(name="bench", out_dir=tempfile.mkdtemp(prefix="fedseg-bench-"))
    cfg.model.image_size = image_size
    cfg.training.threads = threads
    return cfg


def count_macs(net: torch.nn.Module, inputs) -> int:
    """Multiply-accumulates of one forward pass, by torch's FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return int(counter.get_total_flops() // 2)


def machine_gflops(threads: int, quick: bool) -> dict[str, float]:
    """Measured fp32 throughput of this machine: a large matmul and a UMN-like convolution."""
    torch.set_num_threads(threads)
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = timed(lambda: a @ b, 3 if quick else 10, 1)
    conv = torch.nn.Conv2d(96, 96, 3, padding=1, bias=False).eval()
    x = torch.randn(16, 96, 16, 16).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        cv = timed(lambda: conv(x), 5 if quick else 30, 2)
    conv_flops = 2 * 16 * 16 * 16 * 96 * 96 * 9
    return {
        "matmul_n": n,
        "matmul_gflops": 2 * n**3 / (mm["median_ms"] * 1e6),
        "conv_gflops": conv_flops / (cv["median_ms"] * 1e6),
        "threads": threads,
    }


# --------------------------------------------------------------------------- per-arch worker


def arch_worker(job: dict) -> dict:
    """One architecture's inference and training figures, in a fresh process."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    cfg = variant_config(synthetic_cfg(job["image_size"], job["threads"]), job["variant"])
    rss_start = peak_rss_mib()
    num_classes = 3
    models = SiteModels.build(cfg, num_classes)
    models.image_ae.eval()
    models.mask_ae.eval()
    transform = LatentTransform(KeyRing.from_secret(generate_secret(), cfg.model.latent_channels))
    coord = Coordinator(cfg, SITES)
    site = SITES[0]
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    size = cfg.model.image_size
    repeats, warmup = job["repeats"], job["warmup"]
    out: dict = {"variant": job["variant"], "threads": job["threads"], "image_size": size}
    out["umn_params"] = sum(p.numel() for p in coord.umn.parameters())
    latents1 = [torch.randn(1, *s) for s in shapes]
    coord.umn.eval()
    out["umn_macs"] = count_macs(coord.umn, (latents1, 0))
    if job.get("macs_256"):
        shapes256 = latent_shapes(256, cfg.model.latent_channels)
        out["umn_macs_256"] = count_macs(coord.umn, ([torch.randn(1, *s) for s in shapes256], 0))
    out["ae_macs"] = {
        "image_encoder": count_macs(models.image_ae.encoder, (torch.randn(1, 1, size, size),)),
        "mask_decoder": count_macs(models.mask_ae.decoder, (latents1,)),
    }

    # Per-query latency (batch 1) and throughput (batch 16) through the real query path.
    rng = np.random.default_rng(0)
    for batch in (1, 16):
        data = SimpleNamespace(images=rng.standard_normal((batch, 1, size, size), np.float32))
        query = query_chunk(data, models, transform, 0, batch)
        answer = coord.map_query(site, query)
        image_latents = [torch.from_numpy(query[f"image{s}"].astype(np.float32)) for s in range(3)]
        n_rep = repeats if batch == 1 else max(repeats // 8, 3)
        load_before = load()
        parts = {
            "client_encode_transform": timed(
                lambda d=data, n=batch: query_chunk(d, models, transform, 0, n), n_rep, warmup
            ),
            "server_map": timed(lambda q=query: coord.map_query(site, q), n_rep, warmup),
            "client_inverse_decode": timed(
                lambda a=answer, x=data.images[:batch]: segment_mapped(
                    cfg, models, transform, a, x
                ),
                n_rep,
                warmup,
            ),
        }
        with torch.no_grad():
            parts["umn_forward"] = timed(lambda z=image_latents: coord.umn(z, 0), n_rep, warmup)
        total = sum(parts[k]["median_ms"] for k in list(parts)[:3])
        out[f"batch{batch}"] = {
            **parts,
            "total_median_ms": total,
            "images_per_s": batch / total * 1e3,
            "load_avg": {"before": load_before, "after": load()},
        }

    # Training throughput: the project's loops for one epoch on synthetic data.
    n_train = job["train_items"]
    gen = torch.Generator().manual_seed(0)
    lat = [torch.randn(n_train, *s, generator=gen).half() for s in shapes]
    mlat = [torch.randn(n_train, *s, generator=gen).half() for s in shapes]
    started = time.perf_counter()
    train_umn(coord.umn, [SiteLatents(site, lat, mlat)], Budget(1), 1e-3, 16, 0)
    out["umn_train_images_per_s"] = n_train / (time.perf_counter() - started)
    if job.get("ae_train"):
        images = rng.standard_normal((job["ae_items"], 1, size, size)).astype(np.float32)
        masks = rng.integers(0, num_classes, (job["ae_items"], size, size))
        fresh = SiteModels.build(cfg, num_classes)
        started = time.perf_counter()
        train_autoencoders(
            images, masks, fresh.image_ae, fresh.mask_ae, num_classes, Budget(1), 2e-3, 16, 0,
            latent_noise=cfg.training.mask_latent_noise,
            cross_weight=cfg.training.cross_decoding_weight,
        )  # fmt: skip
        out["ae_train_images_per_s"] = job["ae_items"] / (time.perf_counter() - started)
    out["load_avg_end"] = load()
    out["peak_rss_mib"] = peak_rss_mib()
    out["rss_after_imports_mib"] = rss_start
    return out


def klt_overhead(threads: int, repeats: int, image_size: int = 128) -> dict:
    """Forward KLT on the image latents + inverse on the mask latents of one query."""
    torch.set_num_threads(threads)
    shapes = latent_shapes(image_size, 32)
    transform = LatentTransform(KeyRing.from_secret(generate_secret(), 32))
    image = [torch.randn(1, *s).contiguous(memory_format=torch.channels_last) for s in shapes]
    mask = [torch.randn(1, *s).contiguous(memory_format=torch.channels_last) for s in shapes]

    def step() -> None:
        transform.forward(image, "image")
        transform.inverse(mask, "mask")

    back = transform.inverse(transform.forward(image, "image"), "image")
    error = max(float((a - b).abs().max()) for a, b in zip(back, image, strict=True))
    return {
        **timed(step, repeats, max(repeats // 10, 10)),
        "threads": threads,
        "image_size": image_size,
        "round_trip_max_abs_error": error,
        "load_avg": load(),
    }


def wire_bytes() -> dict:
    out = {}
    for size in (128, 256):
        both_ways = 2 * payload_bytes(latent_shapes(size, 32))
        out[str(size)] = {
            "bytes_both_ways": both_ways,
            "fraction_of_reference": both_ways / REFERENCE_BYTES,
        }
    # Check payload_bytes against what pack really produces.
    packed = pack([torch.zeros(1, *s) for s in latent_shapes(256, 32)], "image")
    assert sum(a.nbytes for a in packed.values()) * 2 == out["256"]["bytes_both_ways"]
    return out


def run_timing(args) -> dict:
    ctx = mp.get_context("spawn")
    jobs = [
        {
            "variant": v,
            "threads": args.threads,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "train_items": 32 if args.quick else 192,
            "ae_train": True,
            "ae_items": 16 if args.quick else 64,
            "macs_256": True,
        }
        for v in args.variants
    ]
    # KLT first, while this process is quiet (no child processes exist yet).
    klt = klt_overhead(1, 200 if args.quick else 3000, args.image_size)
    results = {}
    for job in jobs:  # one at a time: timings must not compete with each other
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results[job["variant"]] = pool.submit(arch_worker, job).result()
    return {
        "archs": results,
        "klt": klt,
        "wire": wire_bytes(),
        "machine": machine_gflops(args.threads, args.quick),
    }


# --------------------------------------------------------------------------- Dice mode


def ae_tag(cfg: RunConfig) -> str:
    """What the site autoencoders depend on (not the UMN): the cache key."""
    model = {k: v for k, v in cfg.to_dict()["model"].items() if not k.startswith("umn")}
    model.pop("canonical_adapters", None)
    training = {
        k: v
        for k, v in cfg.to_dict()["training"].items()
        if not k.startswith(("umn", "finetune"))  # what happens after the AEs are trained
        and k not in ("augment_copies", "adapter_lr_scale", "threads")
    }
    data = {"data": cfg.to_dict()["data"], "federation": cfg.to_dict()["federation"]}
    blob = json.dumps([model, training, data], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def dice_setup(args, cfg: RunConfig, work: Path, console: Console) -> dict:
    from fedseg.data import load_federation

    torch.set_num_threads(1)
    sites = load_federation(cfg)
    cache = Path(args.ae_cache) if args.ae_cache else work / "aes"
    cache.mkdir(parents=True, exist_ok=True)
    tag = ae_tag(cfg)
    key_dir = work / "keys"
    info: dict = {"ae_tag": tag, "sites": {}, "latents": str(work / "latents.pt")}
    chunks: dict[str, list] = {}
    for s in sites:
        path = cache / f"ae_{s.name}_{tag}.pt"
        started = time.perf_counter()
        if path.is_file():
            models = SiteModels.build(cfg, s.train.num_classes)
            models.load_state(torch.load(path, weights_only=True))
            how = "cache"
        else:
            models, _ = train_site(cfg, s.train)
            torch.save(models.state(), path)
            how = "trained"
        ae_s = time.perf_counter() - started
        transform = site_transform(cfg, key_dir / f"{s.name}.key", create=True)
        started = time.perf_counter()
        n = stream_length(s.train, cfg.training.augment_copies)
        chunks[s.name] = [
            training_chunk(cfg, s.train, models, transform, a, min(a + 128, n))
            for a in range(0, n, 128)
        ]
        info["sites"][s.name] = {
            "ae": str(path),
            "ae_source": how,
            "ae_seconds": ae_s,
            "train_items": len(s.train),
            "test_items": len(s.test),
            "latent_items": n,
            "collect_seconds": time.perf_counter() - started,
        }
        console.print(f"{s.name}: AEs {how} ({ae_s:.0f} s), {n} latents collected")
    torch.save(chunks, work / "latents.pt")
    info["key_dir"] = str(key_dir)
    return info


def dice_worker(job: dict) -> dict:
    """Train one UMN variant on the shared latents, then score it (MONAI Dice)."""
    from fedseg.data import load_federation

    if job["nice"]:
        os.nice(job["nice"])
    torch.set_num_threads(1)
    cfg = variant_config(load_config(job["config"]), job["variant"])
    cfg.training.threads = 1
    cfg.training.augment_copies = job["augment_copies"]
    cfg.training.umn_rounds = job["rounds"]
    cfg.training.umn_epochs_per_round = job["epochs_per_round"]
    cfg.out_dir = job["out_dir"]
    sites = load_federation(cfg)
    names = [s.name for s in sites]
    chunks = torch.load(job["latents"], weights_only=False)
    coord = Coordinator(cfg, names, key_dir=job["key_dir"])
    for name in names:
        for arrays in chunks[name]:
            coord.add_chunk(name, arrays)
    started = time.perf_counter()

    def progress(epoch: int, epochs: int, loss: float) -> None:
        elapsed = time.perf_counter() - started
        print(f"  {job['variant']}: epoch {epoch} loss {loss:.4f} ({elapsed:.0f} s)", flush=True)

    losses = [coord.train_round(on_epoch=progress) for _ in range(cfg.training.umn_rounds)]
    train_s = time.perf_counter() - started
    per_site = {}
    for s in sites:
        models = SiteModels.build(cfg, s.train.num_classes)
        models.load_state(torch.load(job["aes"][s.name], weights_only=True))
        transform = site_transform(cfg, Path(job["key_dir"]) / f"{s.name}.key", create=True)
        query = query_chunk(s.test, models, transform, 0, len(s.test))
        pred = segment_mapped(cfg, models, transform, coord.map_query(s.name, query), s.test.images)
        m = evaluate_predictions(s.test, pred)
        per_site[s.name] = {
            "dice_mean": m["dice_mean"],
            "dice": m["dice"],
            "hd95_mean": m["hd95_mean"],
        }
    return {
        "variant": job["variant"],
        "umn_params": coord.parameter_count(),
        "epochs": coord.epoch,
        "rounds": coord.round,
        "train_seconds": train_s,
        "final_loss": losses[-1],
        "dice_mean": float(np.mean([v["dice_mean"] for v in per_site.values()])),
        "hd95_mean": float(np.mean([v["hd95_mean"] for v in per_site.values()])),
        "sites": per_site,
    }


def run_dice(args, console: Console) -> dict:
    cfg = load_config(args.config)
    cfg.training.threads = 1
    if args.augment_copies >= 0:
        cfg.training.augment_copies = args.augment_copies
    work = Path(args.work or tempfile.mkdtemp(prefix="fedseg-dice-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.nice:
        os.nice(args.nice)
    started = time.perf_counter()
    info = dice_setup(args, cfg, work, console)
    rounds = args.umn_rounds or cfg.training.umn_rounds
    per_round = args.umn_epochs_per_round or cfg.training.umn_epochs_per_round
    jobs = [
        {
            "variant": v,
            "config": str(Path(args.config).resolve()),
            "rounds": rounds,
            "augment_copies": cfg.training.augment_copies,
            "epochs_per_round": per_round,
            "latents": info["latents"],
            "key_dir": info["key_dir"],
            "aes": {k: v["ae"] for k, v in info["sites"].items()},
            "out_dir": str(work / v),
            "nice": 0,  # inherited from this process
        }
        for v in args.variants
    ]
    console.print(f"training {', '.join(args.variants)}: {rounds} rounds x {per_round} epochs each")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=ctx) as pool:
        futures = {j["variant"]: pool.submit(dice_worker, j) for j in jobs}
        results = {v: f.result() for v, f in futures.items()}
    return {
        "config": str(args.config),
        "setup": info,
        "augment_copies": cfg.training.augment_copies,
        "umn_rounds": rounds,
        "umn_epochs_per_round": per_round,
        "variants": results,
        "wall_seconds": time.perf_counter() - started,
        "load_avg_end": load(),
    }


# --------------------------------------------------------------------------- output


def print_timing(result: dict, console: Console) -> None:
    archs = result["archs"]
    table = Table(title=f"fedseg per-query figures ({result['meta']['threads']} torch thread(s))")
    table.add_column("figure")
    for v in archs:
        table.add_column(v, justify="right")

    def row(label: str, fn) -> None:
        table.add_row(label, *(fn(a) for a in archs.values()))

    def ms(batch: str, part: str):
        return lambda a: f"{a[batch][part]['median_ms']:.2f} / {a[batch][part]['p90_ms']:.2f}"

    row("client encode+KLT, ms (median / p90), batch 1", ms("batch1", "client_encode_transform"))
    row("server mapping, ms, batch 1", ms("batch1", "server_map"))
    row("  of which UMN forward, ms", ms("batch1", "umn_forward"))
    row("client inverse+decode, ms, batch 1", ms("batch1", "client_inverse_decode"))
    row("total per query, ms (sum of medians)", lambda a: f"{a['batch1']['total_median_ms']:.2f}")
    row("throughput batch 16, images/s", lambda a: f"{a['batch16']['images_per_s']:.1f}")
    row("UMN parameters", lambda a: f"{a['umn_params'] / 1e6:.2f} M")
    row(f"UMN MACs at {result['meta']['image_size']} px", lambda a: f"{a['umn_macs'] / 1e6:.0f} M")
    row("UMN MACs at 256 px", lambda a: f"{a['umn_macs_256'] / 1e6:.0f} M")
    gflops = result["machine"]["conv_gflops"]
    row(
        "UMN floor (MACs x 2 / conv GFLOP/s), ms",
        lambda a: f"{2 * a['umn_macs'] / (gflops * 1e6):.2f}",
    )
    row("UMN training, images/s", lambda a: f"{a['umn_train_images_per_s']:.1f}")
    row(
        "AE training (image+mask AE), images/s",
        lambda a: f"{a.get('ae_train_images_per_s', 0):.1f}",
    )
    row(
        "peak RSS, MiB (after imports)",
        lambda a: f"{a['peak_rss_mib']:.0f} ({a['rss_after_imports_mib']:.0f})",
    )
    row(
        "load avg (1 min) before batch-1 timing",
        lambda a: f"{a['batch1']['load_avg']['before']['1min']}",
    )
    console.print(table)
    k, w, m = result["klt"], result["wire"], result["machine"]
    console.print(
        f"KLT per query (forward image + inverse mask latents, {k['image_size']} px, "
        f"{k['threads']} thread): median {k['median_ms'] * 1e3:.1f} us, "
        f"p90 {k['p90_ms'] * 1e3:.1f} us; "
        f"round trip error {k['round_trip_max_abs_error']:.1e}"
    )
    for size, b in w.items():
        console.print(
            f"wire bytes per query at {size} px (fp16, both ways): {b['bytes_both_ways']:,} B = "
            f"{100 * b['fraction_of_reference']:.1f}% of the reference 0.875 MiB"
        )
    console.print(
        f"machine: {m['matmul_gflops']:.1f} GFLOP/s ({m['matmul_n']}^2 matmul), "
        f"{m['conv_gflops']:.1f} GFLOP/s (96-ch 3x3 conv, 16x16, batch 16), "
        f"{m['threads']} thread(s)"
    )


def print_dice(result: dict, console: Console) -> None:
    table = Table(title=f"mean foreground Dice, same AEs and latents ({result['config']})")
    for col in ("variant", "UMN params", "epochs", "train s", "mean Dice", "HD95", "per site"):
        table.add_column(col)
    for v, r in result["variants"].items():
        table.add_row(
            v,
            f"{r['umn_params'] / 1e6:.2f} M",
            str(r["epochs"]),
            f"{r['train_seconds']:.0f}",
            f"{r['dice_mean']:.4f}",
            f"{r['hd95_mean']:.1f}",
            " ".join(f"{s['dice_mean']:.3f}" for s in r["sites"].values()),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench/suite.json")
    parser.add_argument("--quick", action="store_true", help="few repeats, small training sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=0, help="timed calls (0: 20 quick, 100)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(ARCHS))
    parser.add_argument("--dice", action="store_true", help="train and score every variant")
    parser.add_argument("--config", default="simulations/scenarios/us-nerve.toml")
    parser.add_argument("--ae-cache", default="", help="folder of cached site AEs (by config)")
    parser.add_argument("--work", default="", help="--dice: keys, latents, run folders")
    parser.add_argument("--umn-rounds", type=int, default=0, help="--dice: 0 = the scenario's")
    parser.add_argument("--umn-epochs-per-round", type=int, default=0)
    parser.add_argument(
        "--augment-copies", type=int, default=-1, help="--dice: -1 = the scenario's"
    )
    parser.add_argument("--workers", type=int, default=2, help="--dice: variants trained at once")
    parser.add_argument("--nice", type=int, default=0, help="--dice: lower this run's priority")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (20 if args.quick else 100)
    console = Console()
    meta = {
        "threads": args.threads,
        "image_size": args.image_size,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_start": load(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    if args.dice:
        result = {"meta": meta, **run_dice(args, console)}
        print_dice(result, console)
    else:
        result = {"meta": meta, **run_timing(args)}
        print_timing(result, console)
    result["meta"]["load_avg_end"] = load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    console.print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
