"""The typed configuration tree: the one place where defaults live.

A scenario TOML file maps onto :class:`RunConfig` section by section (``[data]``,
``[federation]``, ``[model]``, ``[training]``, ``[privacy]``, ``[baselines]``). Unknown keys
are errors, so a typo in a hospital's config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DataKind = Literal["synthetic", "pairs", "nifti"]
Transform = Literal["none", "klt", "knt"]
Custody = Literal["client", "server"]
UmnArch = Literal["fast", "reference", "he"]
FinetuneShare = Literal["none", "blind", "average"]
TAMPERING = ("missing-record", "extra-items", "scaled", "huge", "forged-metrics")
Preset = Literal["blind-split", "paper"]
AdapterScope = Literal["site", "shared"]
KeyScope = Literal["site", "federation"]
QueryMode = Literal["plain", "ckks"]
Mode = Literal["latents", "inr"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class Range:
    """The values one numeric field may take, so a bad value fails at load, not deep in a run:
    ``lo``..``hi`` (ends excluded with ``lo_open``/``hi_open``), a step (``multiple``), and
    special values outside the range (``also``, e.g. -1 = off)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    multiple: int = 0
    also: tuple[float, ...] = ()
    meaning: str = ""  # what the special values mean, for the message

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below and (not self.multiple or value % self.multiple == 0)

    def describe(self) -> str:
        parts = []
        if self.lo > -math.inf:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi < math.inf:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        text = " and ".join(parts) or "finite"
        if self.multiple:
            text += f" and a multiple of {self.multiple}"
        if self.also:
            text += f", or {' or '.join(_num(v) for v in self.also)}"
            text += f" ({self.meaning})" if self.meaning else ""
        return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def at_least(lo: float, **kw: Any) -> Range:
    return Range(lo=lo, **kw)


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
COUNT = Range(lo=1)  # at least one
SEED = Range(lo=0, hi=2**63 - 1)  # numpy and torch refuse negative seeds
FRACTION = Range(0, 1)


@dataclass
class DatasetConfig:
    """Where one data source lives and how its files become (image, class map) pairs."""

    kind: DataKind = "synthetic"
    path: str = ""  # folder with images/ + masks/ (or labels/); relative to the config file
    test_path: str = ""  # optional held-out test folder with the same layout (e.g. us-nerve/test)
    image_dir: str = "images"
    mask_dir: str = ""  # "" = "masks" if present, else "labels"
    label_values: list[int] = field(default_factory=list)  # stored value of class i; [] = identity
    class_names: list[str] = field(default_factory=list)  # [] = "background", "class1", ...
    spacing_csv: str = ""  # CSV with a file-name column and a mm-per-pixel column
    spacing_column: str = ""  # column of spacing_csv; "" = the first column naming "pixel size"
    spacing_mm: float = 0.0  # isotropic spacing for pairs; 0 = unknown (metrics in pixels)
    group_regex: str = ""  # first group of a match on the file stem = patient id; "" = file
    axis: int = 2  # NIfTI slicing axis
    keep_empty_slices: bool = False  # NIfTI: keep slices without foreground
    # NIfTI: slices per sample, the slice and its neighbours as input channels (2.5D): 1, 3
    # or 5; 0 = 3 when every source of the run is volumes, else 1 (validate() resolves it).
    # Hippocampus per volume, blind split training: 0.852 with 3 slices, 0.823 with 1
    # (docs/results.md).
    context_slices: int = 0
    max_items: int = 0  # use at most this many files/volumes (0 = all), for quick runs
    # Image channels the encoders take: 1 grey (colour files become luminance), 3 colour (grey
    # files are repeated into three channels); 0 = what the images are (a scenario resolves it
    # when loaded). "auto", "grey" and "rgb" are accepted too. One value for the whole run.
    channels: int = 0
    # Masks as stored (docs/data.md). >= 0: binary masks, stored value > threshold (in any
    # channel) is foreground, so compression noise (JPEG) is no error; -1 = off.
    mask_threshold: float = -1.0
    label_colors: list[list[int]] = field(default_factory=list)  # RGB of class i (colour-coded)
    label_color_tolerance: float = 40.0  # RGB distance a stored colour may be off (compression)
    max_pixels: int = 100_000_000  # largest image (pixels) or volume (voxels) decoded; bigger
    #   files are refused before decoding (a 12000x12000 PNG of 140 KB needs 3 GB)
    # synthetic hospitals
    synthetic_train: int = 32  # training images per synthetic hospital
    synthetic_test: int = 12
    seed: int = 0


@dataclass
class FederationConfig:
    """How the pooled data is cut into hospitals and how Ray simulates them."""

    num_sites: int = 3
    test_fraction: float = 0.2  # used when the data set has no separate test folder
    seed: int = 0
    client_cpus: float = 2.0  # Ray resources per simulated client
    node_wait_s: float = 60.0  # how long the server waits for nodes to register
    message_timeout_s: float = 3600.0  # a node that has not replied by then is dropped (0 = wait)
    actors: int = 0  # Ray actors running clients at once (0 = CPU cores // client_cpus, >= 1)
    dirichlet_alpha: float = 0.0  # > 0: hospitals without explicit `samples` share a source
    #   by a Dirichlet(alpha) draw (quantity skew); 0 = equal shares
    round_timeout_s: float = 0.0  # per-UMN-round reply deadline (0 = message_timeout_s)
    # A site's latents or gradients whose RMS exceeds this many times the largest RMS of its
    # own earlier payloads are refused for that step (fedseg/wire.py MagnitudeGuard); 0 = off.
    magnitude_bound: float = 10.0
    round_items: int = -1  # fresh training latents a site sends per UMN round (-1 = one
    #   augmented pass of its training set, 0 = none: rounds are heartbeats only)
    registry: str = ""  # node id -> site name file (fedseg deploy register); "" = trust the
    #   names nodes report, as in a simulation
    # Long-lived processes that keep the hospitals' split-training state in memory
    # (fedseg/site_worker.py, Linux): -1 = one per simulated hospital up to 4 (a deployed
    # hospital: one), 0 = none (each message computes where Flower runs it, saving the state
    # before it replies), N = that many shared by the simulated hospitals.
    site_workers: int = -1


