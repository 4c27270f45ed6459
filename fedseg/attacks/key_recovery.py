"""Known-plaintext key recovery: from m (plain, shared) latent pairs of one site, recover its key.

Attacker: holds m of the victim's images' plain latents (e.g. a leaked encoder and m known
images) and the matching shared latents (fp16, keyed). Kerckhoffs: it knows the transform's
form, not the key. Each image gives one C-vector pair per latent pixel at each scale.

- KLT: ordinary least squares ``y = W x + b`` per scale (needs C + 1 independent vectors at the
  coarsest scale).
- KNT: gradient fit of the exact KNT form (mixings, biases, slopes, amplitudes, shifts) with
  Adam; and, for reference, the same least squares as for KLT (its best affine approximation).

Success is measured where it matters: un-keying the victim's *held-out* test latents with the
recovered key. ``exact`` means the error is within EXACT times the floor set by fp16 rounding on the
wire (what the true key itself achieves from fp16).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fedseg.attacks.context import RunContext
from fedseg.attacks.figures import curves
from fedseg.attacks.report import figure_dir, table
from fedseg.privacy.knt import GAIN, LAYERS

EXACT = 5  # "exact": un-keying error within this factor of the fp16 floor (least squares on
# fp16-rounded pairs adds noise of the same order as the rounding itself)

Vectors = torch.Tensor  # (N, C): one row per latent pixel


def _rows(z: torch.Tensor) -> Vectors:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()


def _rel(estimate: Vectors, truth: Vectors) -> float:
    """Error relative to the latents' spread (not their mean, which is easy to get right)."""
    return float((estimate - truth).norm() / (truth - truth.mean(0)).norm())


def fit_affine(x: Vectors, y: Vectors) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y = x W^T + b; returns (W, b)."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(design, y, driver="gelsd").solution
    return sol[:-1].T, sol[-1]


def unkey_affine(w: torch.Tensor, b: torch.Tensor, y: Vectors) -> Vectors:
    return torch.linalg.lstsq(w, (y - b).T, driver="gelsd").solution.T


class KntModel(torch.nn.Module):
    """The KNT form with free parameters (the attacker's hypothesis class)."""

    def __init__(self, channels: int, layers: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mixing = torch.nn.ParameterList(
            torch.nn.Parameter(
                torch.linalg.qr(torch.randn(channels, channels, generator=g))[0].double()
            )
            for _ in range(layers + 1)
        )
        self.bias = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(channels, dtype=torch.float64))
            for _ in range(layers + 1)
        )
        self.raw_slope = torch.nn.Parameter(torch.zeros(layers, channels, dtype=torch.float64))
        self.raw_gain = torch.nn.Parameter(torch.zeros(layers, channels, dtype=torch.float64))
        self.shift = torch.nn.Parameter(torch.zeros(layers, channels, dtype=torch.float64))
        self.layers = layers

    def params(self, i: int):
        """Amplitude a, slope s, shift c and gain g = a s / 4 (in (0, GAIN[1]]) of block i."""
        s = F.softplus(self.raw_slope[i]) + 1e-3
        gain = GAIN[1] * torch.sigmoid(self.raw_gain[i])
        return 4 * gain / s, s, self.shift[i], gain

    def forward(self, x: Vectors) -> Vectors:
        for i in range(self.layers):
            u = x @ self.mixing[i].T + self.bias[i]
            a, s, c, _ = self.params(i)
            x = u + a * torch.sigmoid(s * u + c)
        return x @ self.mixing[self.layers].T + self.bias[self.layers]

    @torch.no_grad()
    def inverse(self, y: Vectors) -> Vectors:
        x = torch.linalg.solve(self.mixing[self.layers], (y - self.bias[self.layers]).T).T
        for i in reversed(range(self.layers)):
            a, s, c, gain = self.params(i)
            u = x - a * torch.sigmoid((s * x + c - s * a / 2) / (1 + gain))
            for _ in range(20):  # many steps: the fitted parameters may leave KNT's own range
                t = torch.sigmoid(s * u + c)
                u = u - (u + a * t - x) / (1 + a * s * t * (1 - t))
            x = torch.linalg.solve(self.mixing[i], (u - self.bias[i]).T).T
        return x


