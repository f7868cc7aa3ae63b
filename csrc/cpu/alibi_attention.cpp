// alibi_attention — memory-efficient attention with an in-kernel ALiBi bias, C++ CPU kernel.
//
//   out = softmax(scale·q·kᵀ + bias)·v,   bias[i, j] = −slope[b, h] · dist(x_i, x_j)
//
// dist is Manhattan (1D positions and 2D grids) or Euclidean over the (row, col) coordinates
// of the patch tokens; the first P (prefix, CLS) tokens get zero bias to and from everything.
// Nothing of size L×L is allocated: each task holds one (query tile × key tile) score block.
//
// Forward: parallel over (b, h, query tile); key tiles are folded in with the online softmax
// (running max m and sum l per row; on a new max the accumulated row is rescaled by
// exp(m_old − m_new)). The tile products run on BLAS (csrc/blas.h). It returns the
// output and the row log-sum-exp (lse = m + log l) for the backward.
// Backward (FlashAttention-2 recomputation): parallel over (b, h); for every tile pair
// P = exp(scale·S + bias − lse), dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)),
// dQ += scale·dS·K, dK += scale·dSᵀ·Q and d slope += Σ dS ∘ (−dist).
// fp16 / bf16 inputs are converted to fp32 copies once at entry (ATen's vectorised casts; a copy
// per tile was slower, docs/ops/alibi_attention.md) and the outputs rounded once at the end;
// fp64 runs in fp64.
// Both run with flush-to-zero / denormals-are-zero (FlushDenormals, csrc/common.h; the
// caller's modes restored after): probabilities near exp(-87) times dO, and the online
// rescale factors, are subnormal for sharp rows (large q·k) and would cost an assist each.
// No FP exception traps are read here: without -fno-trapping-math gcc will not if-convert
// the float compares of exp_fast's clamps and selects on AVX2, and the exp loops stay scalar
// (slower, and data-dependent, since branches then skip underflowing exps; docs/ops/dino_loss.md).
// AVX-512 vectorizes them either way (masked lanes). Results unchanged.
// Set for this file only, before any include, so every function here has the same options.
#pragma GCC optimize("no-trapping-math")
#include "blas.h"
#include "common.h"

#include <algorithm>
#include <bit>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace sslkern {
namespace {

constexpr int64_t kFwdBQ = 64, kFwdBK = 256;
constexpr int64_t kBwdBQ = 128, kBwdBK = 128;

}  // namespace
}  // namespace sslkern

namespace sslkern {
namespace {

// Row kernels of the softmax. The reductions are `omp simd` reductions, and explicit
// 16-lane accumulators with AVX-512 (a sequential float max / sum is not reassociated
// without -ffast-math). Rows are padded to whole 16-lane vectors (pad_lanes), so rows as
// short as 40 keys run without scalar tails.
constexpr int64_t kLanes = 16;

// row[j] = scale·row[j] − slope·dist[j]; returns max(m0, max_j row[j]).
template <typename acc_t>
acc_t scores_and_max(acc_t* __restrict row, const acc_t* __restrict dist, int64_t n, acc_t scale, acc_t slope,
                     acc_t m0) {
  acc_t mx = m0;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t x = scale * row[j] - slope * dist[j];
    row[j] = x;
    mx = mx > x ? mx : x;
  }
  return mx;
}

// row[j] = exp(row[j] − shift); returns Σ_j row[j].
// (n is a multiple of kLanes: rows are padded, see pad_lanes)
template <typename acc_t>
acc_t exp_and_sum(acc_t* __restrict row, int64_t n, acc_t shift) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 sh = _mm512_set1_ps(shift);
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), sh));
      _mm512_storeu_ps(row + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = exp_fast(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  return sum;
}

// Backward row: p[j] = exp(scale·s[j] − slope·dist[j] − lse) (in s), dS = p·(dP − Δ) (in dp);
// returns Σ_j dS[j]·dist[j].
template <typename acc_t>
acc_t probs_and_dscores(acc_t* __restrict s, acc_t* __restrict dp, const acc_t* __restrict dist, int64_t n,
                        acc_t scale, acc_t slope, acc_t lse, acc_t delta) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {  // n is a multiple of 16 (padded rows)
    __m512 acc = _mm512_setzero_ps();
    const __m512 vs = _mm512_set1_ps(scale), vsl = _mm512_set1_ps(slope), vl = _mm512_set1_ps(lse),
                 vd = _mm512_set1_ps(delta);
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 d = _mm512_loadu_ps(dist + j);
      const __m512 x = _mm512_sub_ps(_mm512_fnmadd_ps(vsl, d, _mm512_mul_ps(vs, _mm512_loadu_ps(s + j))), vl);
      const __m512 p = exp16(x);
      _mm512_storeu_ps(s + j, p);
      const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd));
      _mm512_storeu_ps(dp + j, ds);
      acc = _mm512_fmadd_ps(ds, d, acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t p = exp_fast(scale * s[j] - slope * dist[j] - lse);
    s[j] = p;
    const acc_t ds = p * (dp[j] - delta);
    dp[j] = ds;
    acc += ds * dist[j];
  }
  return acc;
}

