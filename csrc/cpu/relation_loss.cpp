// relation_loss — RelViT pairwise spatial-relation loss (and distance / angle regressions), C++ CPU kernel.
//
// q, k: (B, N, C·dh) per-class projections of the patch tokens (class c in columns c·dh..),
// pos: (B, N) grid cell of each token (row-major, grid width W, G cells). Logits of the pair
// (i, j): x_c = scale · q_ic·k_jc.
//   classes = 9 (relation): cross-entropy against y_ij = 3·(sgn(r_i − r_j) + 1) + sgn(c_i − c_j) + 1,
//     with RelViT's label smoothing s: ℓ = lse(x) − (1 − s)·x_y − s·mean_c x_c; also counts argmax == y.
//   classes = 1 (regression): (x − table[pos_i·G + pos_j])², table (G, G) fp32 (RelViT's distance or
//     angle matrix).
// Both are averaged over the B·N·N pairs. Streaming over j tiles: a task owns one image b; for
// each tile of JT columns it forms the C logits blocks S_c (N × JT, one BLAS product each,
// alpha = scale), takes the per-pair statistics pair-major per tile row (the 9 logits of 8 pairs in
// AVX2 registers: max / argmax, one exp each, sums; ce_row_avx2), and (backward) turns S into
// G = dℓ/dx in place, then dq_b += G_c·K_c (accumulated over tiles) and
// dk_b[tile] = G_cᵀ·Q_c. The labels come from the grid coordinates inside the pass; nothing of
// size (B, N, N) or (B, C, N, N) exists: extra memory is C·N·JT (+ 2·JT) per thread (JT = N up
// to 2^19 elements). The backward recomputes the logits, unless the forward ran as
// relation_loss_with_grad_cpu (loss and gradients from one pass; the autograd wrapper then
// scales the saved dq, dk). fp16 / bf16 inputs are converted to fp32 copies; fp64 runs in fp64.
// Every exp-based loop runs under flush-to-zero (parallel_for_ftz, common.h).
// As alibi_attention.cpp: without -fno-trapping-math gcc does not if-convert exp_fast's clamps
// and the selects of the per-pair loops on AVX2, and those loops stay scalar. Set for this file
// only, before any include. Results unchanged (no FP exception flags are read here).
#pragma GCC optimize("no-trapping-math")
#include "blas.h"
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sslkern {
namespace {

// log for x >= 1 (a sum of exponentials of which the largest is 1), vectorisable: frexp by bit
// manipulation and Cephes' logf polynomial (~1 ulp).
inline float log_fast(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, 4);
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  const float f = small ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}
inline double log_fast(double x) { return std::log(x); }

constexpr int64_t kTileElems = int64_t(1) << 19;
constexpr int kRel = 9;

// One row i of a tile, pair-major: the 9 logits of each pair (i, j) for the max / argmax, the
// exponentials (one per logit, kept for G), the sums and (backward) G = dl/dx, written over S in
// place. Logits are shifted by their max m before the sums (the loss lse − (1 − s)·x_y − s·mean x
// does not change under the shift). Generic code (fp64, the tail of a row, CPUs without AVX2).
template <typename A, bool kBackward, bool kLoss>
inline void ce_row(A* __restrict s, int64_t cs, int64_t nj, int32_t ri, int32_t ci, const int32_t* __restrict rj,
                   const int32_t* __restrict cj, A smooth, A gcoef, A& loss_out, A& hits_out) {
  const A one_minus = A(1) - smooth, s_over = smooth / A(kRel);
  const A g_smooth = gcoef * s_over, g_label = gcoef * one_minus;
  A row_loss = 0, row_hits = 0;
#pragma omp simd reduction(+ : row_loss, row_hits)
  for (int64_t jj = 0; jj < nj; ++jj) {
    const int32_t y = 3 * ((ri > rj[jj]) - (ri < rj[jj]) + 1) + ((ci > cj[jj]) - (ci < cj[jj]) + 1);
    A x[kRel];
#pragma GCC unroll 9
    for (int c = 0; c < kRel; ++c) x[c] = s[c * cs + jj];
    A m = x[0];
    int32_t am = 0;
#pragma GCC unroll 9
    for (int c = 1; c < kRel; ++c) {
      const bool gt = x[c] > m;
      am = gt ? c : am;
      m = gt ? x[c] : m;
    }
    A z = 0, xy = 0, xs = 0;
#pragma GCC unroll 9
    for (int c = 0; c < kRel; ++c) {
      x[c] -= m;
      xy += y == c ? x[c] : A(0);
      xs += x[c];
      x[c] = exp_fast(x[c]);
      z += x[c];
    }
    if (kLoss) {
      // lse - (1-s) x_y - s mean x, all logits shifted by m (the shift cancels)
      row_loss += log_fast(z) - one_minus * xy - s_over * xs;
      row_hits += am == y ? A(1) : A(0);
    }
    if (kBackward) {
      const A rz = gcoef / z;
#pragma GCC unroll 9
      for (int c = 0; c < kRel; ++c) s[c * cs + jj] = x[c] * rz - g_smooth - (y == c ? g_label : A(0));
    }
  }
  loss_out = row_loss;
  hits_out = row_hits;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp_fast and log_fast (above, common.h) on 8 lanes: the same range reduction and polynomials.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(lo, x));  // NaN stays NaN (2nd operand)
  const __m256 big = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), big), big);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
}
inline __m256 log8(__m256 x) {  // x >= 1
  __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(126));
  bits = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000));
  const __m256 m = _mm256_castsi256_ps(bits);
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678118654752f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // the mask is -1 where small
  const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, m));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = _mm256_fmadd_ps(fe, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
  return _mm256_fmadd_ps(fe, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// ce_row for fp32 with AVX2 intrinsics, 8 pairs at a time (gcc keeps the 9-logit arrays of the
// generic loop in memory and runs it at ~the speed of the class-outer loops); tail: generic.
template <bool kBackward, bool kLoss>
inline void ce_row_avx2(float* __restrict s, int64_t cs, int64_t nj, int32_t ri, int32_t ci,
                        const int32_t* __restrict rj, const int32_t* __restrict cj, float smooth, float gcoef,
                        float& loss_out, float& hits_out) {
  const float one_minus = 1.0f - smooth, s_over = smooth / float(kRel);
  const __m256 v_one_minus = _mm256_set1_ps(one_minus), v_s_over = _mm256_set1_ps(s_over);
  const __m256 v_g_smooth = _mm256_set1_ps(gcoef * s_over), v_g_label = _mm256_set1_ps(gcoef * one_minus);
  const __m256 v_gcoef = _mm256_set1_ps(gcoef), v_one = _mm256_set1_ps(1.0f);
  const __m256i v_ri = _mm256_set1_epi32(ri), v_ci = _mm256_set1_epi32(ci), v_four = _mm256_set1_epi32(4);
  __m256 v_loss = _mm256_setzero_ps(), v_hits = _mm256_setzero_ps();
  int64_t jj = 0;
  for (; jj + 8 <= nj; jj += 8) {
    const __m256i vr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rj + jj));
    const __m256i vc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cj + jj));
    // y = 3·(sgn(ri − rj) + 1) + sgn(ci − cj) + 1 = 4 + 3·(gt_r − lt_r) + (gt_c − lt_c); masks are −1
    const __m256i dr = _mm256_sub_epi32(_mm256_cmpgt_epi32(vr, v_ri), _mm256_cmpgt_epi32(v_ri, vr));
    const __m256i dc = _mm256_sub_epi32(_mm256_cmpgt_epi32(vc, v_ci), _mm256_cmpgt_epi32(v_ci, vc));
    const __m256i y = _mm256_add_epi32(v_four, _mm256_add_epi32(_mm256_add_epi32(dr, _mm256_add_epi32(dr, dr)), dc));
    __m256 x[kRel];
    for (int c = 0; c < kRel; ++c) x[c] = _mm256_loadu_ps(s + c * cs + jj);
    __m256 m = x[0];
    __m256 am = _mm256_setzero_ps();  // argmax as float lanes (0..8)
    for (int c = 1; c < kRel; ++c) {
      const __m256 gt = _mm256_cmp_ps(x[c], m, _CMP_GT_OQ);
      am = _mm256_blendv_ps(am, _mm256_set1_ps(float(c)), gt);
      m = _mm256_blendv_ps(m, x[c], gt);
    }
    __m256 z = _mm256_setzero_ps(), xy = _mm256_setzero_ps(), xs = _mm256_setzero_ps();
    for (int c = 0; c < kRel; ++c) {
      x[c] = _mm256_sub_ps(x[c], m);
      const __m256 eq = _mm256_castsi256_ps(_mm256_cmpeq_epi32(y, _mm256_set1_epi32(c)));
      xy = _mm256_add_ps(xy, _mm256_and_ps(eq, x[c]));
      xs = _mm256_add_ps(xs, x[c]);
      x[c] = exp8(x[c]);
      z = _mm256_add_ps(z, x[c]);
    }
    if (kLoss) {
      v_loss = _mm256_add_ps(v_loss, _mm256_fnmadd_ps(v_s_over, xs, _mm256_fnmadd_ps(v_one_minus, xy, log8(z))));
      const __m256 hit = _mm256_cmp_ps(am, _mm256_cvtepi32_ps(y), _CMP_EQ_OQ);
      v_hits = _mm256_add_ps(v_hits, _mm256_and_ps(hit, v_one));
    }
    if (kBackward) {
      const __m256 rz = _mm256_div_ps(v_gcoef, z);
      for (int c = 0; c < kRel; ++c) {
        const __m256 eq = _mm256_castsi256_ps(_mm256_cmpeq_epi32(y, _mm256_set1_epi32(c)));
        const __m256 g = _mm256_sub_ps(_mm256_fmsub_ps(x[c], rz, v_g_smooth), _mm256_and_ps(eq, v_g_label));
        _mm256_storeu_ps(s + c * cs + jj, g);
      }
    }
  }
  alignas(32) float l8[8], h8[8];
  _mm256_store_ps(l8, v_loss);
  _mm256_store_ps(h8, v_hits);
  float row_loss = 0, row_hits = 0;
  for (int t = 0; t < 8; ++t) row_loss += l8[t], row_hits += h8[t];
  float tl = 0, th = 0;
  if (jj < nj) ce_row<float, kBackward, kLoss>(s + jj, cs, nj - jj, ri, ci, rj + jj, cj + jj, smooth, gcoef, tl, th);
  loss_out = row_loss + tl;
  hits_out = row_hits + th;
}
#endif

