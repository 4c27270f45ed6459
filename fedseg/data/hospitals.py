"""Heterogeneous hospitals from profiles (``[[hospitals]]``): which data, how much, how it looks.

A profile names a source (synthetic, or a ``[sources]`` data set that several hospitals share by
patient), a sample count (explicit, or a share of the source: equal or Dirichlet), and the
acquisition differences of that hospital (intensity shift, contrast, noise, resolution, label
noise). Everything is deterministic in the run's seeds, so every simulated client process builds
the same hospitals.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from fedseg.config import HospitalConfig, RunConfig
from fedseg.data.dataset import DataError, SiteData, resize_image
from fedseg.data.splits import train_test_split
from fedseg.data.synthetic import synthetic_site
from fedseg.data.volumes import whole_volumes


@dataclass(frozen=True)
class Hospital:
    """One concrete hospital: a profile with ``count`` expanded and its index in the run."""

    index: int
    name: str
    profile: HospitalConfig


def expand_hospitals(cfg: RunConfig) -> list[Hospital]:
    """``count`` alike hospitals become separate entries with unique names."""
    out: list[Hospital] = []
    seen: dict[str, int] = {}
    for profile in cfg.hospitals:
        base = profile.name or profile.source
        for k in range(profile.count):
            name = f"{base}-{k + 1}" if profile.count > 1 or not profile.name else base
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                raise DataError(f"hospitals: name {name!r} is used twice")
            out.append(Hospital(len(out), name, profile))
    return out


def share_counts(total: int, explicit: list[int], alpha: float, seed: int, minimum: int = 2):
    """Patients per hospital: explicit counts kept, the rest of ``total`` shared equally
    (alpha = 0) or by a Dirichlet(alpha) draw, each share at least ``minimum``."""
    free = [i for i, n in enumerate(explicit) if n == 0]
    left = total - sum(explicit)
    counts = list(explicit)
    if not free:
        return counts
    if left < minimum * len(free):
        raise DataError(
            f"hospitals: {left} patients left for {len(free)} hospitals without `samples` "
            f"(need {minimum} each; the source has {total})"
        )
    if alpha > 0:
        weights = np.random.default_rng([seed, 424_242]).dirichlet([alpha] * len(free))
    else:
        weights = np.full(len(free), 1 / len(free))
    spare = left - minimum * len(free)
    extra = np.floor(weights * spare).astype(int)
    extra[np.argsort(-(weights * spare - extra))[: spare - int(extra.sum())]] += 1
    for i, e in zip(free, extra, strict=True):
        counts[i] = minimum + int(e)
    return counts


def build_hospitals(
    cfg: RunConfig, load_source, only: int | None = None
) -> list[tuple[Hospital, SiteData, SiteData]]:
    """(hospital, train, test) for every profile, or only for hospital ``only`` (a simulated
    client loads its own source, no other); ``load_source(name)`` -> (pool, held-out test or
    None) loads a ``[sources]`` data set once."""
    hospitals = expand_hospitals(cfg)
    if only is not None and not 0 <= only < len(hospitals):
        raise DataError(f"partition_id {only} out of range: {len(hospitals)} sites")
    wanted = {h.index for h in hospitals} if only is None else {only}
    fed, data, size = cfg.federation, cfg.data, cfg.model.image_size
    result: dict[int, tuple[SiteData, SiteData]] = {}

    synthetic = [h for h in hospitals if h.profile.source == "synthetic"]
    counts = share_counts(
        data.synthetic_train * len(synthetic),
        [h.profile.samples for h in synthetic],
        fed.dirichlet_alpha,
        fed.seed,
    )
    for h, n_train in zip(synthetic, counts, strict=True):
        if h.index not in wanted:
            continue
        n_test = h.profile.test_samples or data.synthetic_test
        style = h.profile.style if h.profile.style >= 0 else h.index
        site = synthetic_site(style, n_train + n_test, size, data.seed + _tag(h.name), h.name)
        result[h.index] = (
            site.subset(list(range(n_train))),
            site.subset(list(range(n_train, len(site)))),
        )

    sources = [h.profile.source for h in hospitals if h not in synthetic and h.index in wanted]
    for source in dict.fromkeys(sources):
        members = [h for h in hospitals if h.profile.source == source]
        pool, held_out = load_source(source)
        groups = np.unique(pool.groups)
        order = np.random.default_rng([fed.seed, 77]).permutation(len(groups))
        counts = share_counts(
            len(groups), [h.profile.samples for h in members], fed.dirichlet_alpha, fed.seed
        )
        if sum(counts) > len(groups):
            raise DataError(
                f"sources.{source}: hospitals ask for {sum(counts)} patients, it has {len(groups)}"
            )
        test_parts = _cut_held_out(held_out, len(members), fed.seed) if held_out else None
        start = 0
        for k, (h, n) in enumerate(zip(members, counts, strict=True)):
            mine = set(groups[order[start : start + n]].tolist())
            start += n
            if h.index not in wanted:
                continue
            part = pool.subset(np.flatnonzero([g in mine for g in pool.groups]), h.name)
            if test_parts is not None:
                train, test = part, test_parts[k].subset(list(range(len(test_parts[k]))), h.name)
            else:
                train, test = train_test_split(part, fed.test_fraction, fed.seed + _tag(h.name))
            result[h.index] = (train, test)

    out = []
    for h in hospitals:
        if h.index not in wanted:
            continue
        train, test = result[h.index]
        if cfg.evaluation.per_volume:  # every slice of the test volumes, before the profile
            test = whole_volumes(test)
        seed = cfg.data.seed + _tag(h.name)
        train = apply_profile(train, h.profile, size, seed, train=True)
        test = apply_profile(test, h.profile, size, seed + 7, train=False)
        out.append((h, train, test))
    return out


def _tag(name: str) -> int:
    """A seed offset from the hospital's name, so its data does not depend on its position
    (the same hospital alone or in a federation gets the same split and noise)."""
    return zlib.crc32(name.encode()) % 100_003


def _cut_held_out(held_out: SiteData, k: int, seed: int) -> list[SiteData]:
    from fedseg.data.splits import split_groups

    return split_groups(held_out, k, seed, [f"{held_out.name}-{i}" for i in range(k)])


def apply_profile(data: SiteData, p: HospitalConfig, size: int, seed: int, train: bool) -> SiteData:
    """The hospital's acquisition (resolution, contrast, shift, noise) on normalised images,
    and annotator error on its training masks only (test masks stay the truth)."""
    if len(data) == 0:
        return data
    images = data.images.copy()
    spacing = data.spacing.copy()
    rng = np.random.default_rng([seed, 31_337])
    if p.resolution and p.resolution != size:
        for i in range(len(images)):
            for c in range(images.shape[1]):
                low = resize_image(images[i, c], p.resolution)
                images[i, c] = resize_image(low, size)
    if p.contrast != 1.0 or p.intensity_shift or p.noise:
        images = images * p.contrast + p.intensity_shift
        if p.noise:
            images = images + p.noise * rng.standard_normal(images.shape).astype(np.float32)
    masks = data.masks
    if train and p.label_noise > 0:
        masks = masks.copy()
        step = max(1, size // 64)
        for j in np.flatnonzero(rng.uniform(size=len(masks)) < p.label_noise):
            dy, dx = rng.integers(-2 * step, 2 * step + 1, size=2)
            masks[j] = np.roll(masks[j], (int(dy), int(dx)), axis=(0, 1))
    return dataclasses.replace(
        data,
        images=images.astype(np.float32),
        masks=masks,
        spacing=spacing,
        names=list(data.names),
        class_names=list(data.class_names),
    )
