"""Patient-level splits: slices or repeat scans of one patient must never leak across a split."""

from __future__ import annotations

import numpy as np

from fedseg.data.dataset import DataError, SiteData


def _groups_in_random_order(
    groups: np.ndarray, seed: int
) -> tuple[list[str], dict[str, np.ndarray]]:
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(i)
    order = sorted(members)  # sorted first, so the shuffle does not depend on file order
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    return order, {g: np.asarray(idx, np.int64) for g, idx in members.items()}


def split_groups(data: SiteData, n_parts: int, seed: int, names: list[str]) -> list[SiteData]:
    """Cut one data set into ``n_parts`` hospitals of near-equal sample counts, by group."""
    if len(names) != n_parts:
        raise DataError(f"{data.name}: {n_parts} parts need {n_parts} names, got {names}")
    parts = group_parts(data.groups, n_parts, seed, data.name)
    return [data.subset(p, name) for p, name in zip(parts, names, strict=True)]


def group_parts(groups: np.ndarray, n_parts: int, seed: int, name: str) -> list[np.ndarray]:
    """The sample indices of each of :func:`split_groups`'s parts, from the samples' groups
    alone (so a hospital can load its own part of a set and leave the rest undecoded)."""
    order, members = _groups_in_random_order(groups, seed)
    if len(order) < n_parts:
        raise DataError(
            f"{name}: {len(order)} patient group(s) cannot fill {n_parts} sites; "
            "use fewer sites or more data (max_items)"
        )
    # Largest groups first, each to the currently smallest part (stable sort keeps the shuffle
    # among equal sizes, so which patients go where still depends on the seed).
    order.sort(key=lambda g: -len(members[g]))
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for group in order:
        smallest = min(range(n_parts), key=lambda p: len(parts[p]))
        parts[smallest].extend(members[group].tolist())
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def train_test_split(data: SiteData, test_fraction: float, seed: int) -> tuple[SiteData, SiteData]:
    """Hold out about ``test_fraction`` of the samples as whole groups; both sides non-empty."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order, members = _groups_in_random_order(data.groups, seed)
    if len(order) < 2:
        raise DataError(f"{data.name}: a train/test split needs at least 2 patient groups")
    target = test_fraction * len(data)
    test: list[int] = []
    for group in order[:-1]:  # the last group always stays in train
        if test and abs(len(test) + len(members[group]) - target) >= abs(len(test) - target):
            continue  # this group would overshoot; a smaller one later may fit
        test.extend(members[group].tolist())
    test_idx = np.sort(np.asarray(test, np.int64))
    train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
    return data.subset(train_idx), data.subset(test_idx)