template <typename T> inline double load_d(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) return p[i]; else return static_cast<double>(load_f(p, i));
}

// A (b, h) slice of an (B, H, L, Dh) tensor with unit stride on Dh, seen in the compute
// type acc_t: the memory itself when T == acc_t, else an fp32 copy of rows [r0, r0 + n).
template <typename T, typename acc_t>
struct Rows {
  const acc_t* ptr;
  int64_t ld;
  std::vector<acc_t> buf;
  Rows(const at::Tensor& t, int64_t b, int64_t h, int64_t r0, int64_t n) {
    const T* base = sslkern::ptr<T>(t) + b * t.stride(0) + h * t.stride(1) + r0 * t.stride(2);
    const int64_t d = t.size(3);
    if constexpr (std::is_same_v<T, acc_t>) {
      ptr = base;
      ld = t.stride(2);
    } else {
      buf.resize(n * d);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < d; ++c) buf[r * d + c] = static_cast<acc_t>(load_f(base, r * t.stride(2) + c));
      ptr = buf.data();
      ld = d;
    }
  }
};

#if defined(__AVX512F__)
// dst (nc × nr, row stride ldd) = transpose of src (nr × nc, row stride lds), nr, nc <= 16,
// in registers: 32-bit and 64-bit unpacks give, per 128-bit lane k, column 4k + c of four
// rows; two rounds of 128-bit lane shuffles gather the four row groups of each column.
// Masked loads and stores handle partial blocks without touching memory outside them.
inline void transpose_block16(const float* src, int64_t lds, int64_t nr, int64_t nc, float* dst, int64_t ldd) {
  const __mmask16 cmask = nc >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nc) - 1);
  const __mmask16 rmask = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_ps(cmask, src + i * lds) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto pd = [](__m512 x) { return _mm512_castps_pd(x); };
  __m512 u[4][4];  // u[g][c]: lane k = column 4k + c of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    const int i = 4 * g;
    u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
    u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
    u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
    u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x44), v1 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x44), v3 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xEE);
    const __m512 out[4] = {_mm512_shuffle_f32x4(v0, v2, 0x88), _mm512_shuffle_f32x4(v0, v2, 0xDD),
                           _mm512_shuffle_f32x4(v1, v3, 0x88), _mm512_shuffle_f32x4(v1, v3, 0xDD)};
    for (int k = 0; k < 4; ++k) {
      const int64_t j = 4 * k + c;
      if (j < nc) _mm512_mask_storeu_ps(dst + j * ldd, rmask, out[k]);
    }
  }
}
#endif

// dst[c, r] = src[r, c] for an (n × d) block with row stride ld: MKL's gemm is much faster
// on N·N products than with a transposed operand at these sizes, so K and V go in as Kᵀ, Vᵀ.
// 16 × 16 blocks (in registers with AVX-512 for fp32).
template <typename acc_t>
inline void transpose_into(std::vector<acc_t>& dst, const acc_t* __restrict src, int64_t n, int64_t d, int64_t ld) {
  dst.resize(n * d);
  acc_t* __restrict out = dst.data();
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < n; r0 += kB) {
    const int64_t r1 = std::min(n, r0 + kB);
    for (int64_t c0 = 0; c0 < d; c0 += kB) {
      const int64_t c1 = std::min(d, c0 + kB);
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<acc_t, float>) {
        transpose_block16(src + r0 * ld + c0, ld, r1 - r0, c1 - c0, out + c0 * n + r0, n);
        continue;
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * n + r] = src[r * ld + c];
    }
  }
}

