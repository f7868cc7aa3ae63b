"""Bytes-and-flops model of every sslkern op: what the fused kernel must move vs the eager code.

A MODEL, not a measurement. For each op and benchmark size it counts

* the fewest bytes a fused kernel must move: every input read once, every output written
  once (forward and backward where the op is differentiable), and
* the bytes the eager reference moves, from its op sequence (the public code named in
  shared/SPEC.md), counting for each eager kernel one read of each input and one write of
  its output; views are free; reads of broadcast operands (stride 0) and tensors of size
  O(K) or O(B) are left out. Real softmax / norm kernels on long rows often read their
  input twice, so the eager counts are lower bounds.

The expected time on a GPU is modelled as
``max(bytes / HBM bandwidth, flops / peak) + kernels * LAUNCH_S``, and the expected speed-up
as the ratio of eager to fused time. Until a GPU measures these ops, the speed-up column is
this model and nothing more. ``python -m sslkern.gpu_model`` prints the markdown.
"""
from __future__ import annotations

import dataclasses
import math

LAUNCH_S = 2e-6  # cost per kernel boundary (launch + tail), back-to-back kernels on one stream


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s, HBM peak
    fp32: float       # flop/s, CUDA cores
    tensor: float     # flop/s, dense bf16/fp16 tensor cores


GPUS = [
    Gpu("A100 SXM 80GB", 2.039e12, 19.5e12, 312e12),
    Gpu("H100 SXM", 3.35e12, 67e12, 989e12),
]


@dataclasses.dataclass
class Step:
    what: str
    formula: str
    nbytes: float
    kernels: int = 1


@dataclasses.dataclass
class Account:
    op: str
    case: str
    fused: list[Step]
    eager: list[Step]
    eager_source: str
    flops_fused: float
    flops_eager: float
    tensor_cores: bool = False  # matmul flops run on tensor cores
    notes: str = ""

    @property
    def fused_bytes(self) -> float:
        return sum(s.nbytes for s in self.fused)

    @property
    def eager_bytes(self) -> float:
        return sum(s.nbytes for s in self.eager)

    @property
    def fused_kernels(self) -> int:
        return sum(s.kernels for s in self.fused)

    @property
    def eager_kernels(self) -> int:
        return sum(s.kernels for s in self.eager)

    def time(self, gpu: Gpu, fused: bool) -> float:
        nbytes, flops, kernels = ((self.fused_bytes, self.flops_fused, self.fused_kernels) if fused
                                  else (self.eager_bytes, self.flops_eager, self.eager_kernels))
        peak = gpu.tensor if self.tensor_cores else gpu.fp32
        return max(nbytes / gpu.bandwidth, flops / peak) + kernels * LAUNCH_S


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------
def ema_accounts() -> list[Account]:
    # timm vit_base_patch16_224: 86,567,656 parameters in 152 tensors.
    N, P = 86_567_656, 152
    out = []
    for case, es, mixed, note in [
            ("ViT-B/16 teacher fp32, student fp32", 4, False, "Bytes are equal: the gain is P launches → 1."),
            ("ViT-B/16 teacher fp32, student bf16 (data2vec 2.0)", 2, True,
             "The eager code materializes an fp32 copy of each student tensor before lerp_.")]:
        fused = [Step("read teacher", "N·4", 4 * N, 1), Step("read student", f"N·{es}", es * N, 0),
                 Step("write teacher", "N·4", 4 * N, 0)]
        eager = []
        if mixed:
            eager.append(Step("s.to(fp32) per tensor", f"N·({es}+4)", (es + 4) * N, P))
        eager.append(Step("t.lerp_(s, 1−m) per tensor", "N·(4+4+4)", 12 * N, P))
        out.append(Account("ema_update_", f"{case}; N = 86.6M, P = 152 tensors", fused, eager,
                           "sslkern.reference.ema_update_ (timm ModelEmaV3: lerp_ per tensor)", 3 * N, 3 * N,
                           notes=note))
    return out


