"""Bytes-and-flops model of every sslkern op: what the fused kernel must move vs the eager code.

A MODEL, not a measurement. For each op and benchmark size it counts

* the fewest bytes a fused kernel must move: every input read once, every output written
  once (forward and backward where the op is differentiable), and
* the bytes the eager reference moves, from its op sequence (the public code named in
  the method's public code), counting for each eager kernel one read of each input and one write of
  its output; views are free; reads of broadcast operands (stride 0) and tensors of size
  O(K) or O(B) are left out. Real softmax / norm kernels on long rows often read their
  input twice, so the eager counts are lower bounds.

The expected time on a GPU is modelled as
``max(bytes / HBM bandwidth, flops / peak) + kernels * LAUNCH_S``, and the expected speed-up
as the ratio of eager to fused time. Until a GPU measures these ops, the speed-up column is
this model and nothing more. ``python tools/gpu_model.py`` prints the markdown.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this tree's sslkern
    sys.path.insert(1, str(ROOT))

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
                   notes="Where layer_norm needs a contiguous copy of the transposed y, add 2·N·4. "
                         f"A two-pass kernel (backward re-reads s and t) moves {(V + T) * R * e / 1e6:.0f} MB more. "
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
        Step("bwd: zeros, then out-of-place scatter_add (gather bwd)", "B·L·D·4·3 + B·Lk·D·(8+4)",
             3 * BLD * e + BKD * (i64 + e), 2),
        Step("bwd: grad_pos = sum over B", "B·L·D·4", BLD * e, 1),
        Step("CLS + pos[:, :1]; bwd: CLS sum, pos grad from two slices (slice bwd ×2, add)", "≈ 7·(L+1)·D·4",
             7 * (L + 1) * D * e, 5),
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
        Step("bwd: zeros, then out-of-place scatter_add (gather bwd)", "B·L·Dd·4·3 + B·L·Dd·(8+4)",
             3 * BLd * e + BLd * (i64 + e), 2),
        Step("bwd: slice bwd of x[:, :1] and x[:, 1:], add", "(1 + 2 + 3)·B·(Lk+1)·Dd·4", 6 * Bk1d * e, 3),
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
        Step("bwd: zeros, then out-of-place scatter_add", "M·B·L·D·4·3 + M·B·Lk·D·(8+4)",
             3 * M * BLD * e + MBKD * (i64 + e), 2),
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
        Bb = B if per_batch_bias else 1  # the bias is per image only on gathered (masked) sequences
        Sb = Bb * H * L * L
        eager = [
            Step(f"bias ({'B' if per_batch_bias else '1'}, H, L, L): |Δrow|+|Δcol| (fp32), ·slope, to bf16",
                 f"{'B' if per_batch_bias else '1'}·L²·4·10 + Sb·(4+4+2)", Bb * L * L * 4 * 10 + Sb * 10, 6),
            Step("q·scale; q kᵀ", "2·Q·2 + (2·Q + S)·2", (4 * Q + S) * e, 2),
            Step("+ bias; softmax", "(2·S + Sb + 2·S)·2", (4 * S + Sb) * e, 2),
            Step("P v", "(S + 2·Q)·2", (S + 2 * Q) * e, 1),
            Step("bwd: dP = dO vᵀ, dV = Pᵀ dO", "(S + 2Q + 2Q + S)·2", (2 * S + 4 * Q) * e, 2),
            Step("bwd: softmax bwd", "3·S·2", 3 * S * e, 1),
            Step("bwd: dq = dS k, dk = dSᵀ q, dk to contiguous, scale bwd", "(2·(S + 2Q) + 2Q + 2Q)·2",
                 (2 * S + 8 * Q) * e, 4),
        ]
        out.append(Account("alibi_attention", f"{case}, bf16, fwd+bwd; Q = B·H·L·Dh, S = B·H·L², Sb = bias elements", fused, eager,
                           "SDPA math with a materialized bias (the eager oracle)", 14 * S * Dh, 12 * S * Dh,
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
        Step("per layer: contiguous copy, instance_norm (batch_norm)", "K·(2 + 2)·N·4", K * 4 * N * e, K * 2),
        Step("y.add_ of layers 1..K−1", "(K−1)·3·N·4", (K - 1) * 3 * N * e, K - 1),
        Step("y.div_(K); layer_norm", "(2 + 2)·N·4", 4 * N * e, 2),
    ]
    out = [Account("layer_average_targets", f"K={K} layers of ({B}, {T}, {D}) fp32; N = B·T·D", fused, eager,
                   "fairseq data2vec2.py make_targets (instance_norm_target_layer, layer_norm_targets)",
                   8 * K * N, 8 * K * N,
                   notes="Where layer_norm needs a contiguous copy of the transposed y, add 2·N·4. "
                         f"A two-pass kernel (statistics pass, then normalize + average) reads the layers twice: "
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
        Step("bwd: index bwd (zeros, out-of-place index_put)", "M·N·4·3 + r·M·N·4", (3 * MN + r * MN) * e, 2),
    ]
    out.append(Account("masked_regression_loss", f"M={M} clones of ({B}, {T}, {D}) fp32, mask {r}, fwd+bwd",
                       fused, eager, "fairseq data2vec2.py (repeat_interleave targets, d2v_loss)", 5 * r * MN, 5 * r * MN))
    return out


def info_nce_account() -> Account:
    N = M = 16384
    D, e = 256, 2  # bf16 embeddings and (eager) logits
    S = N * M
    X = (N + M) * D * e  # q and k once
    fused = [
        Step("normalize q, k (torch ops, as the eager code)", "3·(N+M)·D·2", 3 * X, 6),
        Step("fwd kernel: read q, k; write row lse (+ row loss)", "(N+M)·D·2 + 2·N·4", X + 2 * N * 4, 2),
        Step("dq kernel: read q, k, lse; write dq", "(N+M)·D·2 + N·4 + N·D·2", X + N * 4 + N * D * e, 1),
        Step("dk kernel: read q, k, lse; write dk", "(N+M)·D·2 + N·4 + M·D·2", X + N * 4 + M * D * e, 1),
        Step("normalize backward (autograd of x / max(‖x‖, eps))", "22·(N+M)·D·2", 22 * X, 30),
    ]
    eager = [
        Step("normalize q, k", "3·(N+M)·D·2", 3 * X, 6),
        Step("logits q kᵀ", "(N+M)·D·2 + S·2", X + S * e, 1),
        Step("/ τ; log_softmax; nll_loss", "(2 + 2 + 1)·S·2", 5 * S * e, 3),
        Step("bwd: nll_loss bwd (scatter into zeros), log_softmax bwd, div bwd", "(2 + 3 + 2)·S·2", 7 * S * e, 4),
        Step("bwd: dq = G k, dk = Gᵀ q", "2·S·2 + 2·(N+M)·D·2", 2 * S * e + 2 * X, 2),
        Step("normalize backward", "22·(N+M)·D·2", 22 * X, 30),
    ]
    return Account("info_nce_loss", f"N=M={N}, D={D}, bf16, fwd+bwd (dq, dk); S = N·M logits", fused, eager,
                   "MoCo v3 builder.py contrastive loss (normalize, einsum, CrossEntropyLoss) + autograd",
                   10 * S * D, 6 * S * D, tensor_cores=True,
                   notes="Fused flops include the logits recomputed by the dq and dk kernels (5 products of "
                         "N·M·D against the eager 3). At fp32 without TF32 both sides are compute-bound on CUDA "
                         "cores and the model expects the fused kernels to be slower (≈0.6×); the C++ CPU kernel "
                         "does 3 products (the logits block is shared by the loss and both gradients).")


def accounts() -> list[Account]:
    return [*ema_accounts(), dino_account(), ibot_account(), *gather_accounts(), *attention_accounts(), *d2v_accounts(),
            info_nce_account()]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e10 else f"{x / 1e9:,.1f} GB"


def _us(x: float) -> str:
    return f"{x * 1e6:,.0f} µs"


def counted_bytes(acc: Account) -> float | None:
    """Eager bytes counted by running the public op sequence on meta tensors (None if not possible)."""
    build = program_for(acc)
    if build is None:
        return None
    try:
        return float(count_eager(build())[0])
    except Exception:  # e.g. an old torch without an op on meta: the formula column still stands
        return None


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
        "op's benchmark. The formulas are checked against a count: the public op sequence (autograd included) "
        "run on meta tensors under a dispatch mode that adds up each aten op's input and output bytes "
        "(`count_eager`; gather/index read only the selected elements) — column 'eager counted'. "
        "Regenerate with `python tools/gpu_model.py`.",
        "",
        "| op | case | fused bytes | eager bytes (formula) | eager counted | byte ratio | kernels fused / eager | "
        f"flops (fused) | model time fused / eager, {g_h.name} | expected speed-up {g_a.name} | "
        f"expected speed-up {g_h.name} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in accs:
        counted = counted_bytes(a)
        lines.append(
            f"| {a.op} | {a.case} | {_mb(a.fused_bytes)} | {_mb(a.eager_bytes)} | "
            f"{_mb(counted) if counted is not None else '—'} | "
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



# --------------------------------------------------------------------------------------------
# Cross-check: count the bytes of the eager op sequences by running them on meta tensors
# --------------------------------------------------------------------------------------------
def _distinct_nbytes(t) -> int:
    """Bytes of the distinct elements a kernel reads from ``t`` (stride-0 broadcast dims once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


_FREE_OPS = {"_local_scalar_dense", "lift_fresh", "_unsafe_view", "detach", "alias"}
_FILL_OPS = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "zeros", "ones", "full",
             "fill_", "zero_"}


