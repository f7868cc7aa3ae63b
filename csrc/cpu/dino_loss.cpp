// dino_loss — sharpened-softmax cross-entropy over multi-crop (teacher, student) pairs,
// C++ CPU kernel. Serves the DINO loss (V student crops, T teacher crops, same-view pairs
// skipped) and the iBOT patch loss (V = T = 1, one weight per token row).
//
// For image b, student crop v and teacher crop q (a pair unless skip_same_view && q == v):
//   p_q = softmax((t_q - c) / tt)  (or t_q itself when the teacher is given as probabilities)
//   ce(q, v) = -sum_k p_q[k] log_softmax(s_v / ts)[k] = logZ_v - sum_k p_q[k] (s_v[k] - m_v) / ts
// with m_v = max_k s_v[k] and logZ_v = log sum_k exp((s_v[k] - m_v) / ts); taking the dot
// relative to the row max keeps the loss accurate for logits of +-1e4. Then
//   loss      = scale * sum_b w_b sum_v sum_{q paired with v} ce(q, v)
//   d loss/ds_v = scale * w_b / ts * (n_v softmax(s_v / ts) - sum_{q paired with v} p_q)
// No probability tensor is materialized: phase 1 computes per-row statistics (max and log
// normalizer, parallel over rows); phase 2 walks column chunks of C prototypes (parallel
// over chunks), rebuilding the T teacher probabilities of one image in a T x C scratch,
// accumulating the dots and writing the gradient. Scratch per task is O(T*C) with C <= 4096,
// so K of 131072 or more costs no full-row buffer. The raw teacher column sum (for the
// center update) is accumulated in the same pass.
//
// Subnormals: the kernel runs with flush-to-zero / denormals-are-zero (FlushDenormals in
// csrc/common.h, the caller's modes restored after): at DINO's teacher temperature the
// teacher probabilities and the gradient fall below 1.2e-38 on most columns, and each such
// value would cost a microcode assist (docs/ops/dino_loss.md, *Subnormals*).
//
// NaN: a NaN in a student row makes that row's loss term and gradient NaN; a NaN in a
// teacher row makes the p of that row NaN, hence the loss and the gradient of every student
// row paired with it — exactly where the eager reference has NaN.
// No FP exception traps are read here: without -fno-trapping-math gcc will not if-convert
// the float compares of exp_fast's clamps and selects on AVX2, and the exp loops stay scalar
// (slower, and data-dependent, since branches then skip underflowing exps; docs/ops/dino_loss.md).
// AVX-512 vectorizes them either way (masked lanes). Results unchanged.
// Set for this file only, before any include, so every function here has the same options.
#pragma GCC optimize("no-trapping-math")
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sslkern {
namespace {


template <typename T, typename A> inline A load_a(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<A>(p[i]);
  } else {
    return static_cast<A>(load_f(p, i));
  }
}
template <typename T, typename A> inline void store_a(T* p, int64_t i, A v) {
  if constexpr (std::is_same_v<T, double>) {
    p[i] = static_cast<double>(v);
  } else {
    store_f(p, i, static_cast<float>(v));
  }
}

// The inner loops, as functions of restrict pointers and scalars so they vectorize.
template <typename TT, typename A>
void teacher_probs_chunk(const TT* __restrict x, const A* __restrict c, A* __restrict p, int64_t n, A m, A inv, A lz) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) p[k] = exp_fast((load_a<TT, A>(x, k) - c[k] - m) * inv - lz);
}

template <typename TS, typename A>
void student_grad_chunk(const TS* __restrict x, const A* __restrict e, TS* __restrict g, int64_t n, A m, A inv, A lz,
                        A gs, A nv) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const A sm = exp_fast((load_a<TS, A>(x, k) - m) * inv - lz);
    store_a<TS, A>(g, k, gs * (nv * sm - e[k]));
  }
}

// z = sum_k exp((x_k - c_k - m) * inv) (c_k = 0 without a center), each term also stored
// in e: the full-row path keeps the exponentials instead of computing them twice.
template <typename T, typename A, bool kCenter>
A exp_sum_store(const T* __restrict x, const A* __restrict c, A* __restrict e, int64_t n, A m, A inv) {
  A z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t k = 0; k < n; ++k) {
    const A y = exp_fast(((kCenter ? load_a<T, A>(x, k) - c[k] : load_a<T, A>(x, k)) - m) * inv);
    e[k] = y;
    z += y;
  }
  return z;
}