template <typename A, bool kBackward, bool kLoss>
inline void ce_row_best(A* s, int64_t cs, int64_t nj, int32_t ri, int32_t ci, const int32_t* rj, const int32_t* cj,
                        A smooth, A gcoef, A& loss_out, A& hits_out) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<A, float>) {
    ce_row_avx2<kBackward, kLoss>(s, cs, nj, ri, ci, rj, cj, smooth, gcoef, loss_out, hits_out);
    return;
  }
#endif
  ce_row<A, kBackward, kLoss>(s, cs, nj, ri, ci, rj, cj, smooth, gcoef, loss_out, hits_out);
}

template <typename A>
struct Problem {
  const A* q;
  const A* k;
  const int64_t* pos;
  const float* table;  // regression only
  int64_t B, N, C, dh, W, G;
  A scale, smooth;
};

// One image: loss sum and argmax hits (with_loss), and / or dq_b / dk_b with G scaled by gcoef
// (backward). Both in one pass is the forward that also returns the gradient (no recompute).
template <typename A>
void image_pass(const Problem<A>& P, int64_t b, A* S, int32_t* rj, int32_t* cj, int64_t jt,
                bool backward, bool with_loss, A gcoef, A* dq, A* dk, double& loss_out, double& hits_out) {
  const int64_t N = P.N, C = P.C, dh = P.dh, ld = C * dh;
  const A* qb = P.q + b * N * ld;
  const A* kb = P.k + b * N * ld;
  const int64_t* pb = P.pos + b * N;
  double loss = 0.0, hits = 0.0;
  const bool ce = P.table == nullptr;
  for (int64_t j0 = 0; j0 < N; j0 += jt) {
    const int64_t nj = std::min(jt, N - j0);
    for (int64_t c = 0; c < C; ++c)
      gemm<A>(false, true, N, nj, dh, P.scale, qb + c * dh, ld, kb + j0 * ld + c * dh, ld, A(0), S + c * N * nj, nj);
    for (int64_t jj = 0; jj < nj; ++jj) {
      rj[jj] = static_cast<int32_t>(pb[j0 + jj] / P.W);
      cj[jj] = static_cast<int32_t>(pb[j0 + jj] % P.W);
    }
    for (int64_t i = 0; i < N; ++i) {
      const int64_t pi = pb[i];
      if (ce) {
        const int32_t ri = static_cast<int32_t>(pi / P.W), ci = static_cast<int32_t>(pi % P.W);
        A row_loss = 0, row_hits = 0;
        if (backward && with_loss)
          ce_row_best<A, true, true>(S + i * nj, N * nj, nj, ri, ci, rj, cj, P.smooth, gcoef, row_loss, row_hits);
        else if (backward)
          ce_row_best<A, true, false>(S + i * nj, N * nj, nj, ri, ci, rj, cj, P.smooth, gcoef, row_loss, row_hits);
        else
          ce_row_best<A, false, true>(S + i * nj, N * nj, nj, ri, ci, rj, cj, P.smooth, gcoef, row_loss, row_hits);
        loss += static_cast<double>(row_loss);
        hits += static_cast<double>(row_hits);
      } else {
        A* s = S + i * nj;
        const float* trow = P.table + pi * P.G;
        const int64_t* pj = pb + j0;
        A row_loss = 0;
#pragma omp simd reduction(+ : row_loss)
        for (int64_t jj = 0; jj < nj; ++jj) {
          const A d = s[jj] - static_cast<A>(trow[pj[jj]]);
          row_loss += d * d;
          if (backward) s[jj] = A(2) * gcoef * d;
        }
        loss += static_cast<double>(row_loss);
      }
    }
    if (backward) {
      A* dqb = dq + b * N * ld;
      A* dkb = dk + b * N * ld;
      for (int64_t c = 0; c < C; ++c) {
        const A* G = S + c * N * nj;
        gemm<A>(false, false, N, dh, nj, P.scale, G, nj, kb + j0 * ld + c * dh, ld, j0 > 0 ? A(1) : A(0),
                dqb + c * dh, ld);
        gemm<A>(true, false, nj, dh, N, P.scale, G, nj, qb + c * dh, ld, A(0), dkb + j0 * ld + c * dh, ld);
      }
    }
  }
  loss_out = loss;
  hits_out = hits;
}