@dataclass
class HospitalConfig:
    """One simulated hospital's profile (``[[hospitals]]``); ``count`` > 1 makes that many alike.

    Shifts are applied after the loader's per-image normalisation, so they survive it.
    """

    name: str = ""  # "" = "<source>-<i>"; with count > 1 a suffix -1, -2, ... is added
    source: str = "synthetic"  # "synthetic" (uses [data]'s synthetic_* sizes) or a [sources] key
    count: int = 1
    samples: int = 0  # training patients (images; volumes for NIfTI); 0 = a share of the source
    test_samples: int = 0  # synthetic only: test images (0 = data.synthetic_test)
    style: int = -1  # synthetic look (scanner/case mix) index; -1 = the hospital's index
    intensity_shift: float = 0.0  # added to every pixel (in units of the image's std)
    contrast: float = 1.0  # multiplies the normalised image
    noise: float = 0.0  # extra Gaussian noise std (units of the image's std)
    resolution: int = 0  # acquisition px: down- then up-sampled to model.image_size (0 = none)
    label_noise: float = 0.0  # fraction of training masks shifted by 1-2 px (annotator error)
    speed: float = 1.0  # compute-speed factor: 0.5 = every reply takes twice as long
    dropout: float = 0.0  # probability that the site fails in a given UMN round
    failure: Literal["raise", "timeout"] = "raise"  # how a dropped-out round fails
    # A malicious site (simulations/adversary.py): the attacks it makes on its replies, in turn:
    # "missing-record", "extra-items" (10x the items asked), "scaled" (latents x100), "huge"
    # (a 1 GiB reply), "forged-metrics" (evaluation). The server must refuse every one.
    tamper: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Widths of the autoencoders and the mapping network."""

    image_size: int = 128
    ae_widths: list[int] = field(default_factory=lambda: [16, 32, 48, 64, 96])
    latent_channels: int = 32  # channels of each of the three latent scales
    # "reference": the paper's ~59 M-parameter UMN (width/blocks unused); "he": per-position
    # polynomial network a server can evaluate on CKKS ciphertexts (fedseg/models/umn_he.py)
    umn_arch: UmnArch = "fast"
    umn_width: int = (
        64  # was 96: 1.8x the mapping time for Dice within 0.4 pp (docs/performance.md)
    )
    # residual context blocks per scale; was 2: one costs about an eighth less compute a
    # split-training epoch for the same Dice (session 38, docs/performance.md)
    umn_blocks: int = 1
    canonical_adapters: bool = True  # start each site's adapters at its latents' principal axes
    # "shared": one adapter set for every site, for sites that encode into one space (a shared
    # encoder through finetune_share, and one key: privacy.key_scope = "federation",
    # server custody, or no transform). "site": one UMN adapter per site (the paper preset: each
    # site's own AEs and key, so different latent spaces). us-nerve split training: docs/results.md.
    umn_adapters: AdapterScope = "shared"
    # The mask decoder also takes the site's own image encoder's 1/2 and 1/4 scale features
    # (fedseg/models/autoencoder.py). They never leave the site; only split training
    # (training.finetune_epochs != 0) teaches the decoder to use them. us-nerve: docs/results.md.
    local_skips: bool = True
    # The mask decoder standardises each latent channel first (batch norm without affine). In
    # client custody its input is the server's output un-keyed, R^T (out - b): the key's bias
    # b reaches the decoder as an offset that only the key holder could have removed.
    decoder_input_norm: bool = True


@dataclass
class TrainingConfig:
    """Epochs, learning rates and time budgets (a budget of 0 means epochs only)."""

    batch_size: int = (
        8  # twice the optimiser steps of 16 for the same images (us-nerve: docs/results.md)
    )
    ae_epochs: int = 0  # 0: no reconstruction pre-training (split training from the seeded init)
    ae_lr: float = 2e-3
    ae_minutes: float = 0.0
    mask_latent_noise: float = 0.3  # noise (x latent std) the mask decoder learns to ignore
    cross_decoding_weight: float = 1.0  # 0 = the paper's reconstruction-only image AE
    augment_copies: int = 2  # augmented encodings per training image sent for the UMN
    umn_rounds: int = 0  # server rounds (a checkpoint after each); 0: no training latents sent
    umn_epochs_per_round: int = 8
    umn_lr: float = 1e-3
    adapter_lr_scale: float = 1.0  # learning-rate factor for the per-site adapters
    umn_minutes: float = 0.0
    # Split training (fedseg/finetune.py): encoder, UMN and mask decoder trained together on
    # Dice + CE, only keyed latents and their gradients crossing. The default, from the seeded
    # initialisation (ae_epochs = 0, umn_rounds = 0). Its epochs: -1 = as many as
    # ``finetune_optimizer_steps`` take at the site with the most steps an epoch
    # (fedseg/finetune.py split_epochs), so the schedule follows the data: us-nerve 150 epochs,
    # hippocampus 48, hc18 110; 0 = off (the paper preset's pipeline).
    finetune_epochs: int = -1
    # Optimiser steps a site takes in the phase when finetune_epochs = -1. us-nerve, seed 0, in
    # process: 150 epochs (1,200 steps) Dice 0.703, 400 epochs 0.700 (docs/performance.md).
    finetune_optimizer_steps: int = 1200
    finetune_lr: float = 2e-3
    # Whether the sites' encoders and mask decoders are one model during split training:
    # "blind" (the default: averaged after every epoch as masked fixed-point sums the server
    # adds but cannot read, fedseg/privacy/blind.py), "none" (each site keeps its own), and
    # "average" (the server averages them: SplitFed, the reference blind aggregation is measured
    # against; the weights reach the server, so a site's own config must say so).
    finetune_share: FinetuneShare = "blind"
    # One message each way per step instead of two (the default): a site sends its next
    # batch's latents with this batch's gradient, so its encoder runs one step behind (the
    # batch's gradient goes back through the weights that encoded it). Through Flower an epoch
    # costs 7.78 s instead of 11.32 on hippocampus and 3.60 instead of 4.62 on us-nerve, with
    # the same final Dice (0.769 against 0.763, 0.706 against 0.710); a deployed exchange
    # costs about 6 s of Flower's latency, so there it saves most (docs/performance.md).
    finetune_pipeline: bool = True
    # FedBN (Li et al., ICLR 2021): the encoder's and mask decoder's batch norms (affine
    # weights and running statistics) stay at each site and out of the aggregation; the rest is
    # shared as finetune_share says. For hospitals whose scanners differ (feature shift): the
    # demo's synthetic hospitals 0.820 over seeds 0-3 (100 epochs) against 0.781 (seeds 0/1,
    # 120 epochs) with shared norms. Off by default: on one source cut into sites it costs
    # Dice (us-nerve 0.672 against 0.707, hippocampus 0.762 against 0.770, seed 0;
    # docs/results.md).
    local_batch_norm: bool = False
    threads: int = 2
    seed: int = 0


@dataclass
class PrivacyConfig:
    """Which latent transform the clients apply and who holds the keys."""

    transform: Transform = "klt"
    custody: Custody = "client"
    key_dir: str = ""  # where simulated clients keep their key files; "" = <out>/keys
    # "federation": the hospitals share one secret (agreed out of band, never sent to the
    # server; simulation: <key_dir>/federation.key), so their keyed latents are in one space,
    # the UMN needs no per-site adapters, and blind aggregation derives its masks from it.
    # "site": every hospital its own secret (the paper preset) (docs/privacy.md).
    key_scope: KeyScope = "federation"
    bias_scale: float = 1.0
    audit_dir: str = ""  # keep a copy of every payload each site sends (for audits and tests)
    # How evaluation queries travel: "plain" (keyed fp16 latents) or "ckks" (CKKS ciphertexts of
    # them; the server maps them encrypted: needs model.umn_arch = "he"; docs/privacy.md)
    query: QueryMode = "plain"
    # Implicit neural obfuscation (``mode = "inr"``, fedseg/privacy/inr.py): a hospital fits one
    # small NeRV-style network to each chunk of its training images and shares the images it
    # re-renders from k-anonymity-mixed codes, (I + rho R) E with R Gaussian, fresh per release.
    inr_rho: float = 0.04  # mixing strength; 0 = no mixing (re-rendering only)
    inr_chunk: int = 64  # images per network (a site's images split into equal chunks);
    #   the codes' perturbation grows like rho * sqrt(chunk)
    inr_code_dim: int = 32  # length of each image's learnable code
    # Channels from the fully connected stem to the last conv + pixel-shuffle stage; the stem
    # is image_size / 2**(len - 1) pixels wide. Sets the compression ratio (pixels per fitted
    # parameter, codes included): 8.2x for 68 grey 128 px images with these.
    inr_widths: list[int] = field(default_factory=lambda: [48, 32, 24, 16, 12, 8])
    inr_steps: int = 800  # Adam steps of the 1 - SSIM fit per chunk
    inr_batch: int = 8  # images per fitting step
    inr_lr: float = 1e-2


@dataclass
class BaselineConfig:
    """Privacy-agnostic references trained in the same harness."""

    centralized_unet: bool = True
    local_unet: bool = True
    unet_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    epochs: int = 60
    minutes: float = 0.0  # 0 = epochs only; "match" budgets are set by the caller
    match_wall_clock: bool = True  # give the centralized UNet the federated run's training time
    lr: float = 2e-3
    # Volume data: also MONAI's 3D UNet on the pooled training volumes at native resolution,
    # with the centralized UNet's time budget (fedseg/training3d.py)
    unet3d: bool = False
    unet3d_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    unet3d_batch_size: int = 2


@dataclass
class EvaluationConfig:
    """How test splits are scored (fedseg/evaluation.py); only metrics leave a site."""

    # Volume data: a test split holds every slice of its volumes, and each volume is also
    # scored whole, back on its own grid, in 3D (Dice, HD95 and ASD in mm per volume and
    # class, the Decathlon convention), beside the per-slice figures.
    per_volume: bool = True
    # Also write each site's predicted test volumes as NIfTI with their source's affine and
    # header, on the site's own disk: <out>/sites/<site>/predictions/<method>/<volume>.nii.gz
    write_volumes: bool = False


@dataclass
class AttackConfig:
    """Settings of the attack suite (``fedseg attack``); attacks never change a run."""

    victim: int = 0  # index of the victim site; the next site's training images are auxiliary
    inversion_epochs: int = 40  # learned-inversion decoder training on the auxiliary images
    key_recovery_pairs: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 8, 12, 16, 32])
    knt_fit_steps: int = 600  # gradient steps of the KNT key-recovery fit per pair count
    reid_epochs: int = 40  # contrastive embedding network training
    reid_repeats: int = 3  # patient splits (and seeds) re-identification is averaged over
    bootstrap: int = 1000  # resamples for AUC confidence intervals
    seed: int = 0


@dataclass
class RunConfig:
    """One run: a scenario plus where its results go."""

    name: str = "demo"
    # The defaults above are blind split training; "paper" is PPCMI-SF as published (see PRESETS).
    preset: Preset = "blind-split"
    # What a hospital shares. "latents": keyed latents (the default's split training, or the
    # paper preset's pipeline). "inr": images re-rendered by implicit networks with mixed codes,
    # and its masks (privacy.inr_*); the server trains the centralized baseline's UNet
    # (baselines.unet_channels, epochs, lr) on them and sends it back for each hospital to
    # score on its own test split. The model and training settings of the latent pipelines
    # are unused then.
    mode: Mode = "latents"
    data: DatasetConfig = field(default_factory=DatasetConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    # Heterogeneous federations: named data sources and hospital profiles ([] = the [data]
    # source cut into federation.num_sites alike sites, as before).
    sources: dict[str, DatasetConfig] = field(default_factory=dict)
    hospitals: list[HospitalConfig] = field(default_factory=list)
    out_dir: str = "results/demo"
    overlays_per_site: int = 4
    resume: bool = False  # continue from <out_dir>/checkpoints if they were made with this config

    def validate(self) -> RunConfig:
        """Reject values that would fail later, deep inside a Ray actor (and resolve
        ``context_slices = 0``)."""
        _resolve_context(self)
        checks = [
            (self.model.image_size % 32 == 0, "model.image_size must be a multiple of 32"),
            (len(self.model.ae_widths) == 5, "model.ae_widths needs 5 stages"),
            (self.federation.num_sites >= 1, "federation.num_sites must be >= 1"),
            (0 < self.federation.test_fraction < 1, "federation.test_fraction must be in (0, 1)"),
            (
                self.privacy.transform in ("none", "klt", "knt"),
                "privacy.transform: 'none', 'klt' or 'knt'",
            ),
            (self.privacy.custody in ("client", "server"), "privacy.custody: 'client'/'server'"),
            (self.data.kind in ("synthetic", "pairs", "nifti"), "data.kind: synthetic/pairs/nifti"),
            (self.data.kind == "synthetic" or bool(self.data.path), "data.path is required"),
            (self.training.batch_size >= 1, "training.batch_size must be >= 1"),
            (
                self.training.finetune_share in ("none", "blind", "average"),
                "training.finetune_share: 'blind', 'none' or 'average'",
            ),
            (
                self.training.finetune_share != "blind" or self.privacy.key_scope == "federation",
                "training.finetune_share = 'blind' derives its masks from the hospitals' shared "
                "secret: it needs privacy.key_scope = 'federation'",
            ),
            (
                self.training.finetune_share != "blind" or self.privacy.custody == "client",
                "training.finetune_share = 'blind' needs privacy.custody = 'client': with server "
                "custody the server holds the shared secret, so it could remove the masks",
            ),
            (self.training.ae_epochs >= 0, "training.ae_epochs must be >= 0"),
            (self.model.umn_adapters in ("site", "shared"), "model.umn_adapters: site/shared"),
            (self.privacy.query in ("plain", "ckks"), "privacy.query: 'plain' or 'ckks'"),
            (self.mode in ("latents", "inr"), "mode: 'latents' or 'inr'"),
            (len(self.privacy.inr_widths) >= 1, "privacy.inr_widths needs at least one width"),
            (
                self.model.image_size % 2 ** (len(self.privacy.inr_widths) - 1) == 0,
                "privacy.inr_widths: model.image_size must be a multiple of 2**(stages) "
                f"({len(self.privacy.inr_widths) - 1} stages)",
            ),
            (
                self.privacy.query != "ckks" or self.model.umn_arch == "he",
                "privacy.query = 'ckks' needs model.umn_arch = 'he' (a network CKKS can evaluate)",
            ),
            (
                self.privacy.key_scope in ("site", "federation"),
                "privacy.key_scope: site/federation",
            ),
            (
                self.model.umn_adapters == "site"
                or self.privacy.transform == "none"
                or self.privacy.custody == "server"
                or self.privacy.key_scope == "federation",
                "model.umn_adapters = 'shared' needs the sites' latents in one space: "
                "privacy.key_scope = 'federation', privacy.custody = 'server' or no transform",
            ),
            (self.training.umn_rounds >= 0, "training.umn_rounds must be >= 0"),
            (
                self.training.ae_epochs > 0
                or self.training.ae_minutes > 0
                or self.training.finetune_epochs != 0,
                "training.ae_epochs = 0 (no pre-training) needs split training "
                "(training.finetune_epochs != 0)",
            ),
            (
                self.training.umn_rounds > 0 or self.training.finetune_epochs != 0,
                "training.umn_rounds = 0 (no latent training) needs split training "
                "(training.finetune_epochs != 0)",
            ),
            (self.training.finetune_lr > 0, "training.finetune_lr must be > 0"),
            (
                not self.model.local_skips or self.training.finetune_epochs != 0,
                "model.local_skips needs split training (training.finetune_epochs != 0; only it "
                "teaches the mask decoder to use the site's image features)",
            ),
            (self.federation.actors >= 0, "federation.actors must be >= 0"),
            (
                not self.hospitals
                or self.federation.num_sites == sum(h.count for h in self.hospitals),
                "federation.num_sites must equal the hospitals' total count",
            ),
            (self.federation.dirichlet_alpha >= 0, "federation.dirichlet_alpha must be >= 0"),
            *_hospital_checks(self),
            *_section_checks(self),
            *_channel_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        _resolve_context(self)  # what a run records and compares is what it loads
        return dataclasses.asdict(self)


# Every numeric field's allowed values (tests/test_config.py checks that none is missing),
# and the allowed values of each element of the numeric list fields.
RANGES: dict[type, dict[str, Range]] = {
    DatasetConfig: {
        "spacing_mm": NON_NEGATIVE,
        "axis": Range(0, 2),
        "max_items": NON_NEGATIVE,
        "synthetic_train": COUNT,
        "synthetic_test": COUNT,
        "seed": SEED,
        "channels": Range(1, 1, also=(0, 3), meaning="0 = what the images are, 3 = colour"),
        "context_slices": Range(
            1, 1, also=(0, 3, 5), meaning="slices per sample, 2.5D; 0 = 3 for volumes"
        ),
        "mask_threshold": Range(0, 65535, hi_open=True, also=(-1,), meaning="-1 = off"),
        "label_color_tolerance": Range(0, 442),  # 442 > the RGB cube's diagonal
        "max_pixels": COUNT,
    },
    FederationConfig: {
        "num_sites": COUNT,
        "test_fraction": Range(0, 1, lo_open=True, hi_open=True),
        "seed": SEED,
        "client_cpus": POSITIVE,
        "node_wait_s": POSITIVE,
        "message_timeout_s": NON_NEGATIVE,
        "actors": NON_NEGATIVE,
        "dirichlet_alpha": NON_NEGATIVE,
        "round_timeout_s": NON_NEGATIVE,
        "magnitude_bound": Range(1, also=(0,), meaning="0 = off"),
        "round_items": Range(0, also=(-1,), meaning="-1 = one augmented pass"),
        "site_workers": Range(0, also=(-1,), meaning="-1 = auto, 0 = none"),
    },
    HospitalConfig: {
        "count": COUNT,
        "samples": NON_NEGATIVE,
        "test_samples": NON_NEGATIVE,
        "style": Range(0, also=(-1,), meaning="-1 = the hospital's index"),
        "intensity_shift": Range(),
        "contrast": POSITIVE,
        "noise": NON_NEGATIVE,
        "resolution": Range(8, also=(0,), meaning="0 = none"),
        "label_noise": FRACTION,
        "speed": POSITIVE,
        "dropout": Range(0, 1, hi_open=True),
    },
    ModelConfig: {
        "image_size": Range(32, 4096, multiple=32),
        "latent_channels": COUNT,
        "umn_width": Range(8, multiple=8),  # GroupNorm(8) and pyramid pooling's width // 4
        "umn_blocks": NON_NEGATIVE,
    },
    TrainingConfig: {
        "batch_size": COUNT,
        "ae_epochs": NON_NEGATIVE,
        "ae_lr": POSITIVE,
        "ae_minutes": NON_NEGATIVE,
        "mask_latent_noise": NON_NEGATIVE,
        "cross_decoding_weight": NON_NEGATIVE,
        "augment_copies": COUNT,
        "umn_rounds": NON_NEGATIVE,
        "umn_epochs_per_round": COUNT,
        "umn_lr": POSITIVE,
        "adapter_lr_scale": POSITIVE,
        "umn_minutes": NON_NEGATIVE,
        "finetune_epochs": Range(lo=0, also=(-1,), meaning="from finetune_optimizer_steps"),
        "finetune_optimizer_steps": COUNT,
        "finetune_lr": POSITIVE,
        "threads": COUNT,
        "seed": SEED,
    },
    PrivacyConfig: {
        "bias_scale": NON_NEGATIVE,
        "inr_rho": NON_NEGATIVE,
        "inr_chunk": COUNT,
        "inr_code_dim": COUNT,
        "inr_steps": NON_NEGATIVE,
        "inr_batch": COUNT,
        "inr_lr": POSITIVE,
    },
    BaselineConfig: {
        "epochs": COUNT,
        "minutes": NON_NEGATIVE,
        "lr": POSITIVE,
        "unet3d_batch_size": COUNT,
    },
    AttackConfig: {
        "victim": NON_NEGATIVE,
        "inversion_epochs": COUNT,
        "knt_fit_steps": COUNT,
        "reid_epochs": COUNT,
        "reid_repeats": COUNT,
        "bootstrap": COUNT,
        "seed": SEED,
    },
    RunConfig: {"overlays_per_site": NON_NEGATIVE},
}
ELEMENT_RANGES: dict[type, dict[str, Range]] = {
    DatasetConfig: {"label_values": NON_NEGATIVE, "label_colors": Range(0, 255)},
    ModelConfig: {"ae_widths": COUNT},
    PrivacyConfig: {"inr_widths": COUNT},
    BaselineConfig: {"unet_channels": COUNT, "unet3d_channels": COUNT},
    AttackConfig: {"key_recovery_pairs": COUNT},
}


def _field_checks(section: Any, where: str) -> list[tuple[bool, str]]:
    """Each numeric field of one section against :data:`RANGES`, each list element against
    :data:`ELEMENT_RANGES`; ``where`` is the section's name in messages (``data``)."""
    checks: list[tuple[bool, str]] = []
    prefix = f"{where}." if where else ""
    ranges, elements = RANGES.get(type(section), {}), ELEMENT_RANGES.get(type(section), {})
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        name = f"{prefix}{f.name}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            allowed = ranges.get(f.name, Range())  # tests/test_config.py: none is missing
            checks.append((value in allowed, f"{name} must be {allowed.describe()}, got {value!r}"))
        elif f.name in elements and isinstance(value, list):
            allowed = elements[f.name]
            flat = [v for item in value for v in (item if isinstance(item, list) else [item])]
            bad = [v for v in flat if isinstance(v, bool) or v not in allowed]
            checks.append(
                (not bad, f"{name}: every entry must be {allowed.describe()}, got {bad[:3]}")
            )
    return checks