def dino_account() -> Account:
    B, K, V, T, e = 32, 65536, 8, 2, 4
    R = B * K               # elements of one view's logits
    P = T * V - T           # (teacher, student) pairs, same view skipped
    fused = [
        Step("read student logits s", "V·B·K·4", V * R * e, 1),
        Step("read teacher logits t (+ center)", "T·B·K·4", T * R * e, 0),
        Step("write grad_s (in the forward, Liger style)", "V·B·K·4", V * R * e, 0),
        Step("center update: read c, write c (batch sum of t fused in the pass)", "K·4 + K·4", 2 * K * e, 1),
    ]
    eager = [
        Step("s / τs", "2·V·R·4", 2 * V * R * e, 1),
        Step("(t − c) / τt, softmax (3 kernels)", "3 · 2·T·R·4", 6 * T * R * e, 3),
        Step("per pair: log_softmax, −q, mul, sum(−1)", "P · (2+2+3+1)·R·4", P * 8 * R * e, P * 6),
        Step("center: t.sum(0) (+ 4 tiny ops)", "T·R·4", T * R * e, 5),
        Step("bwd per pair: mul bwd, log_softmax bwd", "P · (2+3)·R·4", P * 5 * R * e, P * 3),
        Step("bwd: accumulate grads of local views", "(V−T)(T−1) · 3·R·4", (V - T) * (T - 1) * 3 * R * e, (V - T) * (T - 1)),
        Step("bwd: chunk → cat, div bwd", "2 · 2·V·R·4", 4 * V * R * e, 2),
    ]
    flops = 10 * V * R + 6 * T * R
    return Account("dino_loss", f"B={B}, K={K}, {T}+{V - T} crops (P={P} pairs), fp32, fwd+bwd; R = B·K", fused,
                   eager, "dino main_dino.py DINOLoss + autograd (lightly DINOLoss: same sequence)",
                   flops, flops,
                   notes=f"A two-pass kernel (backward re-reads s and t) moves {(V + T) * R * e / 1e6:.0f} MB more. "
                         "log_softmax of each student view is recomputed for every teacher view in the eager code.")


def ibot_account() -> Account:
    N, K, e = 64 * 196, 8192, 4
    NK = N * K
    fused = [
        Step("read student patch logits", "N·K·4", NK * e, 1),
        Step("read teacher patch logits (+ center, weights)", "N·K·4", NK * e, 0),
        Step("write grad_s", "N·K·4", NK * e, 0),
        Step("center update", "K·4·2", 2 * K * e, 1),
    ]
    eager = [
        Step("teacher: (t − c) / τt, softmax", "3 · 2·N·K·4", 6 * NK * e, 3),
        Step("student: s / τs, log_softmax", "2 · 2·N·K·4", 4 * NK * e, 2),
        Step("p · log q, sum(−1) (+ weights, mean: tiny)", "(3+1)·N·K·4", 4 * NK * e, 6),
        Step("center: sum over rows (+ tiny ops)", "N·K·4", NK * e, 4),
        Step("bwd: mul bwd, log_softmax bwd, div bwd", "(2+3+2)·N·K·4", 7 * NK * e, 4),
    ]
    flops = 16 * NK
    return Account("ibot_patch_loss", f"N = 64·196 = {N} patch rows, K={K}, fp32, fwd+bwd", fused, eager,
                   "dinov2 ibot_patch_loss.py (softmax_center_teacher, forward_masked, update_center)",
                   flops, flops,
                   notes="Rows are the masked patch tokens the loss sees (the gathered `forward_masked` form).")