// Sequences at least this long copy Kᵀ (and Vᵀ) once per (b, h) for N·N tile products;
// shorter ones hand BLAS the transposed operand (the copy costs more than it saves there:
// measured at L = 40 and 197, Dh = 64).
constexpr int64_t kTransposeMinLen = 64;

template <typename T, typename acc_t>
inline void store_row(T* dst, const acc_t* src, int64_t n, acc_t mul) {
  for (int64_t c = 0; c < n; ++c) {
    if constexpr (std::is_same_v<T, double>) dst[c] = src[c] * mul;
    else store_f(dst, c, static_cast<float>(src[c] * mul));
  }
}

// Row lengths are padded to whole vectors: the padded scores are set to −inf (so their
// exponentials are 0) and their distances to 0, and the row loops run without remainders
// (short rows, e.g. 40 kept tokens, otherwise spend much of their time in scalar tails).
inline int64_t pad_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

template <typename acc_t>
inline void mask_padding(acc_t* row, int64_t n, int64_t n_pad) {
  for (int64_t j = n; j < n_pad; ++j) row[j] = -std::numeric_limits<acc_t>::infinity();
}

// Per-token coordinates of one batch row over all L tokens; weight 0 marks prefix tokens
// (zero bias to and from them).
template <typename acc_t>
struct Geometry {
  std::vector<acc_t> r, c, w;  // padded to a multiple of kLanes tokens with weight 0
  Geometry(const at::Tensor& coords, int64_t b, int64_t L, int64_t P)
      : r(pad_lanes(L), 0), c(pad_lanes(L), 0), w(pad_lanes(L), 0) {
    const float* cb = coords.data_ptr<float>() + b * coords.stride(0);
    for (int64_t j = P; j < L; ++j) {
      r[j] = cb[(j - P) * coords.stride(1)];
      c[j] = cb[(j - P) * coords.stride(1) + coords.stride(2)];
      w[j] = 1;
    }
  }
};

// dist row: out[j] = w_i·w_j·dist(x_i, x_j) for j in [j0, j0 + n).
template <typename acc_t>
inline void dist_row(const Geometry<acc_t>& g, int64_t i, int64_t j0, int64_t n, int64_t mode, acc_t* out) {
  const acc_t ri = g.r[i], ci = g.c[i], wi = g.w[i];
  const acc_t* r = g.r.data() + j0;
  const acc_t* c = g.c.data() + j0;
  const acc_t* w = g.w.data() + j0;
  if (mode == 0 || wi == 0) {
    for (int64_t j = 0; j < n; ++j) out[j] = 0;
  } else if (mode == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (std::abs(ri - r[j]) + std::abs(ci - c[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t dr = ri - r[j], dc = ci - c[j];
      out[j] = w[j] * std::sqrt(dr * dr + dc * dc);
    }
  }
}

void check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& slopes, const at::Tensor& coords, int64_t P, int64_t mode) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, L, Dh), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q, k, v must have equal shapes, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have one dtype");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && (t->size(3) <= 1 || t->stride(3) == 1), op,
                ": q, k, v must be CPU tensors with unit stride on the last dim");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  TORCH_CHECK(P >= 0 && P <= L, op, ": num_prefix_tokens must be in [0, L], got ", P);
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (none), 1 (manhattan) or 2 (euclidean), got ", mode);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(slopes.scalar_type() == acc && slopes.dim() == 2 && slopes.size(0) == B && slopes.size(1) == H &&
                  slopes.is_contiguous(),
              op, ": slopes must be a contiguous (B, H) = (", B, ", ", H, ") ", acc, " tensor, got ", slopes.sizes(),
              " ", slopes.scalar_type());
  TORCH_CHECK(coords.scalar_type() == at::kFloat && coords.dim() == 3 && coords.size(0) == B &&
                  coords.size(1) == L - P && coords.size(2) == 2,
              op, ": coords must be a (B, L - P, 2) = (", B, ", ", L - P, ", 2) float32 tensor, got ", coords.sizes(),
              " ", coords.scalar_type());
}

