"""Data sources turned into per-hospital train/test sets (numpy only; no torch, no Flower)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedseg.config import DatasetConfig, HospitalConfig, RunConfig, context_slices
from fedseg.data.dataset import DataError, SiteData
from fedseg.data.hospitals import build_hospitals, expand_hospitals
from fedseg.data.labels import LabelMap, default_class_names, mask_to_2d
from fedseg.data.nifti import load_nifti
from fedseg.data.pairs import folder_channels, load_pairs
from fedseg.data.splits import group_parts, split_groups, train_test_split
from fedseg.data.synthetic import synthetic_site
from fedseg.data.volumes import whole_volumes

__all__ = [
    "DataError",
    "LabelMap",
    "SiteData",
    "SiteSplit",
    "as_channels",
    "default_class_names",
    "image_channels",
    "input_channels",
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
    cfg: DatasetConfig,
    size: int,
    path: str | None = None,
    name: str = "data",
    channels: int = 0,
    select: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SiteData:
    """One folder of real data as a single SiteData; ``path`` overrides ``cfg.path``;
    ``channels`` (1 or 3) overrides ``cfg.channels`` (0: what the images are). ``select``:
    from the samples' groups, the indices to keep (image pairs outside them are not decoded)."""
    folder = Path(path if path is not None else cfg.path)
    if cfg.kind == "pairs":
        return load_pairs(folder, cfg, size, name, channels, select)
    if cfg.kind == "nifti":  # 2.5D stacks stay as they are (grey slices, context_slices)
        data = as_channels(load_nifti(folder, cfg, size, name), channels or 1)
        return data if select is None else data.subset(select(data.groups), name)
    raise DataError(f"data.kind {cfg.kind!r} has no folder to load (use load_federation)")


def as_channels(data: SiteData, channels: int) -> SiteData:
    """Grey sites repeated into three channels in a colour run (synthetic or NIfTI hospitals
    beside colour ones: every encoder takes the run's channels). A 2.5D stack of slices
    (``context_slices`` > 1, grey only) stays as it is."""
    if data.channels == channels or (data.context > 1 and channels == 1):
        return data
    if data.channels != 1 or channels != 3:
        raise DataError(f"{data.name}: {data.channels}-channel images cannot become {channels}")
    return dataclasses.replace(data, images=np.repeat(data.images, 3, axis=1))


def input_channels(cfg: RunConfig) -> int:
    """The channels every site's encoder (and a 2D baseline) takes: the images' channels
    times the slices per sample (``context_slices``, 2.5D)."""
    return image_channels(cfg) * context_slices(cfg)


def scored_test(cfg: RunConfig, test: SiteData) -> SiteData:
    """A test split as it is scored: whole volumes (``evaluation.per_volume``) for volume
    data, else as it is."""
    return whole_volumes(test) if cfg.evaluation.per_volume else test


def image_channels(cfg: RunConfig) -> int:
    """The run's encoder input channels: ``data.channels``, or (0 = auto) 3 when the images
    of a source the run uses are colour, else 1. Deterministic in the files, so every process
    of a run gets the same answer (a scenario file resolves it when loaded)."""
    if cfg.data.channels:
        return cfg.data.channels
    if cfg.hospitals:
        used = dict.fromkeys(h.source for h in cfg.hospitals if h.source in cfg.sources)
        sources = [cfg.sources[name] for name in used]
    else:
        sources = [cfg.data]
    given = [s.channels for s in sources if s.channels]
    if given:
        return given[0]
    colour = any(
        s.kind == "pairs" and _folder_channels(str(Path(s.path) / s.image_dir)) == 3
        for s in sources
    )
    return 3 if colour else 1


@lru_cache(maxsize=32)
def _folder_channels(folder: str) -> int:
    return folder_channels(Path(folder)) if Path(folder).is_dir() else 1


