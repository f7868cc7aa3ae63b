"""Pieces shared by the joint-embedding recipes (BYOL, SimSiam, MoCo v3, SimCLR): the
projector / predictor MLP, the two-view options, and the collapse figure and verdict.

Defaults are those tuned for the default data (digits 16x16, see docs/recipes/byol.md and
the others); each paper's own value is in the help texts of the recipes.
"""
from __future__ import annotations

from torch import nn

from sslkern.nn import GlobalBatchNorm1d, MultiCropWrapper
from sslkern.train import views
from sslkern.train.health import embedding_std


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, *, bn: bool = True, last_bn: bool = False,
        act: type[nn.Module] = nn.ReLU, hidden_bias: bool | None = None, last_bias: bool | None = None
        ) -> nn.Sequential:
    """``layers`` linear layers; between them (BatchNorm) + ReLU; optionally a BatchNorm without
    affine on the output (SimSiam / MoCo v3 projector). BatchNorm statistics span all ranks
    (:class:`sslkern.nn.GlobalBatchNorm1d`), so torchrun computes the one-process step.
    ``hidden_bias`` / ``last_bias`` force the linear layers' biases (default: none before a
    BatchNorm, one otherwise)."""
    mods, d = [], in_dim
    for i in range(layers):
        last = i == layers - 1
        o = out_dim if last else hidden_dim
        bias = not ((bn and not last) or (last and last_bn))
        forced = last_bias if last else hidden_bias
        mods.append(nn.Linear(d, o, bias=bias if forced is None else forced))
        if not last:
            mods += [GlobalBatchNorm1d(o)] if bn else []
            mods.append(act())
        elif last_bn:
            mods.append(GlobalBatchNorm1d(o, affine=False))
        d = o
    return nn.Sequential(*mods)


def add_view_arguments(g, *, scale=(0.3, 1.0), degrees=10.0):
    g.add_argument("--pool", choices=("mean", "cls"), default="mean",
                   help="projector input: mean of the patch tokens or CLS (the papers: CLS / pooled CNN features)")
    views.add_crop_arguments(g, scale=scale, degrees=degrees)


def check_view_arguments(a, error):
    views.check_crop_arguments(a, error)


def add_loss_arguments(g, *, rince_q: float, rince_lam: float = 0.01):
    """``--loss infonce|rince`` and RINCE's (q, λ) (Chuang et al. 2022; defaults: chingyaoc/RINCE's
    for the recipe's form)."""
    g.add_argument("--loss", choices=("infonce", "rince"), default="infonce",
                   help="contrastive loss: InfoNCE, or RINCE (robust InfoNCE; the InfoNCE value is logged beside it)")
    g.add_argument("--rince-q", type=float, default=rince_q, help=f"RINCE q (chingyaoc/RINCE README: {rince_q})")
    g.add_argument("--rince-lam", type=float, default=rince_lam, help=f"RINCE λ (chingyaoc/RINCE README: {rince_lam})")


def check_loss_arguments(a, error):
    if not (0 <= a.rince_q < float("inf")):
        error(f"--rince-q expected >= 0, got {a.rince_q}")
    if not (0 < a.rince_lam < float("inf")):
        error(f"--rince-lam expected > 0, got {a.rince_lam}")


def rince_of(a):
    """``rince=`` of ``sslkern.info_nce_loss`` for the options: (q, λ) or None (InfoNCE)."""
    return (a.rince_q, a.rince_lam) if a.loss == "rince" else None


def two_views(a, data) -> list:
    """Two crops at the image size (random resized crop, rotation; for RGB data flips and
    BYOL's asymmetric colour pipeline: blur 1.0 / 0.1, solarize 0 / 0.2)."""
    return views.two_views(a, data)


def positive_int_options(a, error, names):
    for name in names:
        if getattr(a, name) <= 0:
            error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")


def encoder(backbone: nn.Module, projector: nn.Module, pool: str) -> MultiCropWrapper:
    """backbone → pooled tokens → projector, over a list of views (view-major rows)."""
    return MultiCropWrapper(backbone, projector, pool)


def joint_health(z, prefix: str = "") -> dict:
    """``embedding_std`` of the projector outputs of this step (√D·mean per-dimension std of
    the L2-normalised rows: ≈ 1 well spread, → 0 on collapse)."""
    return {f"{prefix}embedding_std": embedding_std(z)}


def joint_verdict(health: dict, *, threshold: float = 0.1) -> tuple[bool, str]:
    """Collapsed when the final ``embedding_std`` is below ``threshold`` (every view mapped
    near one direction; 0.1 ≈ the spread of embeddings confined to 1 % of the dimensions)."""
    s = health.get("embedding_std")
    if s is None:
        return False, "no health figures logged"
    if s < threshold:
        return True, f"collapsed (embedding std {s:.3f} < {threshold})"
    return False, f"not collapsed (embedding std {s:.3f} ≥ {threshold})"


def redundancy_verdict(health: dict, *, threshold: float = 0.1) -> tuple[bool, str]:
    """Barlow Twins / VICReg: collapsed when the final ``embedding_std`` is below ``threshold``
    (the verdict of the other joint-embedding recipes); the redundancy figures logged with it
    (correlation / covariance against the rank floor, per-dimension stds) are quoted."""
    collapsed, line = joint_verdict(health, threshold=threshold)
    parts = []
    for key, fmt in (("mean_diag", "mean diagonal correlation {:.3f}"),
                     ("off_diag_ratio", "off-diagonal sum {:.2f}x its rank floor"),
                     ("mean_std", "mean std {:.3f}"), ("low_std_frac", "{:.0%} of dims with std < 1"),
                     ("cov_ratio", "covariance {:.2f}x its rank floor")):
        if key in health:
            parts.append(fmt.format(health[key]))
    return collapsed, line + (f"; {', '.join(parts)}" if parts else "")
