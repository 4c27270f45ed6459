"""The attack suite on the inr mode (``mode = "inr"``): the attacker is the server.

It holds what the hospitals released, their training images re-rendered from mixed codes with
the masks unchanged (``checkpoints/inr_shared.npz``), and the network it trained on them
(``checkpoints/inr_unet.pt``). No latents, keys or autoencoders exist in this mode, so the
key-recovery, cross-decoder, surrogate and server-side inversion attacks do not apply. What
does:

- **inversion**: the released image is the attacker's reconstruction; SSIM/PSNR of every
  site's released images against their originals (``shared image``), beside the floor of
  knowing the modality (the mean of the other sites' originals, ``mean image``).
- **membership inference** on the server's network: per-image Dice + CE loss on a candidate
  real image and mask (lower = member); members are every site's training images, non-members
  its test images (never released, never trained on). AUC with a bootstrap over patients.
- **re-identification** (volume data sets: the slices of one volume are one patient): the
  contrastive attacker of ``reid.py`` on the released images against the same records raw.
  Only training images are released, so both use each site's training split; patients are
  split in half per site as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from torch.nn import functional as F

from fedseg.attacks import reid
from fedseg.attacks.context import RunFolderError, load_run_config
from fedseg.attacks.figures import roc
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import auc_with_ci, image_quality
from fedseg.config import AttackConfig, RunConfig
from fedseg.data import SiteSplit, load_federation
from fedseg.models.baselines import make_unet
from fedseg.obfuscation import INR_NET_NAME, INR_SHARED_NAME

ATTACKS = ("inversion", "membership", "reid")  # the suite's attacks that apply to this mode
MODE = "inr"  # the key of this mode's results inside each attack's entry


@dataclass
class InrView:
    """The server's view of an inr run, and the sites' data to score it against."""

    run: Path
    cfg: RunConfig
    sites: list[SiteSplit]
    shared: dict[str, np.ndarray]  # images, masks, site, index

    @classmethod
    def load(cls, run: str | Path) -> InrView:
        run = Path(run)
        cfg = load_run_config(run)
        path = run / "checkpoints" / INR_SHARED_NAME
        if not path.is_file():
            raise RunFolderError(f"{path} not found: not a finished inr run")
        with np.load(path) as f:
            shared = {k: f[k] for k in f.files}
        return cls(run, cfg, load_federation(cfg), shared)

    def released(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        """(originals, released) of ``site``'s released training images, in the same order."""
        sel = self.shared["site"] == site
        split = next(s for s in self.sites if s.name == site)
        originals = split.train.images[self.shared["index"][sel]]
        return originals, self.shared["images"][sel].astype(np.float32)

    def network(self) -> torch.nn.Module:
        path = self.run / "checkpoints" / INR_NET_NAME
        if not path.is_file():
            raise RunFolderError(f"{path} not found: membership inference needs the network")
        state = torch.load(path, weights_only=False, map_location="cpu")
        train = self.sites[0].train
        net = make_unet(train.num_classes, self.cfg.baselines.unet_channels, train.channels)
        net.load_state_dict(state["state"])
        return net.eval()


def inversion(view: InrView) -> tuple[dict, str]:
    rows: list[list] = []
    per_site: dict[str, dict] = {}
    for i, split in enumerate(view.sites):
        originals, released = view.released(split.name)
        if not len(released):
            continue
        others = np.concatenate([s.train.images for j, s in enumerate(view.sites) if j != i])
        mean = np.broadcast_to(others.mean(0, keepdims=True), originals.shape)
        truth = torch.from_numpy(originals)
        q = image_quality(torch.from_numpy(released), truth)
        floor = image_quality(torch.from_numpy(np.ascontiguousarray(mean)), truth)
        per_site[split.name] = {"shared image": q, "mean image": floor, "n": len(released)}
        rows.append([split.name, len(released), q["ssim"], q["psnr"], floor["ssim"]])
    victim = view.sites[view.cfg.attack.victim % len(view.sites)].name
    result = {MODE: {**per_site[victim], "per_site": per_site}, "victim": victim}
    md = (
        "## Inversion (inr: the released images themselves)\n\n"
        f"rho {view.cfg.privacy.inr_rho:g}. The server holds each released image: SSIM/PSNR "
        "against its original; floor: the mean image of the other sites' training images.\n\n"
        + table(["site", "images", "SSIM", "PSNR (dB)", "mean-image SSIM"], rows)
    )
    return result, md