def gather_accounts() -> list[Account]:
    e, i64 = 4, 8
    out = []
    # MAE encoder: x (B, L, D) patch tokens (+pos) -> x_vis (B, 1+Lk, D) with CLS first.
    B, L, D, r = 64, 196, 768, 0.75
    Lk = int(L * (1 - r))
    BLD, BKD = B * L * D, B * Lk * D
    fused = [
        Step("fwd: read kept rows of x and pos, ids", "B·Lk·D·4 + L·D·4 + B·Lk·8", BKD * e + L * D * e + B * Lk * i64, 1),
        Step("fwd: write x_vis (CLS + kept)", "B·(Lk+1)·D·4", B * (Lk + 1) * D * e, 0),
        Step("bwd: read grad x_vis", "B·(Lk+1)·D·4", B * (Lk + 1) * D * e, 1),
        Step("bwd: write grad_x (zeros at masked rows), grad_pos", "B·L·D·4 + L·D·4", BLD * e + L * D * e, 0),
    ]
    eager = [
        Step("x + pos_embed", "2·B·L·D·4", 2 * BLD * e, 1),
        Step("ids_keep.unsqueeze(−1).repeat(1, 1, D)", "B·Lk·D·8", BKD * i64, 1),
        Step("torch.gather", "B·Lk·D·(8+4+4)", BKD * (i64 + 2 * e), 1),
        Step("cat(cls, x_vis)", "B·Lk·D·4 + B·(Lk+1)·D·4", BKD * e + B * (Lk + 1) * D * e, 2),
        Step("bwd: zeros + scatter_add (gather bwd)", "B·L·D·4 + B·Lk·D·(4+8+4)", BLD * e + BKD * (2 * e + i64), 2),
        Step("bwd: grad_pos = sum over B", "B·L·D·4", BLD * e, 1),
    ]
    out.append(Account("gather_tokens", f"MAE encoder B={B}, L={L}+CLS, D={D}, mask {r} (Lk={Lk}), fp32, fwd+bwd",
                       fused, eager, "mae models_mae.py forward_encoder (random_masking + cat CLS)", 0, 0))
    # MAE decoder: x (B, 1+Lk, Dd) -> (B, 1+L, Dd) with mask tokens, + decoder pos.
    Dd = 512
    BLd, BKd, BMd = B * L * Dd, B * Lk * Dd, B * (L - Lk) * Dd
    B1d, Bk1d = B * (L + 1) * Dd, B * (Lk + 1) * Dd
    fused = [
        Step("fwd: read x_vis, ids_restore, mask token, pos", "B·(Lk+1)·Dd·4 + B·L·8 + (L+1)·Dd·4",
             Bk1d * e + B * L * i64 + (L + 1) * Dd * e, 1),
        Step("fwd: write y", "B·(L+1)·Dd·4", B1d * e, 0),
        Step("bwd: read grad y", "B·(L+1)·Dd·4", B1d * e, 1),
        Step("bwd: write grad x_vis, grad mask token, grad pos", "B·(Lk+1)·Dd·4 + (L+1)·Dd·4",
             Bk1d * e + (L + 1) * Dd * e, 0),
    ]
    eager = [
        Step("mask_token.repeat", "B·(L−Lk)·Dd·4", BMd * e, 1),
        Step("cat(x[:, 1:], mask_tokens)", "2·B·L·Dd·4", 2 * BLd * e, 1),
        Step("ids_restore.unsqueeze(−1).repeat(1, 1, Dd)", "B·L·Dd·8", BLd * i64, 1),
        Step("torch.gather", "B·L·Dd·(8+4+4)", BLd * (i64 + 2 * e), 1),
        Step("cat(x[:, :1], x_)", "B·L·Dd·4 + B·(L+1)·Dd·4", BLd * e + B1d * e, 1),
        Step("+ decoder_pos_embed", "2·B·(L+1)·Dd·4", 2 * B1d * e, 1),
        Step("bwd: grad pos = sum over B", "B·(L+1)·Dd·4", B1d * e, 1),
        Step("bwd: zeros + scatter_add (gather bwd)", "B·L·Dd·4 + B·L·Dd·(4+8+4)", BLd * e + BLd * (2 * e + i64), 2),
        Step("bwd: slice bwd ×2 (zeros + copy) + add", "(2·1 + 2·2 + 3)·B·(Lk+1)·Dd·4", 9 * Bk1d * e, 5),
        Step("bwd: grad mask token = sum", "B·(L−Lk)·Dd·4", BMd * e, 1),
    ]
    out.append(Account("restore_tokens", f"MAE decoder B={B}, L={L}+CLS, Dd={Dd}, mask {r}, fp32, fwd+bwd",
                       fused, eager, "mae models_mae.py forward_decoder (mask tokens, unshuffle, + pos)", 0, 0))
    # Clone batch: (B, L, D) -> (B·M, Lk, D), M masks per image, no repeat materialized.
    B, M = 32, 8
    BLD, MBKD = B * L * D, M * B * Lk * D
    fused = [
        Step("fwd: read rows of x used by any clone, ids", "B·L·D·(1−r^M)·4 + M·B·Lk·8",
             BLD * (1 - r ** M) * e + M * B * Lk * i64, 1),
        Step("fwd: write (B·M, Lk, D)", "M·B·Lk·D·4", MBKD * e, 0),
        Step("bwd: read grad, write grad_x (clones summed)", "M·B·Lk·D·4 + B·L·D·4", MBKD * e + BLD * e, 1),
    ]
    eager = [
        Step("x.repeat_interleave(M, 0)", "B·L·D·4 + M·B·L·D·4", (1 + M) * BLD * e, 1),
        Step("index repeat to (B·M, Lk, D) int64", "M·B·Lk·D·8", MBKD * i64, 1),
        Step("torch.gather", "M·B·Lk·D·(8+4+4)", MBKD * (i64 + 2 * e), 1),
        Step("bwd: zeros + scatter_add", "M·B·L·D·4 + M·B·Lk·D·(4+8+4)", M * BLD * e + MBKD * (2 * e + i64), 2),
        Step("bwd: repeat_interleave bwd (sum over M)", "M·B·L·D·4 + B·L·D·4", (M + 1) * BLD * e, 1),
    ]
    out.append(Account("gather_tokens (clone batch)", f"M={M} masks from B={B}, L={L}, D={D}, mask {r}, fp32, fwd+bwd",
                       fused, eager, "data2vec 2.0 (repeat_interleave + gather) / I-JEPA apply_masks", 0, 0,
                       notes="Fused read assumes the M clones' kept rows of one image are read once (L2 reuse)."))
    return out