def _section_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    sections: list[tuple[Any, str]] = [
        (cfg, ""),
        (cfg.data, "data"),
        (cfg.federation, "federation"),
        (cfg.model, "model"),
        (cfg.training, "training"),
        (cfg.privacy, "privacy"),
        (cfg.baselines, "baselines"),
        (cfg.evaluation, "evaluation"),
        (cfg.attack, "attack"),
        *((src, f"sources.{k}") for k, src in cfg.sources.items()),
        *((h, f"hospitals[{i}]") for i, h in enumerate(cfg.hospitals)),
    ]
    checks = [check for section, where in sections for check in _field_checks(section, where)]
    for src, where in [(cfg.data, "data"), *((s, f"sources.{k}") for k, s in cfg.sources.items())]:
        checks += _mask_checks(src, where)
    return checks


def _mask_checks(data: DatasetConfig, where: str) -> list[tuple[bool, str]]:
    """How stored masks become classes: one of label_values, label_colors, mask_threshold."""
    ways = [
        name
        for name, used in (
            ("label_values", bool(data.label_values)),
            ("label_colors", bool(data.label_colors)),
            ("mask_threshold", data.mask_threshold >= 0),
        )
        if used
    ]
    colours = [tuple(c) for c in data.label_colors]
    n_classes = len(data.label_values) or len(colours) or (2 if data.mask_threshold >= 0 else 0)
    return [
        (
            len(ways) <= 1,
            f"{where}: {' and '.join(ways)} are alternatives (stored values, colours or a "
            "threshold): give one",
        ),
        (
            all(len(c) == 3 for c in colours),
            f"{where}.label_colors: each entry is an RGB triplet [r, g, b], "
            f"got {data.label_colors}",
        ),
        (
            len(set(colours)) == len(colours),
            f"{where}.label_colors has duplicates: {data.label_colors}",
        ),
        (
            len(set(data.label_values)) == len(data.label_values),
            f"{where}.label_values has duplicates: {data.label_values}",
        ),
        (
            not data.class_names or not n_classes or len(data.class_names) == n_classes,
            f"{where}.class_names has {len(data.class_names)} names but "
            f"{ways[0] if ways else 'the label map'} means {n_classes} classes",
        ),
    ]