template <typename A>
void run(const Problem<A>& P, bool backward, bool with_loss, A gcoef, A* dq, A* dk, double* loss, double* hits) {
  const int64_t N = P.N, C = P.C;
  int64_t jt = N;
  if (C * N * N > kTileElems) jt = std::max<int64_t>(16, (kTileElems / (C * N)) / 16 * 16);
  jt = std::min(jt, N);
  std::vector<double> lp(P.B, 0.0), hp(P.B, 0.0);
  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P.B));
  at::Tensor S_all = at::empty({threads, C * N * jt}, opts);
  at::Tensor idx_all = at::empty({threads, 2 * jt}, at::TensorOptions().dtype(at::kInt));  // rj, cj
  // one task per chunk of images, a scratch block per chunk (chunks = threads)
  parallel_for_ftz(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      A* S = S_all.data_ptr<A>() + t * C * N * jt;
      int32_t* rj = idx_all.data_ptr<int32_t>() + t * 2 * jt;
      const int64_t b0 = t * P.B / threads, b1 = (t + 1) * P.B / threads;
      for (int64_t b = b0; b < b1; ++b)
        image_pass<A>(P, b, S, rj, rj + jt, jt, backward, with_loss, gcoef, dq, dk, lp[b], hp[b]);
    }
  });
  double l = 0, h = 0;
  for (int64_t b = 0; b < P.B; ++b) l += lp[b], h += hp[b];  // fixed order: deterministic
  *loss = l;
  *hits = h;
}

