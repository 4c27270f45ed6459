"""Data sources turned into per-hospital train/test sets (numpy only; no torch, no Flower)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedseg.config import DatasetConfig, HospitalConfig, RunConfig
from fedseg.data.dataset import DataError, SiteData
from fedseg.data.hospitals import build_hospitals
from fedseg.data.labels import LabelMap, default_class_names, mask_to_2d
from fedseg.data.nifti import load_nifti
from fedseg.data.pairs import load_pairs
from fedseg.data.splits import split_groups, train_test_split
from fedseg.data.synthetic import synthetic_site

__all__ = [
    "DataError",
    "LabelMap",
    "SiteData",
    "SiteSplit",
    "default_class_names",
    "load_dataset",
    "load_federation",
    "load_local_site",
    "load_nifti",
    "load_pairs",
    "mask_to_2d",
    "site_for_partition",
    "split_groups",
    "synthetic_site",
    "train_test_split",
]


@dataclass
class SiteSplit:
    """One simulated hospital: what it trains on and what it is evaluated on."""

    name: str
    train: SiteData
    test: SiteData
    profile: HospitalConfig | None = None  # its simulated behaviour (speed, dropout), if any
    index: int = 0  # position in the federation (seeds its per-round dropout draws)


def load_dataset(
    cfg: DatasetConfig, size: int, path: str | None = None, name: str = "data"
) -> SiteData:
    """One folder of real data as a single SiteData; ``path`` overrides ``cfg.path``."""
    folder = Path(path if path is not None else cfg.path)
    if cfg.kind == "pairs":
        return load_pairs(folder, cfg, size, name)
    if cfg.kind == "nifti":
        return load_nifti(folder, cfg, size, name)
    raise DataError(f"data.kind {cfg.kind!r} has no folder to load (use load_federation)")


def load_federation(cfg: RunConfig) -> list[SiteSplit]:
    """All hospitals of a run, cut by patient so no patient is in two sites or two splits."""
    data, fed, size = cfg.data, cfg.federation, cfg.model.image_size
    if cfg.hospitals:
        return _profiled_federation(cfg)
    if data.kind == "synthetic":
        sites = []
        for i in range(fed.num_sites):
            name = f"hospital-{i + 1}"
            site = synthetic_site(
                i, data.synthetic_train + data.synthetic_test, size, data.seed, name
            )
            train = site.subset(list(range(data.synthetic_train)))
            test = site.subset(list(range(data.synthetic_train, len(site))))
            sites.append(SiteSplit(name, train, test))
        return sites

    base = Path(data.path).name
    names = [f"{base}-{i + 1}" for i in range(fed.num_sites)]
    parts = split_groups(load_dataset(data, size, name=base), fed.num_sites, fed.seed, names)
    if data.test_path:
        held_out = load_dataset(data, size, path=data.test_path, name=f"{base}-test")
        if not data.label_values and not data.class_names:
            # Open identity map: the class count was inferred per folder; use the larger.
            widest = max(held_out.class_names, parts[0].class_names, key=len)
            for site_data in [held_out, *parts]:
                site_data.class_names = list(widest)
        if held_out.class_names != parts[0].class_names:
            raise DataError(
                f"{data.test_path}: classes {held_out.class_names} differ from "
                f"{data.path}: {parts[0].class_names}"
            )
        tests = split_groups(held_out, fed.num_sites, fed.seed, names)
        return [SiteSplit(p.name, p, t) for p, t in zip(parts, tests, strict=True)]
    sites = []
    for i, part in enumerate(parts):
        train, test = train_test_split(part, fed.test_fraction, fed.seed + i)
        sites.append(SiteSplit(part.name, train, test))
    return sites


def _profiled_federation(cfg: RunConfig) -> list[SiteSplit]:
    """Hospitals from ``[[hospitals]]`` profiles over ``[sources]`` and synthetic data."""
    size = cfg.model.image_size

    def load_source(name: str) -> tuple[SiteData, SiteData | None]:
        src = cfg.sources[name]
        pool = load_dataset(src, size, name=name)
        held_out = load_dataset(src, size, path=src.test_path, name=name) if src.test_path else None
        if held_out is not None and held_out.class_names != pool.class_names:
            raise DataError(
                f"sources.{name}: test classes {held_out.class_names} differ from "
                f"{pool.class_names}"
            )
        return pool, held_out

    return [
        SiteSplit(h.name, train, test, h.profile, h.index)
        for h, train, test in build_hospitals(cfg, load_source)
    ]


@lru_cache(maxsize=4)
def _cached_federation(run_json: str) -> list[SiteSplit]:
    from fedseg.config import config_from_dict

    return load_federation(config_from_dict(json.loads(run_json)))


def site_for_partition(cfg: RunConfig, partition_id: int) -> SiteSplit:
    """The site a simulated client plays; cached because many clients share one process.

    The returned arrays are shared between calls: treat them as read-only.
    """
    key = {
        "data": dataclasses.asdict(cfg.data),
        "federation": dataclasses.asdict(cfg.federation),
        "model": {"image_size": cfg.model.image_size},
        "sources": {k: dataclasses.asdict(v) for k, v in cfg.sources.items()},
        "hospitals": [dataclasses.asdict(h) for h in cfg.hospitals],
    }
    sites = _cached_federation(json.dumps(key, sort_keys=True))
    if not 0 <= partition_id < len(sites):
        raise DataError(f"partition_id {partition_id} out of range: {len(sites)} sites")
    return sites[partition_id]


def load_local_site(cfg: RunConfig, data_dir: Path, name: str) -> SiteSplit:
    """A real hospital's own folder: its ``test/`` subfolder is the test split if present,
    otherwise whole patients are held out with ``federation.test_fraction``."""
    size = cfg.model.image_size
    data = load_dataset(cfg.data, size, path=str(data_dir), name=name)
    if (data_dir / "test").is_dir():
        return SiteSplit(
            name, data, load_dataset(cfg.data, size, path=str(data_dir / "test"), name=name)
        )
    train, test = train_test_split(data, cfg.federation.test_fraction, cfg.federation.seed)
    return SiteSplit(name, train, test)