template <typename T, typename acc_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes,
                  const at::Tensor& coords, int64_t P, int64_t mode, acc_t scale, at::Tensor& out, at::Tensor& lse) {
  FlushDenormals ftz;  // serial parts on this thread; every parallel task holds its own
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t n_qt = (L + kFwdBQ - 1) / kFwdBQ;
  const acc_t* slope_p = slopes.data_ptr<acc_t>();
  const bool kt_copy = L >= kTransposeMinLen;
  parallel_for_ftz(0, B * H * n_qt, 1, [&](int64_t lo, int64_t hi) {
    // fp32 / fp64 accumulate straight into the output rows (rescaled in place); half types
    // accumulate in an fp32 buffer
    constexpr bool kDirect = std::is_same_v<T, acc_t>;
    std::vector<acc_t> S(kFwdBQ * kFwdBK), O(kDirect ? 0 : kFwdBQ * D), m(kFwdBQ), l(kFwdBQ), dist(kFwdBK), KT;
    int64_t geom_b = -1, kt_bh = -1;
    std::unique_ptr<Geometry<acc_t>> g;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t qt = task % n_qt, bh = task / n_qt, b = bh / H, h = bh % H;
      if (b != geom_b) { g = std::make_unique<Geometry<acc_t>>(coords, b, L, P); geom_b = b; }
      const acc_t slope = slope_p[b * H + h];
      const int64_t q0 = qt * kFwdBQ, nq = std::min(kFwdBQ, L - q0);
      Rows<T, acc_t> Q(q, b, h, q0, nq), V(v, b, h, 0, L);
      Rows<T, acc_t> K(k, b, h, 0, L);
      if (kt_copy && bh != kt_bh) {  // Kᵀ (D × L) of this (b, h), shared by its query tiles
        transpose_into(KT, K.ptr, L, D, K.ld);
        kt_bh = bh;
      }
      T* out_tile = ptr<T>(out) + (bh * L + q0) * D;
      acc_t* Op;
      if constexpr (kDirect) Op = out_tile; else Op = O.data();
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t k0 = 0; k0 < L; k0 += kFwdBK) {
        const int64_t nk = std::min(kFwdBK, L - k0);
        if (kt_copy) gemm<acc_t>(false, false, nq, nk, D, 1, Q.ptr, Q.ld, KT.data() + k0, L, 0, S.data(), kFwdBK);
        else gemm<acc_t>(false, true, nq, nk, D, 1, Q.ptr, Q.ld, K.ptr + k0 * K.ld, K.ld, 0, S.data(), kFwdBK);
        const int64_t nk_pad = pad_lanes(nk);  // <= kFwdBK, and k0 + nk_pad <= the padded geometry
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = S.data() + i * kFwdBK;
          mask_padding(row, nk, nk_pad);
          dist_row(*g, q0 + i, k0, nk_pad, mode, dist.data());
          const acc_t mx = scores_and_max(row, dist.data(), nk_pad, scale, slope, m[i]);
          const acc_t alpha = std::exp(m[i] - mx);  // 0 on the first tile (m = −inf)
          const acc_t sum = exp_and_sum(row, nk_pad, mx);
          l[i] = l[i] * alpha + sum;
          m[i] = mx;
          if (k0 > 0 && alpha != acc_t(1))  // nothing accumulated before the first tile
            for (int64_t c = 0; c < D; ++c) Op[i * D + c] *= alpha;
        }
        gemm<acc_t>(false, false, nq, D, nk, 1, S.data(), kFwdBK, V.ptr + k0 * V.ld, V.ld, k0 == 0 ? 0 : 1, Op, D);
      }
      acc_t* lse_p = lse.data_ptr<acc_t>() + bh * L + q0;
      for (int64_t i = 0; i < nq; ++i) {
        if constexpr (kDirect) {
          const acc_t inv = acc_t(1) / l[i];
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) Op[i * D + c] *= inv;
        } else {
          store_row(out_tile + i * D, O.data() + i * D, D, acc_t(1) / l[i]);
        }
        lse_p[i] = m[i] + std::log(l[i]);
      }
    }
  });
}