def attention_accounts() -> list[Account]:
    e = 2  # bf16 q, k, v, o and (eager) scores
    out = []
    for case, B, H, L, Dh, per_batch_bias in [("ViT-S B=32 H=6 L=197 Dh=64, 2D ALiBi", 32, 6, 197, 64, False),
                                              ("masked (gathered) B=256 H=6 L=40 Dh=64, 2D ALiBi at kept coords",
                                               256, 6, 40, 64, True)]:
        Q, S = B * H * L * Dh, B * H * L * L
        stats = B * H * L * 4
        fused = [
            Step("fwd: read q, k, v (+ coords, slopes)", "3·Q·2", 3 * Q * e, 1),
            Step("fwd: write o, lse", "Q·2 + B·H·L·4", Q * e + stats, 0),
            Step("bwd: read q, k, v, o, dO, lse (+ delta)", "5·Q·2 + 2·B·H·L·4", 5 * Q * e + 2 * stats, 2),
            Step("bwd: write dq, dk, dv", "3·Q·2", 3 * Q * e, 0),
        ]
        bias = (Step("bias (B, H, L, L) from gathered coords", "S·2 + 3·B·L²·4", S * e + 3 * B * L * L * 4, 4)
                if per_batch_bias else Step("bias (H, L, L), broadcast", "3·H·L²·2 (build, write, read)", H * L * L * e * 3, 4))
        eager = [
            bias,
            Step("q·scale; q kᵀ", "2·Q·2 + (2·Q + S)·2", (4 * Q + S) * e, 2),
            Step("+ bias; softmax", "(2 + 2)·S·2", 4 * S * e, 2),
            Step("P v", "(S + 2·Q)·2", (S + 2 * Q) * e, 1),
            Step("bwd: dV = Pᵀ dO, dP = dO vᵀ", "(S + 2Q + 2Q + S)·2", (2 * S + 4 * Q) * e, 2),
            Step("bwd: softmax bwd", "3·S·2", 3 * S * e, 1),
            Step("bwd: dq = dS k, dk = dSᵀ q, scale bwd", "(2·(S + 2Q) + 2Q)·2", (2 * S + 6 * Q) * e, 3),
        ]
        out.append(Account("alibi_attention", f"{case}, bf16, fwd+bwd; Q = B·H·L·Dh, S = B·H·L²", fused, eager,
                           "SDPA math with a materialized bias (the SPEC oracle)", 14 * S * Dh, 12 * S * Dh,
                           tensor_cores=True,
                           notes="Fused flops include the backward's recompute of q kᵀ (flash-attention style)."))
    return out


def d2v_accounts() -> list[Account]:
    e = 4
    B, T, D, K, M, r = 32, 196, 768, 10, 4, 0.8
    N = B * T * D
    fused = [
        Step("read K teacher layers", "K·N·4", K * N * e, 1),
        Step("write targets y (once per image, reused by M clones)", "N·4", N * e, 0),
    ]
    eager = [
        Step("layer 0: contiguous + instance_norm", "(2 + 3)·N·4", 5 * N * e, 3),
        Step("layers 1..K−1: contiguous, instance_norm, y.add_", "(K−1)·(2 + 3 + 3)·N·4", (K - 1) * 8 * N * e, (K - 1) * 4),
        Step("y.div_(K); contiguous; layer_norm", "(2 + 2 + 2)·N·4", 6 * N * e, 3),
    ]
    out = [Account("layer_average_targets", f"K={K} layers of ({B}, {T}, {D}) fp32; N = B·T·D", fused, eager,
                   "fairseq data2vec2.py make_targets (instance_norm_target_layer, layer_norm_targets)",
                   8 * K * N, 8 * K * N,
                   notes=f"A two-pass kernel (statistics pass, then normalize + average) reads the layers twice: "
                         f"{(2 * K + 1) * N * e / 1e6:.0f} MB.")]
    MN = M * N
    fused = [
        Step("read pred at masked rows, mask", "r·M·N·4 + M·B·T", r * MN * e + M * B * T, 1),
        Step("read y (distinct rows)", "N·4", N * e, 0),
        Step("write grad_pred (zeros at unmasked rows)", "M·N·4", MN * e, 0),
    ]
    eager = [
        Step("y.repeat_interleave(M, 0)", "N·4 + M·N·4", (N + MN) * e, 1),
        Step("x[mask], y[mask] (nonzero: host sync)", "2 · 2·r·M·N·4", 4 * r * MN * e, 4),
        Step("mse_loss(reduction='none'), sum(−1), /√D, sum", "(3 + 1)·r·M·N·4", 4 * r * MN * e, 4),
        Step("bwd: mse bwd", "3·r·M·N·4", 3 * r * MN * e, 2),
        Step("bwd: index bwd (zeros + index_put)", "M·N·4 + 2·r·M·N·4", (MN + 2 * r * MN) * e, 2),
    ]
    out.append(Account("masked_regression_loss", f"M={M} clones of ({B}, {T}, {D}) fp32, mask {r}, fwd+bwd",
                       fused, eager, "fairseq data2vec2.py (repeat_interleave targets, d2v_loss)", 5 * r * MN, 5 * r * MN))
    return out