// The gradient from stored exponentials e = exp((x - m) / ts), in place:
// g = gs * (nv * e / Z - pex).
template <typename A>
void student_grad_from_exp(A* __restrict g, const A* __restrict pex, int64_t n, A inv_z, A gs, A nv) {
  const A a = gs * nv * inv_z;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) g[k] = a * g[k] - gs * pex[k];
}

// The same for a half-precision student: the exponentials sit in a float scratch row e and
// the gradient is rounded once, on the store.
template <typename TS, typename A>
void student_grad_from_scratch(TS* __restrict g, const A* __restrict e, const A* __restrict pex, int64_t n, A inv_z,
                               A gs, A nv) {
  const A a = gs * nv * inv_z;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) store_a<TS, A>(g, k, a * e[k] - gs * pex[k]);
}

// Images whose V + T rows hold at most this many elements (256 KiB of fp32) take the
// full-row path whatever the batch; larger rows take it while the T teacher rows of an image
// (kept as probabilities) stay within kFullRowTeacherElems and the batch feeds every thread.
constexpr int64_t kRowMajorElems = 1 << 16;
constexpr int64_t kFullRowTeacherElems = 1 << 18;

struct Config {
  int64_t B, K, V, T;
  bool skip, probs, grad, colsum;
  double scale, ts, tt;
};

// Max of a row (raw values) and whether it holds a NaN.
template <typename T, typename A>
inline A row_max(const T* x, const A* center, A inv, int64_t K, bool& has_nan) {
  A m = -std::numeric_limits<A>::infinity();
  int nan_count = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan_count)
  for (int64_t k = 0; k < K; ++k) {
    const A y = center ? (load_a<T, A>(x, k) - center[k]) * inv : load_a<T, A>(x, k);
    m = std::max(m, y);
    nan_count += (y != y);
  }
  has_nan = nan_count != 0;
  return m;
}