struct Checked {
  int64_t B, N, C, dh;
  at::Tensor pos, table;
};

Checked check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const std::optional<at::Tensor>& table,
              int64_t grid_w, int64_t cells, int64_t classes) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && pos.device().is_cpu(),
              "sslkern.relation_loss: q, k and positions must be CPU tensors");
  TORCH_CHECK(q.dim() == 3 && q.sizes() == k.sizes(), "sslkern.relation_loss: q and k must be (B, N, C*dh) of one shape, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "sslkern.relation_loss: q and k must have one dtype");
  const int64_t B = q.size(0), N = q.size(1);
  TORCH_CHECK(classes == 1 || classes == kRel, "sslkern.relation_loss: classes must be 9 (relations) or 1, got ", classes);
  TORCH_CHECK(q.size(2) % classes == 0 && q.size(2) > 0, "sslkern.relation_loss: q's last dim ", q.size(2),
              " is not a multiple of classes ", classes);
  TORCH_CHECK(B > 0 && N > 0, "sslkern.relation_loss: empty input");
  TORCH_CHECK(N * q.size(2) < (int64_t(1) << 31) && classes * N * N < (int64_t(1) << 40),
              "sslkern.relation_loss: sizes beyond 32-bit BLAS indexing");
  TORCH_CHECK(grid_w > 0 && cells > 0 && cells % grid_w == 0, "sslkern.relation_loss: bad grid (", cells, " cells, width ",
              grid_w, ")");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 2 && pos.size(0) == B && pos.size(1) == N,
              "sslkern.relation_loss: positions must be int64 of shape (", B, ", ", N, ")");
  Checked c{B, N, classes, q.size(2) / classes, pos.contiguous(), at::Tensor()};
  const int64_t* pp = c.pos.data_ptr<int64_t>();
  for (int64_t e = 0; e < B * N; ++e)
    TORCH_CHECK_INDEX(pp[e] >= 0 && pp[e] < cells, "sslkern.relation_loss: positions expected values in [0, ", cells,
                      ") (grid cells), got positions[", e / N, ", ", e % N, "] = ", pp[e]);
  const bool has_table = table.has_value() && table->defined();
  TORCH_CHECK(has_table == (classes == 1), "sslkern.relation_loss: a target table goes with classes = 1 (regression)");
  if (has_table) {
    TORCH_CHECK(table->device().is_cpu() && table->scalar_type() == at::kFloat && table->dim() == 2 &&
                    table->size(0) == cells && table->size(1) == cells,
                "sslkern.relation_loss: table must be fp32 of shape (", cells, ", ", cells, ")");
    c.table = table->contiguous();
  }
  return c;
}