def _channel_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """One input channel count for the run: every site's encoder takes the same images."""
    given = {f"sources.{k}": s.channels for k, s in cfg.sources.items() if s.channels}
    if cfg.data.channels:
        given = {"data": cfg.data.channels, **given}
    return [
        (
            len(set(given.values())) <= 1,
            "channels differ between "
            + ", ".join(f"{k}.channels = {v}" for k, v in given.items())
            + ": every site's encoder takes the same input (set data.channels once)",
        ),
        (
            bool(cfg.hospitals) or cfg.data.channels != 3 or cfg.data.kind == "pairs",
            f"data.channels = 3 needs colour image files (kind 'pairs'), not {cfg.data.kind!r}",
        ),
        *_context_checks(cfg),
    ]


def _context_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """2.5D input (``context_slices`` > 1) comes from volumes, and every site's encoder takes
    the same number of slices."""
    used = _sources_of(cfg)
    given = {where: s.context_slices for where, s in used}
    flat = [where for where, s in used if s.context_slices > 1 and s.kind != "nifti"]
    synthetic = any(h.source == "synthetic" for h in cfg.hospitals)
    return [
        (
            not flat,
            f"{', '.join(flat)}: context_slices > 1 needs volumes (kind 'nifti')",
        ),
        (
            len(set(given.values())) <= 1 and not (synthetic and max(given.values()) > 1),
            "context_slices differ between the run's sources ("
            + ", ".join(f"{k} = {v}" for k, v in given.items())
            + "): every site's encoder takes the same input",
        ),
        (
            max(given.values()) == 1 or cfg.data.channels in (0, 1),
            "context_slices > 1 stacks grey slices: data.channels must be 1",
        ),
        (
            max(given.values()) == 1 or cfg.mode != "inr",
            'mode = "inr" re-renders single images: context_slices must be 1',
        ),
    ]