template <typename TS, typename TT, typename A>
void dino_loss_kernel(const Config& cfg, const TS* s, const TT* t, const A* center, const A* weights, A* loss_out,
                      TS* grad, A* colsum_out) {
  FlushDenormals ftz;  // this thread's serial parts; each parallel task holds its own
  const int64_t B = cfg.B, K = cfg.K, V = cfg.V, T = cfg.T;
  const A inv_ts = static_cast<A>(1.0 / cfg.ts);
  const A inv_tt = static_cast<A>(1.0 / cfg.tt);
  const A nan = std::numeric_limits<A>::quiet_NaN();

  // Row statistics: the max of the raw (centered, for the teacher) logits and the log
  // normalizer of the scaled ones, p = exp((x - c - m) / temp - logZ). Subtracting m before
  // scaling keeps p exact for logits of 1e4 at tt = 0.01 (where x/tt = 1e6 has no digits left).
  // Rows are numbered students first (v * B + b), then teachers (V * B + q * B + b).
  std::vector<A> s_max(V * B), s_logz(V * B), t_max(cfg.probs ? 0 : T * B), t_logz(cfg.probs ? 0 : T * B);
  auto row_stats = [&, inv_ts, inv_tt](int64_t r) {
    bool has_nan = false;
    if (r < V * B) {
      const TS* x = s + r * K;
      const A m = row_max<TS, A>(x, nullptr, A(1), K, has_nan);
      A z = 0;
#pragma omp simd reduction(+ : z)
      for (int64_t k = 0; k < K; ++k) z += exp_fast((load_a<TS, A>(x, k) - m) * inv_ts);
      s_max[r] = has_nan ? nan : m;
      s_logz[r] = has_nan ? nan : std::log(z);
    } else {
      const int64_t rt = r - V * B;
      const TT* x = t + rt * K;
      const A m = row_max<TT, A>(x, center, A(1), K, has_nan);
      A z = 0;
#pragma omp simd reduction(+ : z)
      for (int64_t k = 0; k < K; ++k) z += exp_fast((load_a<TT, A>(x, k) - center[k] - m) * inv_tt);
      t_max[rt] = has_nan ? nan : m;
      t_logz[rt] = has_nan ? nan : std::log(z);
    }
  };

  // Image b on columns [k0, k0 + n): rebuild its teacher probabilities in pq (T x n), add
  // its raw teacher logits to colsum, return its loss terms and write its gradient.
  // Scalars are captured by value: read through a reference, the compiler would have to
  // assume every float store may change them and keeps the loops scalar.
  // full_row (k0 = 0, n = K): the row statistics are computed here, while the row is in
  // cache, and the exponentials are stored (teacher: in pq; fp32/fp64 student: in its
  // gradient row; fp16/bf16 student: in the float scratch row es) rather than computed a
  // second time.
  constexpr bool kExpInGrad = std::is_same_v<TS, A>;
  auto image_chunk = [&, inv_ts, inv_tt](int64_t b, int64_t k0, int64_t n, int64_t ld, A* pq, A* pex,
                                         A* colsum, bool full_row, A* es) -> double {
    for (int64_t q = 0; q < T; ++q) {
      const TT* x = t + (q * B + b) * K + k0;
      A* p = pq + q * ld;
      if (cfg.probs) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) p[k] = load_a<TT, A>(x, k);
      } else if (full_row) {
        bool has_nan = false;
        const A m = row_max<TT, A>(x, center, A(1), K, has_nan);
        const A z = exp_sum_store<TT, A, true>(x, center, p, K, m, inv_tt);
        const A inv_z = has_nan ? nan : A(1) / z;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) p[k] *= inv_z;
      } else {
        teacher_probs_chunk<TT, A>(x, center + k0, p, n, t_max[q * B + b], inv_tt, t_logz[q * B + b]);
      }
      if (colsum) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) colsum[k] += load_a<TT, A>(x, k);
      }
    }
    const A w = static_cast<A>(cfg.scale) * (weights ? weights[b] : A(1));
    double acc = 0.0;
    // Sum of the teacher probabilities paired with each student crop: every teacher crop,
    // or every one but the crop itself (v < T with skip), summed afresh (not total - p_v:
    // exact, and a NaN in teacher crop v stays out of student crop v, as in the reference).
    int64_t built_for = -2;  // which exclusion pex holds (-1: none excluded)
    for (int64_t v = 0; v < V; ++v) {
      const int64_t excl = (cfg.skip && v < T) ? v : -1;
      const int64_t n_v = excl >= 0 ? T - 1 : T;
      const int64_t row = v * B + b;
      if (n_v == 0) {
        if (cfg.grad) {
          for (int64_t k = 0; k < n; ++k) store_a<TS, A>(grad + row * K + k0, k, A(0));
        }
        continue;
      }
      if (built_for != excl) {
        std::fill(pex, pex + n, A(0));
        for (int64_t q = 0; q < T; ++q) {
          if (q == excl) continue;
          const A* p = pq + q * ld;
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) pex[k] += p[k];
        }
        built_for = excl;
      }
      const TS* x = s + row * K + k0;
      bool exp_stored = false;
      if (full_row) {
        bool has_nan = false;
        const A mx = row_max<TS, A>(x, nullptr, A(1), K, has_nan);
        A z;
        if (kExpInGrad && cfg.grad) {
          z = exp_sum_store<TS, A, false>(x, nullptr, reinterpret_cast<A*>(grad + row * K), K, mx, inv_ts);
          exp_stored = true;
        } else if (es != nullptr && cfg.grad) {
          z = exp_sum_store<TS, A, false>(x, nullptr, es, K, mx, inv_ts);
          exp_stored = true;
        } else {
          z = 0;
#pragma omp simd reduction(+ : z)
          for (int64_t k = 0; k < K; ++k) z += exp_fast((load_a<TS, A>(x, k) - mx) * inv_ts);
        }
        s_max[row] = has_nan ? nan : mx;
        s_logz[row] = has_nan ? nan : std::log(z);
      }
      const A m = s_max[row];
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < n; ++k) dot += pex[k] * (load_a<TS, A>(x, k) - m);
      // log Z_v counts once per pair for the whole row: add it with the row's first column.
      const double lz = k0 == 0 ? static_cast<double>(n_v) * static_cast<double>(s_logz[row]) : 0.0;
      acc += static_cast<double>(w) * (lz - static_cast<double>(dot) * static_cast<double>(inv_ts));
      if (exp_stored && kExpInGrad) {
        student_grad_from_exp<A>(reinterpret_cast<A*>(grad + row * K), pex, K, std::exp(-s_logz[row]), w * inv_ts,
                                 static_cast<A>(n_v));
      } else if (exp_stored) {
        student_grad_from_scratch<TS, A>(grad + row * K, es, pex, K, std::exp(-s_logz[row]), w * inv_ts,
                                         static_cast<A>(n_v));
      } else if (cfg.grad) {
        student_grad_chunk<TS, A>(x, pex, grad + row * K + k0, n, m, inv_ts, s_logz[row], w * inv_ts,
                                  static_cast<A>(n_v));
      }
    }
    return acc;
  };

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> partial;
  if ((V + T) * K <= kRowMajorElems || (T * K <= kFullRowTeacherElems && B >= 2 * threads)) {
    // Full rows: each task takes whole images, one row at a time (statistics, then dots and
    // gradient while the row is in cache): one read of the logits from memory, one exp per
    // element. Scratch per task: T + 1 rows (teacher probabilities and their pair sums; one
    // more for the exponentials of a half-precision student) and
    // a K-buffer of column sums, added in a fixed order.
    const int64_t n_tasks = std::min<int64_t>(threads, B);
    partial.assign(B, 0.0);
    std::vector<std::vector<A>> colsums(cfg.colsum ? n_tasks : 0);
    parallel_for_ftz(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> pq(T * K), pex(K), es(kExpInGrad || !cfg.grad ? 0 : K);
      for (int64_t task = lo; task < hi; ++task) {
        A* cs = nullptr;
        if (cfg.colsum) {
          colsums[task].assign(K, A(0));
          cs = colsums[task].data();
        }
        for (int64_t b = task * B / n_tasks; b < (task + 1) * B / n_tasks; ++b) {
          partial[b] = image_chunk(b, 0, K, K, pq.data(), pex.data(), cs, true, es.empty() ? nullptr : es.data());
        }
      }
    });
    for (const auto& cs : colsums) {
      for (int64_t k = 0; k < K; ++k) colsum_out[k] += cs[k];
    }
  } else {
    // Column-chunked: statistics for every row first (parallel over rows), then chunks of
    // C prototypes (parallel over chunks, every image per chunk), so the scratch per task
    // is O(T * C) with C <= 4096 whatever K is, and the column sums need no reduction.
    const int64_t n_rows = V * B + (cfg.probs ? 0 : T * B);
    parallel_for_ftz(0, n_rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) row_stats(r);
    });
    int64_t C = (K + 4 * threads - 1) / (4 * threads);
    C = std::clamp<int64_t>((C + 15) / 16 * 16, 256, 4096);
    const int64_t n_chunks = (K + C - 1) / C;
    partial.assign(n_chunks, 0.0);
    parallel_for_ftz(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> pq(T * C), pex(C), colsum(cfg.colsum ? C : 0);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t k0 = j * C;
        const int64_t n = std::min(C, K - k0);
        std::fill(colsum.begin(), colsum.end(), A(0));
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          acc += image_chunk(b, k0, n, C, pq.data(), pex.data(), cfg.colsum ? colsum.data() : nullptr, false, nullptr);
        }
        partial[j] = acc;
        if (cfg.colsum) std::copy(colsum.begin(), colsum.begin() + n, colsum_out + k0);
      }
    });
  }
  double total = 0.0;
  for (double p : partial) total += p;  // fixed order: deterministic
  *loss_out = static_cast<A>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& center,
    const std::optional<at::Tensor>& weights, double scale, double student_temp, double teacher_temp,
    int64_t n_student_views, int64_t n_teacher_views, bool skip_same_view, bool teacher_is_probs,
    bool compute_grad, bool center_sum) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "dino_loss: tensors must be on the CPU");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "dino_loss: student and teacher must be 2-D");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "dino_loss: student and teacher must be contiguous");
  const int64_t K = student.size(1);
  TORCH_CHECK(teacher.size(1) == K, "dino_loss: teacher has ", teacher.size(1), " columns, student ", K);
  TORCH_CHECK(n_student_views > 0 && n_teacher_views > 0, "dino_loss: view counts must be positive");
  TORCH_CHECK(student.size(0) % n_student_views == 0, "dino_loss: student rows not divisible by the views");
  const int64_t B = student.size(0) / n_student_views;
  TORCH_CHECK(teacher.size(0) == n_teacher_views * B, "dino_loss: teacher must have ", n_teacher_views * B, " rows");
  TORCH_CHECK(student_temp > 0 && teacher_temp > 0, "dino_loss: temperatures must be positive");
  const bool dbl = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto acc_dtype = dbl ? at::kDouble : at::kFloat;
  at::Tensor c;
  if (!teacher_is_probs) {
    TORCH_CHECK(center.has_value() && center->defined(), "dino_loss: center is required for logits teachers");
    TORCH_CHECK(center->numel() == K, "dino_loss: center must have ", K, " elements");
    c = center->to(acc_dtype).contiguous();
  }
  at::Tensor w;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->numel() == B, "dino_loss: weights must have ", B, " elements");
    w = weights->to(acc_dtype).contiguous();
  }
  at::Tensor loss = at::zeros({}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? empty_output(student.sizes(), student.options()) : at::empty({0}, student.options());
  at::Tensor csum = center_sum ? at::zeros({K}, student.options().dtype(acc_dtype)) : at::empty({0}, student.options().dtype(acc_dtype));
  if (B == 0 || K == 0) return {loss, grad, csum};
  Config cfg{B, K, n_student_views, n_teacher_views, skip_same_view, teacher_is_probs, compute_grad, center_sum,
             scale, student_temp, teacher_temp};
  dispatch_float(student.scalar_type(), "dino_loss: student", [&](auto s_tag) {
    using TS = decltype(s_tag);
    dispatch_float(teacher.scalar_type(), "dino_loss: teacher", [&](auto t_tag) {
      using TT = decltype(t_tag);
      auto run = [&](auto a_tag) {
        using A = decltype(a_tag);
        dino_loss_kernel<TS, TT, A>(cfg, ptr<TS>(student), ptr<TT>(teacher), c.defined() ? ptr<A>(c) : nullptr,
                                    w.defined() ? ptr<A>(w) : nullptr, ptr<A>(loss),
                                    compute_grad ? ptr<TS>(grad) : nullptr, center_sum ? ptr<A>(csum) : nullptr);
      };
      if (dbl) run(double{}); else run(float{});
    });
  });
  return {loss, grad, csum};
}