def load_federation(cfg: RunConfig, only: int | None = None) -> list[SiteSplit]:
    """All hospitals of a run, cut by patient so no patient is in two sites or two splits;
    ``only``: just that hospital (as a list of one), loading its own source and no other."""
    data, fed, size = cfg.data, cfg.federation, cfg.model.image_size
    channels = image_channels(cfg)
    context_slices(cfg)  # resolves context_slices = 0 (auto) before any source is loaded
    if only is not None and not 0 <= only < fed.num_sites:
        raise DataError(f"partition_id {only} out of range: {fed.num_sites} sites")
    if cfg.hospitals:
        return _profiled_federation(cfg, channels, only)
    if data.kind == "synthetic":
        sites = []
        for i in range(fed.num_sites) if only is None else [only]:
            name = simulated_hospital(cfg, i)[0]
            site = synthetic_site(
                i, data.synthetic_train + data.synthetic_test, size, data.seed, name
            )
            site = as_channels(site, channels)
            train = site.subset(list(range(data.synthetic_train)))
            test = site.subset(list(range(data.synthetic_train, len(site))))
            sites.append(SiteSplit(name, train, test))
        return sites

    base = Path(data.path).name
    names = [simulated_hospital(cfg, i)[0] for i in range(fed.num_sites)]
    parts = _cut(cfg, channels, None, base, names, only)
    if data.test_path:
        tests = _cut(cfg, channels, data.test_path, f"{base}-test", names, only)
        train_classes = next(iter(parts.values())).class_names
        test_classes = next(iter(tests.values())).class_names
        if not data.label_values and not data.class_names:
            # Open identity map: the class count was inferred per folder; use the larger.
            widest = max(test_classes, train_classes, key=len)
            for site_data in [*tests.values(), *parts.values()]:
                site_data.class_names = list(widest)
        elif test_classes != train_classes:
            raise DataError(
                f"{data.test_path}: classes {test_classes} differ from {data.path}: {train_classes}"
            )
        return [SiteSplit(p.name, p, scored_test(cfg, tests[i])) for i, p in parts.items()]
    sites = []
    for i, part in parts.items():
        train, test = train_test_split(part, fed.test_fraction, fed.seed + i)
        sites.append(SiteSplit(part.name, train, scored_test(cfg, test)))
    return sites


def _cut(
    cfg: RunConfig, channels: int, path: str | None, name: str, names: list[str], only: int | None
) -> dict[int, SiteData]:
    """The hospitals' parts of one folder, cut by patient (``split_groups``), by index; with
    ``only``, that hospital's part alone: the other hospitals' images are not decoded (each
    simulated hospital loads a third of hc18, not all of it)."""
    data, fed, size = cfg.data, cfg.federation, cfg.model.image_size
    if only is None:
        pool = load_dataset(data, size, path, name=name, channels=channels)
        return dict(enumerate(split_groups(pool, fed.num_sites, fed.seed, names)))

    def select(groups: np.ndarray) -> np.ndarray:
        return group_parts(groups, fed.num_sites, fed.seed, name)[only]

    part = load_dataset(data, size, path, name=names[only], channels=channels, select=select)
    return {only: part}


def _profiled_federation(cfg: RunConfig, channels: int, only: int | None) -> list[SiteSplit]:
    """Hospitals from ``[[hospitals]]`` profiles over ``[sources]`` and synthetic data."""
    size = cfg.model.image_size

    def load_source(name: str) -> tuple[SiteData, SiteData | None]:
        src = cfg.sources[name]
        pool = load_dataset(src, size, name=name, channels=channels)
        held_out = (
            load_dataset(src, size, path=src.test_path, name=name, channels=channels)
            if src.test_path
            else None
        )
        if held_out is not None and held_out.class_names != pool.class_names:
            raise DataError(
                f"sources.{name}: test classes {held_out.class_names} differ from "
                f"{pool.class_names}"
            )
        return pool, held_out

    return [
        SiteSplit(
            h.name, as_channels(train, channels), as_channels(test, channels), h.profile, h.index
        )
        for h, train, test in build_hospitals(cfg, load_source, only)
    ]