inline bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor> alibi_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& slopes, const at::Tensor& coords, int64_t P,
                                                       int64_t mode, double scale) {
  check_args("alibi_attention", q, k, v, slopes, coords, P, mode);
  if (is_half(q.scalar_type())) {  // one vectorised fp32 copy of each input, not one per tile
    auto [o, l] = alibi_attention_cpu(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), slopes, coords, P, mode,
                                      scale);
    return {o.to(q.scalar_type()), l};
  }
  auto out = empty_output(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(slopes.scalar_type()));
  if (q.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity())};
  dispatch_float(q.scalar_type(), "alibi_attention: q", [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>) forward_impl<T, double>(q, k, v, slopes, coords, P, mode, scale, out, lse);
    else forward_impl<T, float>(q, k, v, slopes, coords, P, mode, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

template <typename T, typename acc_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes, const at::Tensor& coords,
                   int64_t P, int64_t mode, acc_t scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   at::Tensor& dslopes) {
  FlushDenormals ftz;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const acc_t* slope_p = slopes.data_ptr<acc_t>();
  const bool kt_copy = L >= kTransposeMinLen;
  T* dq_p = ptr<T>(dq);
  T* dk_p = ptr<T>(dk);
  T* dv_p = ptr<T>(dv);
  acc_t* dslopes_p = dslopes.data_ptr<acc_t>();
  const T* out_p = ptr<T>(out);
  const acc_t* lse_all = lse.data_ptr<acc_t>();
  parallel_for_ftz(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> S(kBwdBQ * kBwdBK), dP(kBwdBQ * kBwdBK), dist(kBwdBQ * kBwdBK);
    constexpr bool kDirect = std::is_same_v<T, acc_t>;
    std::vector<acc_t> dQ(kDirect ? 0 : L * D), dK(kDirect ? 0 : L * D), dV(kDirect ? 0 : L * D), Drow(L), KT, VT;
    int64_t geom_b = -1;
    std::unique_ptr<Geometry<acc_t>> geom;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      if (b != geom_b) { geom = std::make_unique<Geometry<acc_t>>(coords, b, L, P); geom_b = b; }
      const Geometry<acc_t>& g = *geom;
      const acc_t slope = slope_p[b * H + h];
      Rows<T, acc_t> Q(q, b, h, 0, L), K(k, b, h, 0, L), V(v, b, h, 0, L), dO(dout, b, h, 0, L);
      if (kt_copy) {
        transpose_into(KT, K.ptr, L, D, K.ld);
        transpose_into(VT, V.ptr, L, D, V.ld);
      }
      const acc_t* lse_p = lse_all + bh * L;
      {
        const T* o = out_p + bh * L * D;  // out is contiguous (made by the forward)
        for (int64_t i = 0; i < L; ++i) {
          const acc_t* __restrict g = dO.ptr + i * dO.ld;
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < D; ++c) s += g[c] * static_cast<acc_t>(load_d(o, i * D + c));
          Drow[i] = s;
        }
      }
      // fp32 / fp64: the products accumulate straight into the outputs (beta = 0 on a tile's
      // first contribution); half types accumulate in fp32 buffers, converted at the end
      acc_t *dQp, *dKp, *dVp;
      if constexpr (kDirect) {
        dQp = dq_p + bh * L * D;
        dKp = dk_p + bh * L * D;
        dVp = dv_p + bh * L * D;
      } else {
        dQp = dQ.data();
        dKp = dK.data();
        dVp = dV.data();
      }
      acc_t dslope = 0;
      for (int64_t q0 = 0; q0 < L; q0 += kBwdBQ) {
        const int64_t nq = std::min(kBwdBQ, L - q0);
        for (int64_t k0 = 0; k0 < L; k0 += kBwdBK) {
          const int64_t nk = std::min(kBwdBK, L - k0);
          if (kt_copy) {
            gemm<acc_t>(false, false, nq, nk, D, 1, Q.ptr + q0 * Q.ld, Q.ld, KT.data() + k0, L, 0, S.data(), kBwdBK);
            gemm<acc_t>(false, false, nq, nk, D, 1, dO.ptr + q0 * dO.ld, dO.ld, VT.data() + k0, L, 0, dP.data(), kBwdBK);
          } else {
            gemm<acc_t>(false, true, nq, nk, D, 1, Q.ptr + q0 * Q.ld, Q.ld, K.ptr + k0 * K.ld, K.ld, 0, S.data(), kBwdBK);
            gemm<acc_t>(false, true, nq, nk, D, 1, dO.ptr + q0 * dO.ld, dO.ld, V.ptr + k0 * V.ld, V.ld, 0, dP.data(),
                      kBwdBK);
          }
          // padded columns: S = −inf gives P = 0, so dS = 0 there (dP's padding stays finite:
          // zero-initialized, then only ever written as 0 · finite)
          const int64_t nk_pad = pad_lanes(nk);
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* s = S.data() + i * kBwdBK;
            acc_t* dp = dP.data() + i * kBwdBK;
            acc_t* dr = dist.data() + i * kBwdBK;
            mask_padding(s, nk, nk_pad);
            dist_row(g, q0 + i, k0, nk_pad, mode, dr);
            const acc_t li = lse_p[q0 + i], Di = Drow[q0 + i];
            dslope -= probs_and_dscores(s, dp, dr, nk_pad, scale, slope, li, Di);
          }
          // dV[k] += Pᵀ·dO[q]; dQ[q] += scale·dS·K[k]; dK[k] += scale·dSᵀ·Q[q]
          const acc_t beta_kv = q0 == 0 ? 0 : 1, beta_q = k0 == 0 ? 0 : 1;
          gemm<acc_t>(true, false, nk, D, nq, 1, S.data(), kBwdBK, dO.ptr + q0 * dO.ld, dO.ld, beta_kv, dVp + k0 * D, D);
          gemm<acc_t>(false, false, nq, D, nk, scale, dP.data(), kBwdBK, K.ptr + k0 * K.ld, K.ld, beta_q, dQp + q0 * D,
                    D);
          gemm<acc_t>(true, false, nk, D, nq, scale, dP.data(), kBwdBK, Q.ptr + q0 * Q.ld, Q.ld, beta_kv, dKp + k0 * D,
                    D);
        }
      }
      if constexpr (!kDirect) {
        for (int64_t i = 0; i < L; ++i) {
          store_row(dq_p + (bh * L + i) * D, dQ.data() + i * D, D, acc_t(1));
          store_row(dk_p + (bh * L + i) * D, dK.data() + i * D, D, acc_t(1));
          store_row(dv_p + (bh * L + i) * D, dV.data() + i * D, D, acc_t(1));
        }
      }
      dslopes_p[bh] = dslope;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alibi_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& slopes, const at::Tensor& coords, int64_t P, int64_t mode, double scale) {
  check_args("alibi_attention_backward", q, k, v, slopes, coords, P, mode);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  (dout.size(3) <= 1 || dout.stride(3) == 1),
              "alibi_attention_backward: dout must match q with unit stride on the last dim");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "alibi_attention_backward: out must be a contiguous tensor like q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.is_contiguous() && lse.scalar_type() == slopes.scalar_type(),
              "alibi_attention_backward: lse must be a contiguous (B, H, L) tensor of the slopes' dtype");
  if (is_half(q.scalar_type())) {
    const auto f = at::kFloat;
    auto [gq, gk, gv, gs] = alibi_attention_backward_cpu(dout.to(f), q.to(f), k.to(f), v.to(f), out.to(f), lse, slopes,
                                                         coords, P, mode, scale);
    const auto t = q.scalar_type();
    return {gq.to(t), gk.to(t), gv.to(t), gs};
  }
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto dq = empty_output(q.sizes(), opts), dk = empty_output(q.sizes(), opts), dv = empty_output(q.sizes(), opts);
  auto dslopes = at::zeros({q.size(0), q.size(1)}, slopes.options());
  if (q.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dslopes};
  dispatch_float(q.scalar_type(), "alibi_attention_backward: q", [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>)
      backward_impl<T, double>(dout, q, k, v, out, lse, slopes, coords, P, mode, scale, dq, dk, dv, dslopes);
    else
      backward_impl<T, float>(dout, q, k, v, out, lse, slopes, coords, P, mode, static_cast<float>(scale), dq, dk,
                              dv, dslopes);
  });
  return {dq, dk, dv, dslopes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("alibi_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor coords, int num_prefix_tokens, "
        "int mode, float scale) -> (Tensor, Tensor)",
        &alibi_attention_cpu);
  m.def("alibi_attention_backward_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor slopes, Tensor coords, int num_prefix_tokens, int mode, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &alibi_attention_backward_cpu);
}

}  // namespace sslkern
