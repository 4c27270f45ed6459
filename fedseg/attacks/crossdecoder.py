"""Cross-decoder reconstruction (the reference paper's test): site A's shared image latents fed
to site B's image decoder.

Attacker: another hospital B (or anyone holding B's decoder) who sees A's latents. It needs no
training. Reference row: A's own decoder on A's plain latents (what the owner recovers).
"""

from __future__ import annotations

import torch

from fedseg.attacks.context import MODES, RunContext
from fedseg.attacks.figures import reconstruction_grid
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import image_quality


@torch.no_grad()
def _decode(ctx: RunContext, site: str, latents) -> torch.Tensor:
    dec = ctx.models[site].image_ae.decoder.eval()
    return torch.cat([dec([z[i : i + 32] for z in latents]) for i in range(0, len(latents[0]), 32)])


def run(ctx: RunContext, modes: tuple[str, ...] = MODES) -> tuple[dict, str]:
    names = ctx.names
    rows, examples = [], {}
    result: dict[str, dict] = {}  # per mode: pair -> scores; "<mode>_mean": mean scores
    for a_index, a in enumerate(names):
        test = torch.from_numpy(ctx.sites[a_index].test.images)
        if len(test) == 0:
            continue
        plain = ctx.plain(a, test)
        own = image_quality(_decode(ctx, a, plain), test)
        result.setdefault("own_decoder", {})[a] = own
        for mode in modes:
            shared = ctx.shared(a, plain, mode)
            for b in names:
                if b == a:
                    continue
                recon = _decode(ctx, b, shared)
                q = image_quality(recon, test)
                result.setdefault(mode, {})[f"{a}->{b}"] = q
                if a_index == 0 and b == names[1 % len(names)]:
                    examples[f"{mode}: {a} by {b}'s decoder"] = recon[:6]
        if a_index == 0:
            examples = {"own decoder, plain": _decode(ctx, a, plain)[:6], **examples}
            truth = test[:6]
    for mode in modes:
        pairs = result.get(mode, {})
        if pairs:
            ssim = sum(q["ssim"] for q in pairs.values()) / len(pairs)
            psnr = sum(q["psnr"] for q in pairs.values()) / len(pairs)
            result[mode + "_mean"] = {"ssim": ssim, "psnr": psnr}
            rows.append([mode, ssim, psnr, len(pairs)])
    own_ssim = sum(q["ssim"] for q in result["own_decoder"].values()) / len(names)
    own_psnr = sum(q["psnr"] for q in result["own_decoder"].values()) / len(names)
    rows.append(["(owner: own decoder, plain)", own_ssim, own_psnr, len(names)])
    fig = reconstruction_grid(
        figure_dir(ctx.run) / "cross_decoder.png", truth, examples, "cross-decoder reconstruction"
    )
    md = (
        "## Cross-decoder reconstruction\n\n"
        "Site A's shared test-image latents (fp16, keyed under each mode with A's key) decoded by "
        "another site B's image decoder; SSIM/PSNR against A's images (scaled to [0, 1] per "
        "image), mean over ordered site pairs.\n\n"
        + table(["mode", "SSIM", "PSNR (dB)", "pairs"], rows)
        + f"\n\n![cross-decoder]({fig.relative_to(ctx.run)})\n"
    )
    return result, md
