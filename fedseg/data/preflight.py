"""Every site's data checked before a federation starts, so a bad file is one clear line in
the user's terminal instead of a traceback inside a Ray actor after the run has begun.

The check reads what the loaders read (listing, pairing, headers, every image and mask, the
spacing CSV, the label values of the whole set, the pixel-count limit) and collects one
message per problem, each naming its file, instead of stopping at the first.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.config import DatasetConfig, RunConfig
from fedseg.data import image_channels
from fedseg.data.dataset import DataError
from fedseg.data.labels import LabelMap
from fedseg.data.nifti import check_voxels, match_volumes, read_volume, volume_shape, volume_stem
from fedseg.data.pairs import (
    check_pixels,
    group_of,
    image_header,
    mask_folder,
    mask_values,
    match_pairs,
    read_image,
    read_mask,
    read_spacing_csv,
)

MAX_LISTED = 50  # problems listed in the message; the rest are counted


class DataCheckError(DataError):
    """The run's data has problems; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = [f"- {p}" for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            shown.append(f"- ... and {len(problems) - MAX_LISTED} more")
        n = len(problems)
        super().__init__(f"{n} problem{'s' if n > 1 else ''} in the data:\n" + "\n".join(shown))


@dataclass
class SourceCheck:
    """What checking one data folder found."""

    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)  # patient ids of the files that passed
    files: int = 0


def check_run_data(cfg: RunConfig) -> list[str]:
    """Check every data source the run uses; the notices to show (e.g. 0/255 masks read as
    two classes), or :class:`DataCheckError` with every problem. Synthetic data needs none."""
    channels = image_channels(cfg)
    problems: list[str] = []
    notices: list[str] = []
    for data, where in _sources_used(cfg):
        folders = [data.path] + ([data.test_path] if data.test_path else [])
        found = [check_folder(Path(folder), data, channels) for folder in folders]
        for result in found:
            problems += result.problems
            notices += result.notices
        if not cfg.hospitals and not any(r.problems for r in found):
            problems += _split_problems(cfg, found[0].groups, bool(data.test_path), where)
    if problems:
        raise DataCheckError(problems)
    return notices


def _sources_used(cfg: RunConfig) -> list[tuple[DatasetConfig, str]]:
    if cfg.hospitals:
        used = dict.fromkeys(h.source for h in cfg.hospitals if h.source in cfg.sources)
        return [(cfg.sources[name], f"sources.{name}") for name in used]
    return [] if cfg.data.kind == "synthetic" else [(cfg.data, "data")]


def _split_problems(cfg: RunConfig, groups: set[str], held_out: bool, where: str) -> list[str]:
    """Enough patients for every site (and, without a test folder, a test split in each)."""
    sites = cfg.federation.num_sites
    need = sites if held_out else 2 * sites
    if len(groups) >= need:
        return []
    return [
        f"{where}.path {cfg.data.path}: {len(groups)} patient(s) cannot fill {sites} site(s)"
        + ("" if held_out else " with a train and a test split each")
        + f" (need {need}); use fewer sites, more data or another data.group_regex"
    ]


def check_folder(folder: Path, cfg: DatasetConfig, channels: int) -> SourceCheck:
    """One data folder (pairs or NIfTI) checked file by file."""
    result = SourceCheck()
    try:
        labels = LabelMap.from_config(cfg)
    except DataError as err:
        result.problems.append(f"{folder}: {err}")
        return result
    check = _check_volumes if cfg.kind == "nifti" else _check_pairs
    values = check(folder, cfg, channels, labels, result)
    if not result.problems:
        try:
            notice = labels.resolve(values, str(mask_folder(folder, cfg.mask_dir))).notice
        except DataError as err:
            result.problems.append(str(err))
        else:
            result.notices += [notice] if notice else []
    return result


def _check_pairs(
    folder: Path, cfg: DatasetConfig, channels: int, labels: LabelMap, result: SourceCheck
) -> set[int]:
    try:
        pairs, unpaired = match_pairs(folder, cfg)
    except DataError as err:
        result.problems.append(str(err))
        return set()
    result.problems += unpaired
    table = None
    if cfg.spacing_csv:
        try:
            table = read_spacing_csv(Path(cfg.spacing_csv), cfg.spacing_column)
        except DataError as err:
            result.problems.append(str(err))

    def one(pair: tuple[str, Path, Path]) -> tuple[str | None, set[int], str]:
        stem, image_path, mask_path = pair
        try:
            rows, cols, _ = image_header(image_path)
            check_pixels(image_path, rows, cols, cfg.max_pixels)
            mask = labels.apply(
                read_mask(mask_path, labels.needs_rgb, cfg.max_pixels), str(mask_path)
            )
            if mask.shape != (rows, cols):
                raise DataError(
                    f"{image_path} is {rows}x{cols} but {mask_path} is "
                    f"{mask.shape[0]}x{mask.shape[1]}"
                )
            read_image(image_path, channels, cfg.max_pixels)  # decodes: truncated files, NaN
            if table is not None and table.get(image_path.name, table.get(stem)) is None:
                raise DataError(f"{image_path}: not listed in spacing CSV {cfg.spacing_csv}")
        except DataError as err:
            return str(err), set(), stem
        return None, mask_values(mask) if labels.open else set(), stem

    return _gather(one, pairs, cfg, result)


def _check_volumes(
    folder: Path, cfg: DatasetConfig, channels: int, labels: LabelMap, result: SourceCheck
) -> set[int]:
    try:
        volumes, unpaired = match_volumes(folder, cfg)
    except DataError as err:
        result.problems.append(str(err))
        return set()
    result.problems += unpaired
    label_dir = mask_folder(folder, cfg.mask_dir)

    def one(path: Path) -> tuple[str | None, set[int], str]:
        label_path = label_dir / path.name
        try:
            shape, label_shape = volume_shape(path), volume_shape(label_path)
            check_voxels(path, shape, cfg.max_pixels)
            if shape != label_shape:
                raise DataError(f"{path} has shape {shape} but {label_path} has {label_shape}")
            read_volume(path, label=False, max_pixels=cfg.max_pixels)
            raw, _ = read_volume(label_path, label=True, max_pixels=cfg.max_pixels)
            label = labels.apply(raw, str(label_path), volume=True)
        except DataError as err:
            return str(err), set(), path.name
        return None, mask_values(label) if labels.open else set(), volume_stem(path)

    return _gather(one, volumes, cfg, result, by_volume=True)


def _gather(
    one, items: list, cfg: DatasetConfig, result: SourceCheck, by_volume: bool = False
) -> set[int]:
    """Run ``one`` over the files on a few threads; problems and values in file order.
    Patients: ``group_regex`` on the file stem, or the volume for NIfTI."""
    values: set[int] = set()
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for problem, seen, stem in pool.map(one, items):
            result.files += 1
            if problem:
                result.problems.append(problem)
            else:
                values |= seen
                result.groups.add(stem if by_volume else group_of(stem, cfg.group_regex))
    return values