// sinkhorn_teacher — DINOv2's Sinkhorn-Knopp teacher (dinov2 DINOLoss.sinkhorn_knopp_teacher),
// in the log domain with two potential vectors instead of an updated (N x K) matrix:
// X = t / tt, per iteration a_k = lse_i (X_ik - b_i) (each prototype's mass over the batch),
// then b_i = lse_k (X_ik - a_k) (each sample's row sums to 1); P = exp(X - a - b). Same
// result as the eager log-domain version (sslkern/ops/dino_loss.py), which runs torch's
// logsumexp: there the exponentials of very negative arguments are float32 subnormals and
// each costs a microcode assist (3x the time at randn x 3 logits, tt = 0.04). Here exp_fast
// gives exactly 0 below exp(-87) and every task flushes subnormals: the probabilities are
// normal or 0. 4 passes over the logits per iteration (max, then sum, per direction), 2
// exponentials per element per iteration, one output write.
template <typename T, typename A>
void sinkhorn_kernel(const T* t, int64_t N, int64_t K, A inv_temp, int64_t iters, int64_t out_row0, A* out) {
  FlushDenormals ftz;
  const A ninf = -std::numeric_limits<A>::infinity();
  std::vector<A> a(K, A(0)), b(N, A(0));
  constexpr int64_t kCols = 1024;  // columns per task of the batch direction
  const int64_t n_col_tasks = (K + kCols - 1) / kCols;
  for (int64_t it = 0; it < iters; ++it) {
    parallel_for_ftz(0, n_col_tasks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<A> mv(kCols), sv(kCols);
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t k0 = c * kCols, n = std::min(kCols, K - k0);
        A* __restrict m = mv.data();
        A* __restrict sm = sv.data();
        std::fill(m, m + n, ninf);
        std::fill(sm, sm + n, A(0));
        for (int64_t i = 0; i < N; ++i) {
          const T* __restrict x = t + i * K + k0;
          const A bi = b[i];
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) {
            const A v = load_a<T, A>(x, k) * inv_temp - bi;
            m[k] = (v > m[k] || v != v) ? v : m[k];
          }
        }
        for (int64_t i = 0; i < N; ++i) {
          const T* __restrict x = t + i * K + k0;
          const A bi = b[i];
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) sm[k] += exp_fast(load_a<T, A>(x, k) * inv_temp - bi - m[k]);
        }
        for (int64_t k = 0; k < n; ++k) a[k0 + k] = m[k] + std::log(sm[k]);
      }
    });
    parallel_for_ftz(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T* __restrict x = t + i * K;
        const A* __restrict ak = a.data();
        A m = ninf;
        int nan_count = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan_count)
        for (int64_t k = 0; k < K; ++k) {
          const A v = load_a<T, A>(x, k) * inv_temp - ak[k];
          m = std::max(m, v);
          nan_count += (v != v);
        }
        A z = 0;