def accounts() -> list[Account]:
    return [*ema_accounts(), dino_account(), ibot_account(), *gather_accounts(), *attention_accounts(), *d2v_accounts()]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e10 else f"{x / 1e9:,.1f} GB"


def _us(x: float) -> str:
    return f"{x * 1e6:,.0f} µs"


def render_markdown() -> str:
    accs = accounts()
    g_a, g_h = GPUS
    lines = [
        "## Bytes-and-flops model (a MODEL, not a measurement)",
        "",
        "No sslkern op has run on a GPU yet. These figures are counted, not measured: the fused column "
        "is the fewest bytes a fused kernel must move (inputs read once, outputs written once, forward and "
        "backward), the eager column the bytes the eager code moves from its op sequence (one read of each "
        "input and one write of each output per eager kernel; views free; O(K)/O(B) tensors and broadcast "
        "reads left out, so eager counts are lower bounds). Modelled time = max(bytes / HBM bandwidth, "
        f"flops / peak) + kernels × {LAUNCH_S * 1e6:.0f} µs, with {g_a.name} {g_a.bandwidth / 1e12:.2f} TB/s, "
        f"{g_a.fp32 / 1e12:.1f} TF fp32, {g_a.tensor / 1e12:.0f} TF bf16 tensor and {g_h.name} "
        f"{g_h.bandwidth / 1e12:.2f} TB/s, {g_h.fp32 / 1e12:.0f} TF fp32, {g_h.tensor / 1e12:.0f} TF bf16 tensor; "
        "real kernels reach 70-90 % of peak bandwidth, which scales both sides alike. "
        "Expected speed-up = modelled eager time / modelled fused time. Sizes are the benchmark sizes of each "
        "op's issue. Regenerate with `python -m sslkern.gpu_model`.",
        "",
        "| op | case | fused bytes | eager bytes | byte ratio | kernels fused / eager | flops (fused) | "
        f"model time fused / eager, {g_h.name} | expected speed-up {g_a.name} | expected speed-up {g_h.name} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in accs:
        lines.append(
            f"| {a.op} | {a.case} | {_mb(a.fused_bytes)} | {_mb(a.eager_bytes)} | "
            f"{a.eager_bytes / a.fused_bytes:.1f}× | {a.fused_kernels} / {a.eager_kernels} | "
            f"{a.flops_fused / 1e9:,.2f} G | {_us(a.time(g_h, True))} / {_us(a.time(g_h, False))} | "
            f"{a.time(g_a, False) / a.time(g_a, True):.1f}× (model) | {a.time(g_h, False) / a.time(g_h, True):.1f}× (model) |")
    lines += ["", "### Per-op accounts (bytes per element written out in each formula: 4 = fp32, 2 = bf16, 8 = int64 index)", ""]
    for a in accs:
        lines += [f"**{a.op}** — {a.case}. Eager sequence: {a.eager_source}." + (f" {a.notes}" if a.notes else ""), "",
                  "| side | step | bytes (formula) | bytes | kernels |", "|---|---|---|---|---|"]
        for side, steps in (("fused", a.fused), ("eager", a.eager)):
            for s in steps:
                lines.append(f"| {side} | {s.what} | {s.formula} | {_mb(s.nbytes)} | {s.kernels} |")
        lines += [f"| **total** | fused {_mb(a.fused_bytes)}, eager {_mb(a.eager_bytes)} | "
                  f"ratio {a.eager_bytes / a.fused_bytes:.1f}× | | {a.fused_kernels} / {a.eager_kernels} |", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown())