def _sources_of(cfg: RunConfig) -> list[tuple[str, DatasetConfig]]:
    """The data sections a run reads: its [sources] when hospitals use them, else [data]."""
    if cfg.hospitals:
        used = dict.fromkeys(h.source for h in cfg.hospitals if h.source in cfg.sources)
        if used:
            return [(f"sources.{k}", cfg.sources[k]) for k in used]
    return [("data", cfg.data)]


AUTO_CONTEXT = 3  # 2.5D for volume data unless a scenario says otherwise (docs/results.md)


def _resolve_context(cfg: RunConfig) -> None:
    """``context_slices = 0`` (auto): 3 slices per sample when every source the run reads is
    volumes, else 1, so that every site's encoder takes the same input."""
    used = _sources_of(cfg)
    # The inr mode re-renders single images; 2.5D is measured for the latent modes only.
    volumes = (
        cfg.mode != "inr"
        and all(s.kind == "nifti" for _, s in used)
        and not any(h.source == "synthetic" for h in cfg.hospitals)
    )
    for data in [cfg.data, *cfg.sources.values()]:
        if data.context_slices == 0:
            data.context_slices = AUTO_CONTEXT if volumes and data.kind == "nifti" else 1


def context_slices(cfg: RunConfig) -> int:
    """Slices per sample of the run (2.5D input; 1 = a slice alone)."""
    _resolve_context(cfg)
    return max(s.context_slices for _, s in _sources_of(cfg))