#pragma omp simd reduction(+ : z)
        for (int64_t k = 0; k < K; ++k) z += exp_fast(load_a<T, A>(x, k) * inv_temp - ak[k] - m);
        b[i] = nan_count ? std::numeric_limits<A>::quiet_NaN() : m + std::log(z);
      }
    });
  }
  parallel_for_ftz(out_row0, N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* __restrict x = t + i * K;
      const A* __restrict ak = a.data();
      A* __restrict o = out + (i - out_row0) * K;
      const A bi = b[i];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) o[k] = exp_fast(load_a<T, A>(x, k) * inv_temp - ak[k] - bi);
    }
  });
}

// keep_last > 0: the probabilities of the last keep_last rows only (the equipartition still runs
// over every row): SwAV's codes of a batch whose Sinkhorn also sees a queue of earlier rows.
at::Tensor sinkhorn_teacher_cpu(const at::Tensor& teacher, double teacher_temp, int64_t n_iterations,
                                int64_t keep_last) {
  TORCH_CHECK(teacher.device().is_cpu(), "sinkhorn_knopp_teacher: teacher must be on the CPU");
  TORCH_CHECK(teacher.dim() == 2, "sinkhorn_knopp_teacher: teacher must be 2-D, got ", teacher.sizes());
  TORCH_CHECK(teacher_temp > 0, "sinkhorn_knopp_teacher: teacher_temp must be positive");
  TORCH_CHECK(n_iterations >= 0, "sinkhorn_knopp_teacher: n_iterations must be >= 0");
  const at::Tensor t = teacher.contiguous();
  const int64_t N = t.size(0), K = t.size(1);
  TORCH_CHECK(keep_last >= 0 && keep_last <= N, "sinkhorn_knopp_teacher: keep_last expected in [0, ", N, "], got ",
              keep_last);
  const int64_t row0 = keep_last ? N - keep_last : 0;
  const bool dbl = t.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({N - row0, K}, t.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (N == 0 || K == 0) return out;
  dispatch_float(t.scalar_type(), "sinkhorn_knopp_teacher: teacher", [&](auto tag) {
    using T = decltype(tag);
    if (dbl) sinkhorn_kernel<T, double>(ptr<T>(t), N, K, 1.0 / teacher_temp, n_iterations, row0, ptr<double>(out));
    else sinkhorn_kernel<T, float>(ptr<T>(t), N, K, static_cast<float>(1.0 / teacher_temp), n_iterations, row0,
                                   ptr<float>(out));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("dino_loss_cpu(Tensor student, Tensor teacher, Tensor? center, Tensor? weights, float scale, "
        "float student_temp, float teacher_temp, int n_student_views, int n_teacher_views, bool skip_same_view, "
        "bool teacher_is_probs, bool compute_grad, bool center_sum) -> (Tensor, Tensor, Tensor)",
        &dino_loss_cpu);
  m.def("sinkhorn_teacher_cpu(Tensor teacher, float teacher_temp, int n_iterations, int keep_last) -> Tensor",
        &sinkhorn_teacher_cpu);
}

}  // namespace sslkern
