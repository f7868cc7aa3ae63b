"""``prototype_loss`` — Triton kernels: the prototype layer + DINO / iBOT loss, no (rows, K) logits.

Decoupled form of the gradient (attention-like: rows = queries, prototypes = keys / values).
With ``a_r = scale·w_b·n_v/τs`` per student row, ``γ_b = scale·w_b/τs`` per group and the
student softmax ``σ`` / teacher probabilities ``p``:

    dW   = Σ_r a_r σ_r ⊗ zs_r − Σ_q p_q ⊗ Z_q,     Z_q = Σ_{v paired with q} γ_b zs_{v,b}
    dzs_v = a_v Σ_k σ_v[k] W_k − γ_b Σ_{q paired} Y_q,  Y_q = Σ_k p_q[k] W_k
    loss = Σ_v a_v τs·logsumexp(s_v/τs) − Σ_v γ_b zs_v · Σ_{q paired} Y_q

so the teacher enters only through the mixes ``Y`` (Rt, D) and the student through its
row log-normaliser. Two launches:
  1. ``proto_row_stats_kernel`` (twice: student rows, teacher rows) — one program per
     BLOCK_R rows, walking the prototypes in tiles of BLOCK_K: logits ``z·vᵀ·r`` (− c),
     online (rescaled) max / exp-sum; stores the row max and log normaliser.
  2. ``proto_tile_grad_kernel`` — one program per tile of BLOCK_K prototypes, holding the
     tile of W (and W_t) and its dW accumulator: over the student row blocks it recomputes
     the logits, ``A = a·σ``, ``dW += Aᵀ zs`` and adds ``A W`` into dzs (fp32 atomics); over
     the teacher row blocks ``p``, ``dW −= pᵀ Z`` and adds ``p W`` into Y (atomics); then the
     weight-norm backward of its rows (``dv = r (dW − (dW·v̂) v̂)``, ``dg = dW·v̂``).
The pairings (``Z``, ``Σ_{q paired} Y_q``), the loss sum and the center column sums
``(Σ zt)·vtᵀ·rt`` are small torch ops on (rows, D) / (K,) tensors.
Products: fp32 (``input_precision="ieee"``); fp16 / bf16 tiles are upcast to fp32 before
``tl.dot`` (also what keeps bf16 right in the interpreter). fp64 runs on the cpu / reference
backends. Db ≤ 256. The atomics make dzs and Y order-dependent in the last bits; under
``torch.use_deterministic_algorithms(True)`` this backend raises (use ``backend="cpu"`` /
``"reference"``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

D_PADS = (16, 32, 64, 128, 256)
# (BLOCK_R, BLOCK_K, num_warps) per D_PAD for the tile-gradient kernel; the stats kernel
# uses BLOCK_R = BLOCK_K = 32, BLOCK_D = min(D_PAD, 64)
GRAD_CONFIGS = {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 32, 8), 128: (16, 16, 8), 256: (16, 16, 8)}
STATS_BLOCK = 32
STATS_WARPS = 8  # 4 spilled 48-64 B at BLOCK_D >= 32 on sm_80 (GPU report)


@triton.jit
def proto_row_stats_kernel(z_ptr, v_ptr, r_ptr, c_ptr, m_ptr, lz_ptr, R, K, D, inv,
                           HAS_R: tl.constexpr, HAS_C: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            zt = tl.load(z_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + cols[:, None].to(tl.int64) * D + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(zt, tl.trans(vt), input_precision="ieee")
        if HAS_R:
            acc = acc * tl.load(r_ptr + cols, mask=cmask, other=0.0)[None, :]
        if HAS_C:
            acc = acc - tl.load(c_ptr + cols, mask=cmask, other=0.0)[None, :]
        acc = tl.where(cmask[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        z = z * tl.exp((m - m_new) * inv) + tl.sum(tl.exp((acc - m_new[:, None]) * inv), axis=1)
        m = m_new
    tl.store(m_ptr + rows, m, mask=rmask)
    tl.store(lz_ptr + rows, tl.log(z), mask=rmask)


@triton.jit
def proto_tile_grad_kernel(zs_ptr, zt_ptr, v_ptr, vt_ptr, r_ptr, rt_ptr, invn_ptr, c_ptr,
                           ms_ptr, lzs_ptr, a_ptr, mt_ptr, lzt_ptr, zq_ptr,
                           dzs_ptr, y_ptr, dv_ptr, dg_ptr,
                           Rs, Rt, K, D, inv_ts, inv_tt,
                           HAS_R: tl.constexpr, HAS_RT: tl.constexpr, GRAD: tl.constexpr, GAIN_GRAD: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    ds = tl.arange(0, D_PAD)
    dmask = ds < D
    kd_mask = cmask[:, None] & dmask[None, :]
    kd_off = cols[:, None].to(tl.int64) * D + ds[None, :]
    v = tl.load(v_ptr + kd_off, mask=kd_mask, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + cols, mask=cmask, other=0.0)
        w = v * r[:, None]
    else:
        w = v
    dw = tl.zeros((BLOCK_K, D_PAD), tl.float32)
    if GRAD:
        for r0 in range(0, Rs, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < Rs
            rd_off = rows[:, None].to(tl.int64) * D + ds[None, :]
            rd_mask = rmask[:, None] & dmask[None, :]
            zs = tl.load(zs_ptr + rd_off, mask=rd_mask, other=0.0).to(tl.float32)
            s = tl.dot(zs, tl.trans(w), input_precision="ieee")
            m = tl.load(ms_ptr + rows, mask=rmask, other=0.0)
            lz = tl.load(lzs_ptr + rows, mask=rmask, other=0.0)
            a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
            sm = tl.exp((s - m[:, None]) * inv_ts - lz[:, None]) * a[:, None]
            sm = tl.where(rmask[:, None] & cmask[None, :], sm, 0.0)
            dw += tl.dot(tl.trans(sm), zs, input_precision="ieee")
            tl.atomic_add(dzs_ptr + rd_off, tl.dot(sm, w, input_precision="ieee"), mask=rd_mask, sem="relaxed")
    vt = tl.load(vt_ptr + kd_off, mask=kd_mask, other=0.0).to(tl.float32)
    if HAS_RT:
        vt = vt * tl.load(rt_ptr + cols, mask=cmask, other=0.0)[:, None]
    c = tl.load(c_ptr + cols, mask=cmask, other=0.0)
    for r0 in range(0, Rt, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < Rt
        rd_off = rows[:, None].to(tl.int64) * D + ds[None, :]
        rd_mask = rmask[:, None] & dmask[None, :]
        zt = tl.load(zt_ptr + rd_off, mask=rd_mask, other=0.0).to(tl.float32)
        t = tl.dot(zt, tl.trans(vt), input_precision="ieee") - c[None, :]
        m = tl.load(mt_ptr + rows, mask=rmask, other=0.0)
        lz = tl.load(lzt_ptr + rows, mask=rmask, other=0.0)
        p = tl.exp((t - m[:, None]) * inv_tt - lz[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        tl.atomic_add(y_ptr + rd_off, tl.dot(p, w, input_precision="ieee"), mask=rd_mask, sem="relaxed")
        if GRAD:
            zq = tl.load(zq_ptr + rd_off, mask=rd_mask, other=0.0)
            dw -= tl.dot(tl.trans(p), zq, input_precision="ieee")
    if GRAD:
        if HAS_R:
            invn = tl.load(invn_ptr + cols, mask=cmask, other=0.0)
            d = tl.sum(dw * v, axis=1)
            if GAIN_GRAD:
                tl.store(dg_ptr + cols, d * invn, mask=cmask)
            dw = dw * r[:, None] - (r * d * invn * invn)[:, None] * v
        tl.store(dv_ptr + kd_off, dw.to(dv_ptr.dtype.element_ty), mask=kd_mask)


def _d_pad(D):
    for p in D_PADS:
        if D <= p:
            return p
    raise ValueError(f"sslkern.prototype_loss: the triton backend takes Db <= 256 feature columns, got {D} "
                     f"(use backend='cpu' or 'reference')")


def prototype_loss_triton(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale,
                          student_temp, teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad,
                          gain_grad, center_sum):
    for name, x in (("student", student), ("teacher", teacher), ("weight", weight), ("teacher_weight", teacher_weight)):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"sslkern.prototype_loss: the triton backend takes fp32, fp16 or bf16 {name}, got "
                            f"{str(x.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    if compute_grad and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError("sslkern.prototype_loss: the triton backend accumulates with atomics; under "
                           "torch.use_deterministic_algorithms(True) use backend='cpu' or 'reference'")
    V, T = n_student_views, n_teacher_views
    zs, zt = student.contiguous(), teacher.contiguous()
    v, vt = weight.contiguous(), teacher_weight.contiguous()
    Rs, D = zs.shape
    Rt, K = zt.shape[0], v.shape[0]
    B = Rs // V
    dev, f32 = zs.device, torch.float32
    d_pad = _d_pad(D)
    c = center.reshape(-1).to(f32).contiguous()
    invn = r = rt = None
    if gain is not None:
        invn = torch.linalg.vector_norm(v, dim=1, dtype=f32).reciprocal()
        r = (gain.reshape(-1).to(f32) * invn).contiguous()
    if teacher_gain is not None:
        rt = (teacher_gain.reshape(-1).to(f32) * torch.linalg.vector_norm(vt, dim=1, dtype=f32).reciprocal()).contiguous()
    dummy = c
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    ms, lzs = torch.empty(Rs, dtype=f32, device=dev), torch.empty(Rs, dtype=f32, device=dev)
    mt, lzt = torch.empty(Rt, dtype=f32, device=dev), torch.empty(Rt, dtype=f32, device=dev)
    bd = min(d_pad, 64)
    proto_row_stats_kernel[(triton.cdiv(Rs, STATS_BLOCK),)](
        zs, v, r if r is not None else dummy, dummy, ms, lzs, Rs, K, D, inv_ts,
        HAS_R=r is not None, HAS_C=False, BLOCK_R=STATS_BLOCK, BLOCK_K=STATS_BLOCK, BLOCK_D=bd, num_warps=STATS_WARPS)
    proto_row_stats_kernel[(triton.cdiv(Rt, STATS_BLOCK),)](
        zt, vt, rt if rt is not None else dummy, c, mt, lzt, Rt, K, D, inv_tt,
        HAS_R=rt is not None, HAS_C=True, BLOCK_R=STATS_BLOCK, BLOCK_K=STATS_BLOCK, BLOCK_D=bd, num_warps=STATS_WARPS)
    # per-row / per-group factors and the pairings (small tensors)
    w = torch.full((B,), scale, dtype=f32, device=dev)
    if weights is not None:
        w = w * weights.to(f32)
    nv = torch.full((V,), T, dtype=f32, device=dev)
    if skip_same_view:
        nv[:min(T, V)] -= 1
    a = (nv[:, None] * w[None, :] * inv_ts).reshape(-1).contiguous()   # a_r = scale w_b n_v / ts
    gam = w * inv_ts                                                     # γ_b
    zs32 = zs.to(f32).view(V, B, D)
    zq = torch.empty(0, dtype=f32, device=dev)
    if compute_grad:
        ztot = (zs32 * gam[None, :, None]).sum(0)                        # (B, D)
        zq = ztot.expand(T, B, D).clone()
        if skip_same_view:
            n = min(T, V)
            zq[:n] -= zs32[:n] * gam[None, :, None]
        zq = zq.reshape(Rt, D).contiguous()
    y = torch.zeros(Rt, D, dtype=f32, device=dev)
    dzs_acc = torch.zeros(Rs if compute_grad else 0, D, dtype=f32, device=dev)
    dv = torch.empty_like(v) if compute_grad else v.new_empty(0)
    dg = torch.empty(K if (compute_grad and gain_grad) else 0, dtype=f32, device=dev)
    br, bk, nw = GRAD_CONFIGS[d_pad]
    proto_tile_grad_kernel[(triton.cdiv(K, bk),)](
        zs, zt, v, vt, r if r is not None else dummy, rt if rt is not None else dummy,
        invn if invn is not None else dummy, c, ms, lzs, a, mt, lzt, zq if compute_grad else dummy,
        dzs_acc if compute_grad else dummy, y, dv if compute_grad else dummy, dg if gain_grad else dummy,
        Rs, Rt, K, D, inv_ts, inv_tt,
        HAS_R=r is not None, HAS_RT=rt is not None, GRAD=bool(compute_grad), GAIN_GRAD=bool(compute_grad and gain_grad),
        BLOCK_R=br, BLOCK_K=bk, D_PAD=d_pad, num_warps=nw)
    y = y.view(T, B, D)
    ypair = y.sum(0).expand(V, B, D).clone()
    if skip_same_view:
        n = min(T, V)
        ypair[:n] -= y[:n]
    lse = ms * inv_ts + lzs                                              # logsumexp(s / ts) per student row
    loss = (a * lse).sum() * student_temp - (gam[None, :] * (zs32 * ypair).sum(-1)).sum()
    if compute_grad:
        dzs = (dzs_acc.view(V, B, D) - gam[None, :, None] * ypair).reshape(Rs, D).to(student.dtype)
        dg = dg.to(gain.dtype).reshape(gain.shape) if gain_grad else dg
    else:
        dzs = student.new_empty(0)
    if center_sum:
        csum = vt.to(f32) @ zt.to(f32).sum(0) if vt.dtype != f32 else vt @ zt.to(f32).sum(0)
        if rt is not None:
            csum = csum * rt
    else:
        csum = torch.empty(0, dtype=f32, device=dev)
    return loss, dzs, dv, dg, csum


# ---------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
_DTYPES = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")]


def _aot_configs():
    configs = []
    for label, ty in _DTYPES:
        p = "*" + ty
        for bd in sorted({min(d, 64) for d in D_PADS}):
            for has_c, inv_name in ((False, "student"), (True, "teacher")):
                configs.append(dict(
                    name=f"proto_row_stats {label} BLOCK_D={bd} {inv_name}", kernel=proto_row_stats_kernel,
                    signature={"z_ptr": p, "v_ptr": p, "r_ptr": "*fp32", "c_ptr": "*fp32", "m_ptr": "*fp32",
                               "lz_ptr": "*fp32", "R": "i32", "K": "i32", "D": "i32", "inv": "fp32"},
                    constexprs=dict(HAS_R=True, HAS_C=has_c, BLOCK_R=STATS_BLOCK, BLOCK_K=STATS_BLOCK,
                                    BLOCK_D=bd),
                    num_warps=STATS_WARPS, num_stages=2))
        for d_pad in D_PADS:
            br, bk, nw = GRAD_CONFIGS[d_pad]
            for grad in (True, False):
                sig = {"zs_ptr": p, "zt_ptr": p, "v_ptr": p, "vt_ptr": p}
                for name in ("r_ptr", "rt_ptr", "invn_ptr", "c_ptr", "ms_ptr", "lzs_ptr", "a_ptr", "mt_ptr",
                             "lzt_ptr", "zq_ptr", "dzs_ptr", "y_ptr"):
                    sig[name] = "*fp32"
                sig.update({"dv_ptr": p, "dg_ptr": "*fp32", "Rs": "i32", "Rt": "i32", "K": "i32", "D": "i32",
                            "inv_ts": "fp32", "inv_tt": "fp32"})
                configs.append(dict(
                    name=f"proto_tile_grad {label} D_PAD={d_pad} grad={grad}", kernel=proto_tile_grad_kernel,
                    signature=sig,
                    constexprs=dict(HAS_R=True, HAS_RT=True, GRAD=grad, GAIN_GRAD=grad, BLOCK_R=br, BLOCK_K=bk,
                                    D_PAD=d_pad),
                    num_warps=nw, num_stages=2))
    return configs


AOT_CONFIGS = _aot_configs()