def fit_knt(x: Vectors, y: Vectors, steps: int, seed: int) -> KntModel:
    """Start from the least-squares affine fit (nonlinearities nearly off), so the fit can only
    improve on the affine attack; Adam on the forward error from there."""
    model = KntModel(x.shape[1], LAYERS, seed)
    w, b = fit_affine(x, y)
    with torch.no_grad():
        for i, m in enumerate(model.mixing):
            m.copy_(w if i == 0 else torch.eye(len(w), dtype=w.dtype))
        model.bias[0].copy_(b)
        model.raw_gain.fill_(-4.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scale = y.var(0).sum()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = ((model(x) - y) ** 2).sum(1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run(ctx: RunContext, modes: tuple[str, ...] = ("klt", "knt")) -> tuple[dict, str]:
    a = ctx.cfg.attack
    victim_index = a.victim % len(ctx.sites)
    victim = ctx.names[victim_index]
    train = torch.from_numpy(ctx.sites[victim_index].train.images)
    test = torch.from_numpy(ctx.sites[victim_index].test.images)
    known_plain = ctx.plain(victim, train[: max(a.key_recovery_pairs)])
    test_plain = ctx.plain(victim, test)
    counts = [m for m in a.key_recovery_pairs if m <= len(train)]
    result: dict = {"victim": victim, "pairs": counts}
    rows = []
    for mode in modes:
        known_shared = ctx.shared(victim, known_plain, mode)
        test_shared = ctx.shared(victim, test_plain, mode)
        with torch.no_grad():
            floor_latents = ctx.transform(victim, mode).inverse(test_shared, "image")
        floor = max(
            _rel(_rows(f), _rows(t)) for f, t in zip(floor_latents, test_plain, strict=True)
        )
        per_m = {}
        for m in counts:
            errors: dict[str, list[float]] = {"least squares": [], "KNT-form fit": []}
            for s in range(3):
                x, y = _rows(known_plain[s][:m]), _rows(known_shared[s][:m])
                xt, yt = _rows(test_plain[s]), _rows(test_shared[s])
                w, b = fit_affine(x, y)
                errors["least squares"].append(_rel(unkey_affine(w, b, yt), xt))
                if mode == "knt":
                    model = fit_knt(x, y, a.knt_fit_steps, a.seed)
                    errors["KNT-form fit"].append(_rel(model.inverse(yt), xt))
            per_m[m] = {k: max(v) for k, v in errors.items() if v}
            per_m[m]["exact"] = min(per_m[m].values()) <= EXACT * floor
            per_m[m]["pixels_coarsest"] = int(m * known_plain[2][0, 0].numel())
        exact = [m for m in counts if per_m[m]["exact"]]
        result[mode] = {
            "floor": floor,
            "by_pairs": per_m,
            "min_pairs_exact": exact[0] if exact else None,
        }
        for m in counts:
            e = per_m[m]
            rows.append(
                [
                    mode,
                    m,
                    e["pixels_coarsest"],
                    e["least squares"],
                    e.get("KNT-form fit", "-"),
                    "yes" if e["exact"] else "no",
                ]
            )
    series = {}
    for mode in modes:
        for method in ("least squares", "KNT-form fit"):
            ys = [result[mode]["by_pairs"][m].get(method) for m in counts]
            if all(v is not None for v in ys):
                series[f"{mode}: {method}"] = ys
    fig = curves(
        figure_dir(ctx.run) / "key_recovery.png",
        counts,
        series,
        "known pairs (images)",
        "held-out un-keying error (relative, worst scale)",
        f"known-plaintext key recovery ({victim})",
        logy=True,
    )
    floors = ", ".join(f"{m} {result[m]['floor']:.1e}" for m in modes)
    md = (
        "## Known-plaintext key recovery\n\n"
        f"Victim {victim}. From m known images' (plain, shared) latents the attacker fits the key, "
        "then un-keys the victim's held-out test latents; error = L2 error of the un-keyed "
        "latents relative to their spread about the mean, worst of the three scales. "
        f"fp16 floor (true key): {floors}. "
        f"*exact* = within {EXACT}x that floor. The coarsest scale gives "
        f"{known_plain[2][0, 0].numel()} vectors of {known_plain[2].shape[1]} channels "
        "per image.\n\n"
        + table(
            ["mode", "pairs m", "vectors (coarsest)", "least squares", "KNT-form fit", "exact"],
            rows,
        )
        + f"\n\n![key recovery]({fig.relative_to(ctx.run)})\n"
    )
    return result, md