template <typename A>
Problem<A> problem(const Checked& c, const at::Tensor& qa, const at::Tensor& ka, int64_t grid_w, int64_t cells,
                   double scale, double smoothing) {
  return Problem<A>{qa.data_ptr<A>(), ka.data_ptr<A>(), c.pos.data_ptr<int64_t>(),
                    c.table.defined() ? c.table.data_ptr<float>() : nullptr, c.B, c.N, c.C, c.dh, grid_w, cells,
                    static_cast<A>(scale), static_cast<A>(smoothing)};
}

struct Result {
  at::Tensor loss, accuracy, dq, dk;
};

// The pass over every image: loss and accuracy (with_loss), gradients dq, dk of grad · loss
// (backward), or both from one pass.
Result relation_pass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                     const std::optional<at::Tensor>& table, int64_t grid_w, int64_t cells, int64_t classes,
                     double scale, double smoothing, bool backward, bool with_loss, double grad) {
  Checked c = check(q, k, pos, table, grid_w, cells, classes);
  FlushDenormals guard;
  const bool dbl = q.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  at::Tensor qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous();
  const double pairs = static_cast<double>(c.B) * c.N * c.N;
  Result r;
  if (backward) {
    const auto o = q.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous);
    r.dq = empty_output(q.sizes(), o);
    r.dk = empty_output(k.sizes(), o);
  }
  const double g = grad / pairs;
  double l = 0, h = 0;
  if (dbl)
    run<double>(problem<double>(c, qa, ka, grid_w, cells, scale, smoothing), backward, with_loss, g,
                backward ? r.dq.data_ptr<double>() : nullptr, backward ? r.dk.data_ptr<double>() : nullptr, &l, &h);
  else
    run<float>(problem<float>(c, qa, ka, grid_w, cells, scale, smoothing), backward, with_loss, static_cast<float>(g),
               backward ? r.dq.data_ptr<float>() : nullptr, backward ? r.dk.data_ptr<float>() : nullptr, &l, &h);
  if (backward && q.scalar_type() != acc) {
    r.dq = r.dq.to(q.scalar_type());
    r.dk = r.dk.to(k.scalar_type());
  }
  if (with_loss) {
    r.loss = at::empty({}, q.options().dtype(acc));
    r.accuracy = at::empty({}, q.options().dtype(acc));
    r.loss.fill_(l / pairs);
    r.accuracy.fill_(c.table.defined() ? 0.0 : h / pairs);
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> relation_loss_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                     const std::optional<at::Tensor>& table, int64_t grid_w,
                                                     int64_t cells, int64_t classes, double scale, double smoothing) {
  Result r = relation_pass(q, k, pos, table, grid_w, cells, classes, scale, smoothing, false, true, 0.0);
  return {r.loss, r.accuracy};
}