def _hospital_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    checks = []
    for i, h in enumerate(cfg.hospitals):
        where = f"hospitals[{i}] ({h.name or h.source})"
        checks += [
            (
                h.source == "synthetic" or h.source in cfg.sources,
                f"{where}: source {h.source!r} "
                f"is neither 'synthetic' nor a [sources] key ({', '.join(cfg.sources) or 'none'})",
            ),
            (h.count >= 1, f"{where}: count must be >= 1"),
            (h.samples >= 0 and h.test_samples >= 0, f"{where}: samples must be >= 0"),
            (0 <= h.dropout < 1, f"{where}: dropout must be in [0, 1)"),
            (0 <= h.label_noise <= 1, f"{where}: label_noise must be in [0, 1]"),
            (h.speed > 0, f"{where}: speed must be > 0"),
            (h.contrast > 0 and h.noise >= 0, f"{where}: contrast > 0 and noise >= 0"),
            (h.resolution == 0 or h.resolution >= 8, f"{where}: resolution 0 or >= 8 px"),
            (
                set(h.tamper) <= set(TAMPERING),
                f"{where}: tamper: each of {', '.join(TAMPERING)}",
            ),
        ]
    for name, src in cfg.sources.items():
        checks.append(
            (
                src.kind in ("pairs", "nifti") and bool(src.path),
                f"sources.{name}: kind 'pairs' or 'nifti' with a path",
            )
        )
    return checks


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a dataclass from a dict, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        args = typing.get_args(hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.{name}] must be a table")
            kwargs[name] = _build(hint, value, f"{where}.{name}".strip("."))
        elif args and isinstance(args[-1], type) and dataclasses.is_dataclass(args[-1]):
            # list[...] or dict[str, ...] of tables
            kwargs[name] = _build_many(args[-1], value, f"{where}.{name}".strip("."))
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}".strip("."))
    return cls(**kwargs)