def count_eager(program, log: list | None = None) -> tuple[int, int]:
    """(bytes, kernels) of ``program()``, counted per aten op as inputs read once + outputs written once.

    Views and ``empty`` allocations are free; in-place ops read and write their target. Run it on
    meta tensors: nothing is computed, only the op sequence (autograd included) is observed.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    totals = [0, 0]

    class ByteCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            schema = func._schema
            name = schema.name.split("::")[-1]
            views = schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                           for r in schema.returns)
            if views or name.startswith(("empty", "new_empty")) or name in _FREE_OPS:
                return out
            tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            writes = sum(o.numel() * o.element_size() for o in tree_leaves(out) if isinstance(o, torch.Tensor))
            if name in _FILL_OPS:  # the tensor argument only gives shape and dtype
                tensors = []
            if name == "copy_":  # the destination is written, not read
                tensors = tensors[1:]
            if name in ("gather", "index", "index_select"):  # read the indices and only the selected elements
                reads = writes + sum(_distinct_nbytes(a) for a in tensors[1:])
            else:
                reads = sum(_distinct_nbytes(a) for a in tensors)
            totals[0] += reads + writes
            totals[1] += 1
            if log is not None:
                log.append((name, reads, writes))
            return out

    with ByteCounter():
        program()
    return totals[0], totals[1]


def _meta(*shape, dtype=None, grad=False, device="meta"):
    import torch

    return torch.empty(*shape, device=device, dtype=dtype or torch.float32, requires_grad=grad)


def eager_programs() -> dict[tuple[str, str], object]:
    """Public-code op sequences at the benchmark sizes, keyed by (op, first word of the case).

    Each value builds its inputs and returns a zero-argument callable doing forward + backward
    (where the op is differentiable), for ``count_eager``. Written from the public code named
    in each account; inputs are meta tensors except where the code needs values (boolean masks).
    """
    import torch
    import torch.nn.functional as F

    def ema(mixed):
        def build():
            from sslkern.reference.ema_update import ema_update_
            d = 768  # timm vit_base_patch16_224: 12 blocks of 12 tensors + 8 others = 152, 86,567,656 elements
            block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
            sizes = block * 12 + [d, 197 * d, d * 3 * 16 * 16, d, d, d, 1000 * d, 1000]
            teachers = [_meta(n) for n in sizes]
            students = [_meta(n, dtype=torch.bfloat16 if mixed else torch.float32) for n in sizes]
            return lambda: ema_update_(teachers, students, 0.996)
        return build

    def dino():
        B, K, V, T = 32, 65536, 8, 2
        s, t, c = _meta(V * B, K, grad=True), _meta(T * B, K), _meta(1, K)

        def run():  # dino main_dino.py DINOLoss.forward, update_center
            student_out = (s / 0.1).chunk(V)
            teacher_out = F.softmax((t - c) / 0.04, dim=-1).detach().chunk(T)
            total, n = 0, 0
            for iq, q in enumerate(teacher_out):
                for v in range(V):
                    if v == iq:
                        continue
                    total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    n += 1
            total = total / n
            with torch.no_grad():
                batch_center = torch.sum(t, dim=0, keepdim=True) / len(t)
                c.mul_(0.9).add_(batch_center * 0.1)
            total.backward()
        return lambda: run

    def ibot():
        N, K = 64 * 196, 8192
        s, t, c, w = _meta(N, K, grad=True), _meta(N, K), _meta(1, K), _meta(N)

        def run():  # dinov2 ibot_patch_loss.py softmax_center_teacher, forward_masked, update_center
            p = F.softmax((t - c) / 0.04, dim=-1)
            loss = torch.sum(p * F.log_softmax(s / 0.1, dim=-1), dim=-1)
            loss = -(loss * w).sum() / 64
            with torch.no_grad():
                c.mul_(0.9).add_(t.sum(dim=0, keepdim=True) / N * 0.1)
            loss.backward()
        return lambda: run

    def gather():
        B, L, D, Lk = 64, 196, 768, 49
        x, pos, cls = _meta(B, L, D, grad=True), _meta(1, L + 1, D, grad=True), _meta(1, 1, D, grad=True)
        ids_keep = torch.empty(B, Lk, dtype=torch.int64, device="meta")

        def run():  # mae models_mae.py forward_encoder (after patch_embed)
            h = x + pos[:, 1:, :]
            h = torch.gather(h, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
            c = (cls + pos[:, :1, :]).expand(B, -1, -1)
            out = torch.cat((c, h), dim=1)
            out.backward(torch.empty_like(out))
        return lambda: run

    def restore():
        B, L, Dd, Lk = 64, 196, 512, 49
        x, tok, pos = _meta(B, Lk + 1, Dd, grad=True), _meta(1, 1, Dd, grad=True), _meta(1, L + 1, Dd, grad=True)
        ids_restore = torch.empty(B, L, dtype=torch.int64, device="meta")

        def run():  # mae models_mae.py forward_decoder (after decoder_embed)
            mask_tokens = tok.repeat(B, L + 1 - x.shape[1], 1)
            h = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            h = torch.gather(h, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))
            h = torch.cat([x[:, :1, :], h], dim=1)
            out = h + pos
            out.backward(torch.empty_like(out))
        return lambda: run

    def clone():
        B, L, D, Lk, M = 32, 196, 768, 49, 8
        x = _meta(B, L, D, grad=True)
        ids = torch.empty(B * M, Lk, dtype=torch.int64, device="meta")

        def run():  # data2vec 2.0: repeat the batch per clone, then gather each clone's kept tokens
            h = x.repeat_interleave(M, 0)
            out = torch.gather(h, 1, ids.unsqueeze(-1).repeat(1, 1, D))
            out.backward(torch.empty_like(out))
        return lambda: run

    def attention(B, L, per_batch):
        H, Dh = 6, 64

        def build():
            q, k, v = (_meta(B, H, L, Dh, dtype=torch.bfloat16, grad=True) for _ in range(3))
            rc = _meta(B if per_batch else 1, L, 2)
            slopes = _meta(H)

            def run():  # materialized 2D ALiBi bias (Manhattan distance), then softmax(q kᵀ·scale + bias) v
                dist = (rc[:, :, None, :] - rc[:, None, :, :]).abs().sum(-1)
                bias = (-slopes[None, :, None, None] * dist[:, None]).to(torch.bfloat16)
                attn = (q * Dh ** -0.5) @ k.transpose(-2, -1)
                attn = (attn + bias).softmax(dim=-1)
                out = attn @ v
                out.backward(torch.empty_like(out))
            return run
        return build

    def targets():
        B, T, D, K = 32, 196, 768, 10
        layers = [_meta(B, T, D) for _ in range(K)]

        def run():  # fairseq data2vec2.py make_targets (instance_norm_target_layer, layer_norm_targets)
            ys = [F.instance_norm(tl.transpose(1, 2).float()).transpose(1, 2) for tl in layers]
            y = ys[0].float()
            for tl in ys[1:]:
                y.add_(tl.float())
            y = y.div_(K)
            F.layer_norm(y, y.shape[-1:])
        return lambda: run

    def regression():
        B, T, D, M = 32, 196, 768, 4

        def build():  # needs mask values (boolean indexing): small real CPU tensors
            x = torch.zeros(M * B, T, D, requires_grad=True)
            y = torch.zeros(B, T, D)
            g = torch.Generator().manual_seed(0)
            mask = torch.rand(M * B, T, generator=g).argsort(1) < int(0.8 * T)

            def run():  # fairseq data2vec2.py: targets repeated per clone, d2v_loss at masked tokens
                yy = y.repeat_interleave(M, 0)
                loss = F.mse_loss(x[mask].float(), yy[mask], reduction="none").sum(dim=-1) / math.sqrt(D)
                loss.sum().backward()
            return run
        return build

    def info_nce():
        N = M = 16384
        D = 256
        q, k = _meta(N, D, dtype=torch.bfloat16, grad=True), _meta(M, D, dtype=torch.bfloat16, grad=True)
        labels = torch.empty(N, dtype=torch.int64, device="meta")

        def run():  # MoCo v3 moco/builder.py contrastive loss (without its constant 2τ factor)
            logits = torch.einsum("nc,mc->nm", F.normalize(q, dim=1), F.normalize(k, dim=1)) / 0.2
            F.cross_entropy(logits, labels).backward()
        return lambda: run

    return {
        ("ema_update_", "student fp32"): ema(False), ("ema_update_", "student bf16"): ema(True),
        ("dino_loss", ""): dino(), ("ibot_patch_loss", ""): ibot(), ("gather_tokens", ""): gather(),
        ("restore_tokens", ""): restore(), ("gather_tokens (clone batch)", ""): clone(),
        ("alibi_attention", "ViT-S"): attention(32, 197, False), ("alibi_attention", "masked"): attention(256, 40, True),
        ("layer_average_targets", ""): targets(), ("masked_regression_loss", ""): regression(),
        ("info_nce_loss", ""): info_nce(),
    }


def program_for(acc: Account):
    for (op, key), build in eager_programs().items():
        if op == acc.op and key in acc.case:
            return build
    return None


if __name__ == "__main__":
    print(render_markdown())