std::tuple<at::Tensor, at::Tensor> relation_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                              const at::Tensor& k, const at::Tensor& pos,
                                                              const std::optional<at::Tensor>& table, int64_t grid_w,
                                                              int64_t cells, int64_t classes, double scale,
                                                              double smoothing) {
  TORCH_CHECK(grad.numel() == 1 && grad.device().is_cpu(), "sslkern.relation_loss: grad must be a CPU scalar");
  Result r = relation_pass(q, k, pos, table, grid_w, cells, classes, scale, smoothing, true, false,
                           grad.to(at::kDouble).item<double>());
  return {r.dq, r.dk};
}

// Forward that also returns d loss / dq, d loss / dk (for grad = 1) from the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relation_loss_with_grad_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const std::optional<at::Tensor>& table,
    int64_t grid_w, int64_t cells, int64_t classes, double scale, double smoothing) {
  Result r = relation_pass(q, k, pos, table, grid_w, cells, classes, scale, smoothing, true, true, 1.0);
  return {r.loss, r.accuracy, r.dq, r.dk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("relation_loss_cpu(Tensor q, Tensor k, Tensor pos, Tensor? table, int grid_w, int cells, int classes, "
        "float scale, float smoothing) -> (Tensor, Tensor)",
        &relation_loss_cpu);
  m.def("relation_loss_backward_cpu(Tensor grad, Tensor q, Tensor k, Tensor pos, Tensor? table, int grid_w, int cells, "
        "int classes, float scale, float smoothing) -> (Tensor, Tensor)",
        &relation_loss_backward_cpu);
  m.def("relation_loss_with_grad_cpu(Tensor q, Tensor k, Tensor pos, Tensor? table, int grid_w, int cells, "
        "int classes, float scale, float smoothing) -> (Tensor, Tensor, Tensor, Tensor)",
        &relation_loss_with_grad_cpu);
}

}  // namespace sslkern