def simulated_hospital(cfg: RunConfig, partition_id: int) -> tuple[str, HospitalConfig | None, int]:
    """(name, profile, index) of the hospital a simulated client plays, without loading its
    data: the ClientApp's guard and profile need them for every message, and Ray hands a
    node's messages to whichever actor is free, so an actor that loaded a hospital's images
    for them would load every hospital's (hc18: 3.3 s each, most of a run's start-up)."""
    if not 0 <= partition_id < cfg.federation.num_sites:
        raise DataError(
            f"partition_id {partition_id} out of range: {cfg.federation.num_sites} sites"
        )
    if cfg.hospitals:
        hospital = expand_hospitals(cfg)[partition_id]
        return hospital.name, hospital.profile, hospital.index
    base = "hospital" if cfg.data.kind == "synthetic" else Path(cfg.data.path).name
    return f"{base}-{partition_id + 1}", None, 0


@lru_cache(maxsize=8)
def _cached_site(run_json: str, partition_id: int) -> SiteSplit:
    from fedseg.config import config_from_dict

    return load_federation(config_from_dict(json.loads(run_json)), only=partition_id)[0]


def site_for_partition(cfg: RunConfig, partition_id: int) -> SiteSplit:
    """The site a simulated client plays, loaded from its own source only; cached because many
    clients share one process.

    The returned arrays are shared between calls: treat them as read-only.
    """
    if not 0 <= partition_id < cfg.federation.num_sites:
        raise DataError(
            f"partition_id {partition_id} out of range: {cfg.federation.num_sites} sites"
        )
    context_slices(cfg)  # resolves context_slices = 0 (auto): part of the key below
    data = dataclasses.replace(cfg.data, channels=image_channels(cfg))
    key = {
        "data": dataclasses.asdict(data),
        "federation": dataclasses.asdict(cfg.federation),
        "model": {"image_size": cfg.model.image_size},
        "evaluation": {"per_volume": cfg.evaluation.per_volume},
        "sources": {k: dataclasses.asdict(v) for k, v in cfg.sources.items()},
        "hospitals": [dataclasses.asdict(h) for h in cfg.hospitals],
    }
    return _cached_site(json.dumps(key, sort_keys=True), partition_id)


def load_local_site(cfg: RunConfig, data_dir: Path, name: str) -> SiteSplit:
    """A real hospital's own folder: its ``test/`` subfolder is the test split if present,
    otherwise whole patients are held out with ``federation.test_fraction``. Cached per
    process (a hospital's site worker answers every split-training step from one load); the
    returned arrays are shared between calls: treat them as read-only.

    ``data.channels = 0`` is resolved from this folder and kept in ``cfg``, so the site's
    models are built for what it loaded (a deployment should set it explicitly: every
    hospital's encoder must take the same channels)."""
    context_slices(cfg)  # resolves context_slices = 0 (auto)
    if not cfg.data.channels:
        image_dir = data_dir / cfg.data.image_dir
        colour = cfg.data.kind == "pairs" and _folder_channels(str(image_dir)) == 3
        cfg.data.channels = 3 if colour else 1
    key = {
        "data": dataclasses.asdict(cfg.data),
        "image_size": cfg.model.image_size,
        "split": [cfg.federation.test_fraction, cfg.federation.seed],
        "per_volume": cfg.evaluation.per_volume,
    }
    return _cached_local_site(json.dumps(key, sort_keys=True), str(data_dir), name)


@lru_cache(maxsize=4)
def _cached_local_site(run_json: str, data_dir: str, name: str) -> SiteSplit:
    key = json.loads(run_json)
    data_cfg = DatasetConfig(**key["data"])
    size, (test_fraction, seed) = key["image_size"], key["split"]
    channels = data_cfg.channels

    def scored(test: SiteData) -> SiteData:
        return whole_volumes(test) if key["per_volume"] else test

    data = load_dataset(data_cfg, size, path=data_dir, name=name, channels=channels)
    if (Path(data_dir) / "test").is_dir():
        test = load_dataset(
            data_cfg, size, path=str(Path(data_dir) / "test"), name=name, channels=channels
        )
        return SiteSplit(name, data, scored(test))
    train, test = train_test_split(data, test_fraction, seed)
    return SiteSplit(name, train, scored(test))