def _build_many(cls: type, value: Any, where: str) -> Any:
    """``[[where]]`` (a list of tables) or ``[where.<key>]`` (a table of tables)."""
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [_build(cls, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return {k: _build(cls, v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"[{where}] must be tables, got {value!r}")


# Names a scenario may give instead of a number, by field name.
ALIASES: dict[str, dict[str, int]] = {
    "channels": {"auto": 0, "grey": 1, "gray": 1, "rgb": 3, "colour": 3, "color": 3},
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the field's type (list elements too); ``where`` names it."""
    origin = typing.get_origin(hint)
    aliases = ALIASES.get(where.rsplit(".", 1)[-1], {})
    if aliases and isinstance(value, str):
        if value.lower() not in aliases:
            raise ConfigError(
                f"{where} must be a number or one of {', '.join(aliases)}, got {value!r}"
            )
        return aliases[value.lower()]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be int, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal and value not in typing.get_args(hint):
        raise ConfigError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}")
    return value


# Named starting points a scenario picks with a top-level ``preset = "..."``; its own values
# then override the preset's. "blind-split" is the dataclass defaults. "paper" is PPCMI-SF as
# published, for reproduction: each site pre-trains its own image and mask autoencoders under
# its own key, sends keyed latents of its training set, and the server trains the UMN on
# latent MSE (docs/results.md).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "blind-split": {},
    "paper": {
        "model": {"umn_adapters": "site", "local_skips": False, "decoder_input_norm": False},
        "training": {
            "batch_size": 16,
            "ae_epochs": 30,
            "umn_rounds": 3,
            "finetune_epochs": 0,
            "finetune_lr": 3e-4,
            "finetune_share": "none",
        },
        "privacy": {"key_scope": "site"},
    },
}


def _with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` laid over its preset's (one level of tables deep)."""
    name = values.get("preset", "blind-split")
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    merged = {k: dict(v) for k, v in PRESETS[name].items()}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def preset_config(preset: str, **top: Any) -> RunConfig:
    """A RunConfig from a named preset, e.g. ``preset_config("paper", out_dir="...")``."""
    return config_from_dict({"preset": preset, **top})


def config_from_dict(values: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Build and validate a RunConfig; relative data paths are resolved against base_dir.
    A data table with a ``path`` and no ``kind`` is "nifti" when its images are volumes, else
    "pairs"."""
    values = _with_preset(values)
    cfg: RunConfig = _build(RunConfig, values, "")
    if cfg.hospitals:  # the profiles say how many sites there are
        cfg.federation.num_sites = sum(max(h.count, 0) for h in cfg.hospitals)
    tables = _data_tables(cfg, values)
    if base_dir is not None:
        for data, _, _ in tables:
            for attr in ("path", "test_path", "spacing_csv"):
                value = getattr(data, attr)
                if value and not Path(value).is_absolute():
                    setattr(data, attr, str((base_dir / value).resolve()))
    for data, raw, _ in tables:
        if "kind" not in raw and data.path:
            data.kind = _guess_kind(Path(data.path) / data.image_dir)
    return cfg.validate()


def _data_tables(cfg: RunConfig, values: dict[str, Any]) -> list[tuple[DatasetConfig, dict, str]]:
    """(section, its TOML table, its name) of ``[data]`` and every ``[sources.<name>]``."""
    sources = values.get("sources") or {}
    return [
        (cfg.data, values.get("data") or {}, "data"),
        *((src, sources.get(k) or {}, f"sources.{k}") for k, src in cfg.sources.items()),
    ]


def _guess_kind(image_dir: Path) -> DataKind:
    volumes = image_dir.is_dir() and any(
        p.name.endswith((".nii", ".nii.gz")) for p in image_dir.iterdir()
    )
    return "nifti" if volumes else "pairs"


def check_paths(cfg: RunConfig) -> RunConfig:
    """Every data folder and file the run reads exists (the error names the field)."""
    used = [(cfg.data, "data")] if cfg.data.kind != "synthetic" else []
    used += [(src, f"sources.{k}") for k, src in cfg.sources.items()]
    for data, where in used:
        for attr, is_there in (
            ("path", Path.is_dir),
            ("test_path", Path.is_dir),
            ("spacing_csv", Path.is_file),
        ):
            value = getattr(data, attr)
            if value and not is_there(Path(value)):
                what = "file" if attr == "spacing_csv" else "folder"
                raise ConfigError(f"{where}.{attr}: {what} not found: {value}")
    return cfg


def read_toml(path: Path, what: str) -> dict:
    """A TOML file's table, or a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def load_config(path: str | Path, check_files: bool = True) -> RunConfig:
    """Load a scenario TOML file (relative paths in it are relative to the file).

    ``check_files``: the data folders must exist here, and ``data.channels = 0`` becomes what
    the images are (1 or 3). A deployed node passes False: it reads its own data-dir instead.
    """
    path = Path(path)
    values = read_toml(path, "config file")
    values.setdefault("name", path.stem)
    cfg = config_from_dict(values, base_dir=path.parent.resolve())
    if check_files:
        from fedseg.data import DataError, image_channels

        check_paths(cfg)
        try:
            cfg.data.channels = image_channels(cfg)
        except DataError as err:
            raise ConfigError(f"data.channels: cannot tell from the images: {err}") from err
    return cfg


def error_text(message: str) -> Any:
    """An error line for a rich console, printed verbatim: ``[training]`` in a message is text,
    not markup that rich would swallow (``console.print(error_text(str(err)))``)."""
    from rich.text import Text

    return Text.assemble(("error: ", "red"), message)


def method_name(cfg: RunConfig) -> str:
    """The method's display name in reports and figures, from what the run does."""
    if cfg.mode == "inr":
        return f"implicit neural obfuscation (rho {cfg.privacy.inr_rho:g})"
    if not cfg.training.finetune_epochs:
        return "PPCMI-SF"  # the paper preset's pipeline
    return {
        "blind": "blind split training",
        "average": "SplitFed",
        "none": "split training (per-site weights)",
    }[cfg.training.finetune_share]


def demo_config(out_dir: str = "results/demo", quick_run: bool = False) -> RunConfig:
    """The embedded default (``fedseg demo`` and ``flwr run .``): 3 synthetic hospitals at
    64 px in the default mode, blind split training, sized to finish in minutes on a 2-core
    laptop (scenario files default to 128 px)."""
    cfg = RunConfig(name="demo-quick" if quick_run else "demo", out_dir=out_dir)
    cfg.model.image_size = 64
    cfg.training.finetune_epochs = DEMO_EPOCHS
    # Its hospitals differ in gain, contrast (the lesion's sign flips), noise and blur: FedBN's
    # case (see TrainingConfig).
    cfg.training.local_batch_norm = True
    # The local UNets would add the federated run's time again; the comparison a new user
    # needs is the centralized UNet's (a scenario with baselines.local_unet = true has them).
    cfg.baselines.local_unet = False
    return quick(cfg) if quick_run else cfg


# 3 synthetic hospitals of 32 images at batch 8, blind split training in process. With shared
# batch norms: 60 epochs 0.738, 80 (lr 3e-3) 0.785, 100 (2.5e-3) 0.798, 120 0.820 (one run
# each); 120 at batch 16 (3e-3) 0.756: the number of optimiser steps is what counts. With
# local batch norms (FedBN): 100 epochs, seeds 0-3, 0.834/0.816/0.815/0.814 (docs/results.md).
DEMO_EPOCHS = 100


def quick(cfg: RunConfig) -> RunConfig:
    """Shrink a run so it finishes in a couple of minutes on 2 cores (``--quick``)."""
    cfg.data.synthetic_train = min(cfg.data.synthetic_train, 24)
    cfg.data.synthetic_test = min(cfg.data.synthetic_test, 8)
    cfg.training.ae_epochs = min(cfg.training.ae_epochs, 30)
    cfg.training.batch_size = max(cfg.training.batch_size, 16)  # fewer, fuller steps: speed
    cfg.training.augment_copies = min(cfg.training.augment_copies, 2)
    cfg.training.umn_rounds = min(cfg.training.umn_rounds, 2)
    cfg.training.umn_epochs_per_round = min(cfg.training.umn_epochs_per_round, 8)
    epochs = cfg.training.finetune_epochs
    cfg.training.finetune_epochs = 15 if epochs < 0 else min(epochs, 15)
    cfg.baselines.epochs = min(cfg.baselines.epochs, 10)
    cfg.model.image_size = min(cfg.model.image_size, 64)
    return cfg


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """A Flower run config (``[tool.flwr.app.config]``, flattened) -> RunConfig.

    ``scenario`` names a TOML file ("" = the embedded synthetic demo), ``quick`` shrinks it, and
    any ``section.field`` key (hyphens or underscores) overrides one value. A SuperLink accepts
    only the keys ``pyproject.toml`` declares (``federation.registry``); the simulation engine
    passes others.
    """
    scenario = str(run_config.get("scenario", ""))
    cfg = load_config(scenario, check_files=False) if scenario else demo_config()
    if run_config.get("quick"):
        cfg = quick(cfg)
    if run_config.get("out-dir"):
        cfg.out_dir = str(run_config["out-dir"])
    if run_config.get("resume"):
        cfg.resume = True
    return apply_overrides(cfg, {k: v for k, v in run_config.items() if "." in k})


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """``{"section.field": value}`` (hyphens or underscores), each checked against its type."""
    for key, value in overrides.items():
        section, _, name = key.replace("-", "_").partition(".")
        target = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(target) or name not in {
            f.name for f in dataclasses.fields(target)
        }:
            raise ConfigError(f"run config key {key!r} names no config field")
        hint = typing.get_type_hints(type(target))[name]
        setattr(target, name, _coerce(value, hint, key))
    return cfg.validate()