@torch.no_grad()
def image_losses(net: torch.nn.Module, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The network's Dice + CE loss on each image (its own training loss, per image)."""
    dice = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")  # DiceCELoss: no "none"
    out = []
    for i in range(0, len(images), 32):
        x = torch.from_numpy(images[i : i + 32])
        y = torch.from_numpy(masks[i : i + 32])
        logits = net(x)
        per = dice(logits, y[:, None]).reshape(len(x), -1).mean(1)
        per = per + F.cross_entropy(logits, y, reduction="none").mean((1, 2))
        out.append(per.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def membership(view: InrView) -> tuple[dict, str]:
    net = view.network()
    scores, labels, groups = [], [], []
    for split in view.sites:
        for data, label in ((split.train, 1), (split.test, 0)):
            scores.append(-image_losses(net, data.images, data.masks))
            labels.append(np.full(len(data), label))
            groups.append(np.array([f"{split.name}/{g}" for g in data.groups]))
    s, y, g = np.concatenate(scores), np.concatenate(labels), np.concatenate(groups)
    a = view.cfg.attack
    threshold = auc_with_ci(s, y, a.bootstrap, a.seed, groups=g)
    fig = roc(
        figure_dir(view.run) / "membership_roc.png",
        {"loss threshold": (s, y)},
        f"membership inference on the server's network (inr, rho {view.cfg.privacy.inr_rho:g})",
    )
    result = {"mode": MODE, "loss_threshold": threshold}
    md = (
        "## Membership inference on the server's network (inr)\n\n"
        "Members: every site's training images (released re-rendered, trained on); "
        "non-members: every site's test images. Score: minus the network's Dice + CE loss on "
        f"the real image and mask. 95% bootstrap interval over patients ({a.bootstrap} "
        "resamples).\n\n"
        + table(
            ["attack", "AUC", "95% CI", "members", "non-members"],
            [
                [
                    "loss threshold",
                    threshold["auc"],
                    f"[{threshold['ci_low']:.3f}, {threshold['ci_high']:.3f}]",
                    threshold["n_pos"],
                    threshold["n_neg"],
                ]
            ],
        )
        + f"\n\n![membership ROC]({fig.relative_to(view.run)})\n"
    )
    return result, md


def reid_records(
    sites: list[SiteSplit], index: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw images, patients, slices, site ids) of the records ``index`` names per site (the
    released training images), in the order the released arrays are."""
    raw, patients, slices, site_ids = [], [], [], []
    for i, split in enumerate(sites):
        idx = index.get(split.name, np.zeros(0, int))
        train = split.train
        raw.append(train.images[idx])
        patients += [f"{split.name}/{train.groups[j]}" for j in idx]
        slices += [reid._slice_index(train.names[j]) for j in idx]
        site_ids += [i] * len(idx)
    return np.concatenate(raw), np.array(patients), np.array(slices), np.array(site_ids)


def reid_compare(
    records: dict[str, np.ndarray],
    patients: np.ndarray,
    slices: np.ndarray,
    sites: np.ndarray,
    attack: AttackConfig,
) -> dict[str, dict]:
    """The contrastive re-identification attacker on each set of records (``raw`` and the
    released ones, all in one order), ``attack.reid_repeats`` patient splits each: mean
    verification AUC (and its spread), top-1 and top-5."""
    _, per_patient = np.unique(patients, return_counts=True)
    if len(per_patient) < 8 or np.median(per_patient) < 3:
        raise ValueError(
            f"re-identification needs patients with several records each: {len(per_patient)} "
            f"patients, median {np.median(per_patient):.0f} record(s) (use a volume data set)"
        )
    runs: dict[str, list[dict]] = {name: [] for name in records}
    for r in range(max(1, attack.reid_repeats)):
        attacker = reid._split(patients, sites, attack.seed + r)
        for name, array in records.items():
            x = torch.as_tensor(array, dtype=torch.float32)
            net = reid.train_embedder(
                x[attacker], patients[attacker], True, attack.reid_epochs, attack.seed + r
            )
            with torch.no_grad():
                emb = net(x[~attacker]).numpy()
            one = reid.score(emb, patients[~attacker], slices[~attacker], sites[~attacker])
            one.pop("_curve")
            runs[name].append(one)
    out: dict[str, dict] = {}
    for name, ones in runs.items():
        out[name] = {k: float(np.mean([o[k] for o in ones])) for k in ("auc", "top1", "top5")}
        out[name]["auc_std"] = float(np.std([o["auc"] for o in ones]))
        out[name]["auc_per_repeat"] = [o["auc"] for o in ones]
    raw = out.get("raw")
    for name, entry in out.items():
        if raw and name != "raw" and raw["auc"] > 0.5:
            entry["reduction_vs_raw"] = 1 - (entry["auc"] - 0.5) / (raw["auc"] - 0.5)
    return out


def reid_table(result: dict[str, dict]) -> str:
    rows = [
        [
            name,
            f"{r['auc']:.3f} ± {r['auc_std']:.3f}",
            r["top1"],
            r["top5"],
            f"{100 * r['reduction_vs_raw']:.0f}%" if "reduction_vs_raw" in r else "-",
        ]
        for name, r in result.items()
    ]
    return table(["shared", "verification AUC", "top-1", "top-5", "AUC above chance removed"], rows)


def reid_attack(view: InrView) -> tuple[dict, str]:
    index = {s.name: view.shared["index"][view.shared["site"] == s.name] for s in view.sites}
    raw, patients, slices, sites = reid_records(view.sites, index)
    released = np.concatenate([view.released(s.name)[1] for s in view.sites])
    result = reid_compare({"raw": raw, MODE: released}, patients, slices, sites, view.cfg.attack)
    a = view.cfg.attack
    md = (
        "## Patient re-identification (inr)\n\n"
        f"rho {view.cfg.privacy.inr_rho:g}. reid.py's contrastive attacker ({a.reid_epochs} "
        f"epochs, {a.reid_repeats} patient splits) on the released training images against the "
        "same records raw; scored within sites on unseen patients.\n\n" + reid_table(result)
    )
    return result, md


def run(view: InrView, name: str) -> tuple[dict, str]:
    if name not in ATTACKS:
        raise ValueError(
            f"{name} does not apply to the inr mode (no latents, keys or autoencoders); "
            f"these do: {', '.join(ATTACKS)}"
        )
    return {"inversion": inversion, "membership": membership, "reid": reid_attack}[name](view)
