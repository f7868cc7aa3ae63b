// gather_tokens / restore_tokens — masked-token gather and MAE-style restore, C++ CPU.
//
//   gather:  out[r, t]        = x[b, src(t)] (+ pos[src(t)]),  src(t) = t for prefix t < P,
//                                                          else P + ids_keep[b, m, t - P];
//            or, with prefix_tokens (P, D) shared by every image (MAE's cls_token), x holds
//            only the N patches: out[r, t] = prefix[t] + pos[t] for t < P,
//                                            x[b, i] + pos[P + i] after (i = ids_keep[b, m, t - P])
//            r = b*M + m (image-major, data2vec 2.0 clone batch) or m*B + b (mask-major, I-JEPA)
//   restore: out[b, t]        = x_vis[b, t] for t < P, else with i = t - P, k = ids_restore[b, i]:
//                               x_vis[b, P + k] if k < Nk, else mask_token / fill[b, i];  (+ pos[t])
//
// Every output row is an independent row copy (memcpy without a position table, else one
// fused add), so the forward kernels split the output rows across threads. Backward of
// gather scatter-adds into grad_x; it is split by image so no two threads touch one row
// (a token kept by several clone masks is summed in fp32, rounded once). Backward of
// restore is a gather (ids_restore is checked to be a permutation), plus a per-image fp32
// partial sum of the removed slots for the mask token's gradient.
//
// Indices are read once and checked before any copy: out-of-range values raise an error
// naming the argument, so no access ever leaves the tensors.
#include "common.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace sslkern {
namespace {

template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> inline acc_t<T> ld(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) return p[i]; else return load_f(p, i);
}
template <typename T> inline void st(T* p, int64_t i, acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) p[i] = v; else store_f(p, i, v);
}

// dst = src (+ pos), one row of D elements.
template <typename T>
inline void copy_row(T* __restrict dst, const T* __restrict src, const T* __restrict pos, int64_t D) {
  if (pos == nullptr) {
    std::memcpy(dst, src, D * sizeof(T));
    return;
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) st(dst, d, ld(src, d) + ld(pos, d));
}

template <typename T> inline void zero_row(T* dst, int64_t D) { std::memset(dst, 0, D * sizeof(T)); }

// Streaming (non-temporal) row writes for large outputs. A normal store to a line that is
// not in cache first reads the line (read-for-ownership), so writing an output costs twice
// its bytes of memory traffic; these kernels are copies whose outputs (tens of MiB, 75 %
// zeros for MAE's grad_x) exceed the caches, so that read is a third of their traffic.
// Streaming stores skip it; a task ends with a fence (stream_fence). Used when the output is
// at least kStreamMinBytes (smaller ones are better left in cache for the next op) and for
// rows starting 32-byte aligned (else the plain copy).
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// dst = src (+ pos), streaming when `stream` and dst is aligned; else copy_row / memcpy.
template <typename T>
inline void put_row(T* __restrict dst, const T* __restrict src, const T* __restrict pos, int64_t D, bool stream) {
#if defined(__AVX__)
  const int64_t nbytes = D * static_cast<int64_t>(sizeof(T));
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && nbytes % 32 == 0) {
    if (pos == nullptr) {
      auto* d = reinterpret_cast<__m256i*>(dst);
      const auto* sp = reinterpret_cast<const __m256i_u*>(src);
      for (int64_t j = 0; j < nbytes / 32; ++j) _mm256_stream_si256(d + j, _mm256_loadu_si256(sp + j));
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = 0; j < D; j += 8)
        _mm256_stream_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(src + j), _mm256_loadu_ps(pos + j)));
      return;
    }
  }
#endif
  (void)stream;
  copy_row(dst, src, pos, D);
}

template <typename T> inline void put_zero_row(T* dst, int64_t D, bool stream) {
#if defined(__AVX__)
  const int64_t nbytes = D * static_cast<int64_t>(sizeof(T));
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && nbytes % 32 == 0) {
    auto* d = reinterpret_cast<__m256i*>(dst);
    const __m256i z = _mm256_setzero_si256();
    for (int64_t j = 0; j < nbytes / 32; ++j) _mm256_stream_si256(d + j, z);
    return;
  }
#endif
  (void)stream;
  zero_row(dst, D);
}

template <typename A, typename T> inline void add_to(A* __restrict acc, const T* __restrict src, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += ld(src, d);
}

// Batch ranges for backward kernels that also reduce over the batch: one contiguous range
// of images per task, each task with its own accumulation buffer.
struct Split {
  int64_t tasks, per;
  Split(int64_t B) {
    tasks = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
    per = (B + tasks - 1) / std::max<int64_t>(tasks, 1);
    tasks = B > 0 ? (B + per - 1) / per : 0;
  }
};

// out[j] = sum_t partial[t][j] for j in [0, n), then rounded to T.
template <typename T, typename A>
void reduce_partials(T* out, const std::vector<std::vector<A>>& partials, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      A acc = 0;
      for (const auto& p : partials) acc += p[j];
      st(out, j, acc);
    }
  });
}

void check_ids_range(const at::Tensor& ids, int64_t hi, const char* op, const char* name) {
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t n = ids.numel();
  for (int64_t k = 0; k < n; ++k) {
    if (p[k] < 0 || p[k] >= hi) {
      TORCH_CHECK_INDEX(false, "sslkern.", op, ": ", name, " expected values in [0, ", hi, "), got ", name,
                        ".flatten()[", k, "] = ", p[k]);
    }
  }
}

// Each row of ids_restore (B, N) must be a permutation of 0..N-1.
void check_permutation(const at::Tensor& ids, const char* op) {
  const int64_t B = ids.size(0), N = ids.size(1);
  check_ids_range(ids, N, op, "ids_restore");
  const int64_t* p = ids.data_ptr<int64_t>();
  std::vector<uint8_t> seen(N);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t k = p[b * N + i];
      TORCH_CHECK_VALUE(!seen[k], "sslkern.", op, ": ids_restore[", b, "] must be a permutation of 0..", N - 1,
                        ", but ", k, " appears twice");
      seen[k] = 1;
    }
  }
}

void check_common(const at::Tensor& t, const char* op, const char* name, int64_t ndim) {
  TORCH_CHECK(t.device().is_cpu(), "sslkern.", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == ndim, "sslkern.", op, ": ", name, " must have ", ndim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "sslkern.", op, ": ", name, " must be contiguous");
}

void check_ids(const at::Tensor& t, const char* op, const char* name, int64_t ndim) {
  check_common(t, op, name, ndim);
  TORCH_CHECK(t.scalar_type() == at::kLong, "sslkern.", op, ": ", name, " must be int64");
}

// ---------------------------------------------------------------------------------------
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos,
                             int64_t P, bool mask_major, const std::optional<at::Tensor>& prefix) {
  const char* op = "gather_tokens";
  check_common(x, op, "x", 3);
  check_ids(ids_keep, op, "ids_keep", 3);
  const int64_t B = x.size(0), Lx = x.size(1), D = x.size(2);
  const int64_t M = ids_keep.size(1), Nk = ids_keep.size(2);
  // ext: the P prefix rows come from `prefix` (P, D), shared by every image (MAE's
  // cls_token), and x holds the N patch tokens only; else x holds them in its first P rows
  const bool ext = prefix.has_value() && prefix->defined();
  TORCH_CHECK(P >= 0 && (ext || P <= Lx), "sslkern.", op, ": num_prefix_tokens out of range");
  const int64_t Px = ext ? 0 : P, N = Lx - Px, L = P + N;  // L: rows of pos_embed
  TORCH_CHECK(ids_keep.size(0) == B, "sslkern.", op, ": ids_keep batch size differs from x");
  if (ext) {
    check_common(*prefix, op, "prefix_tokens", 2);
    TORCH_CHECK(prefix->size(0) == P && prefix->size(1) == D && prefix->scalar_type() == x.scalar_type(),
                "sslkern.", op, ": prefix_tokens must be (", P, ", ", D, ") of x's dtype");
  }
  const bool has_pos = pos.has_value() && pos->defined();
  if (has_pos) {
    check_common(*pos, op, "pos_embed", 2);
    TORCH_CHECK(pos->size(0) == L && pos->size(1) == D && pos->scalar_type() == x.scalar_type(),
                "sslkern.", op, ": pos_embed must be (", L, ", ", D, ") of x's dtype");
  }
  check_ids_range(ids_keep, N, op, "ids_keep");
  const int64_t Lo = P + Nk;
  at::Tensor out = empty_output({B * M, Lo, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t* ids = ids_keep.data_ptr<int64_t>();
  dispatch_float(x.scalar_type(), "gather_tokens: x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(x);
    const T* pre = ext ? ptr<T>(*prefix) : nullptr;
    const T* pp = has_pos ? ptr<T>(*pos) : nullptr;
    T* op_ = ptr<T>(out);
    const int64_t rows = B * M * Lo;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    const bool stream = out.nbytes() >= static_cast<size_t>(kStreamMinBytes);
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t row = r / Lo, t = r % Lo;
        const int64_t b = mask_major ? row % B : row / M;
        const int64_t m = mask_major ? row / B : row % M;
        const int64_t i = t < P ? -1 : ids[(b * M + m) * Nk + (t - P)];  // patch index
        const T* src = i < 0 ? (ext ? pre + t * D : xp + (b * Lx + t) * D) : xp + (b * Lx + Px + i) * D;
        put_row(op_ + r * D, src, pp ? pp + (i < 0 ? t : P + i) * D : nullptr, D, stream);
      }
      stream_fence();
    });
  });
  return out;
}

// L = rows of x (grad_x); with external_prefix x has no prefix rows (L = N), and the
// second output (the batch sums by position) holds the P prefix rows first — the prefix
// tokens' gradient — and all P + N positions when need_pos.
std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                                int64_t L, int64_t P, bool mask_major, bool need_pos,
                                                                bool external_prefix) {
  const char* op = "gather_tokens_backward";
  check_common(grad_out, op, "grad_out", 3);
  check_ids(ids_keep, op, "ids_keep", 3);
  const int64_t B = ids_keep.size(0), M = ids_keep.size(1), Nk = ids_keep.size(2), D = grad_out.size(2);
  const int64_t Lo = P + Nk;
  TORCH_CHECK(grad_out.size(0) == B * M && grad_out.size(1) == Lo, "sslkern.", op, ": grad_out has the wrong shape");
  TORCH_CHECK(P >= 0 && (external_prefix || P <= L), "sslkern.", op, ": num_prefix_tokens out of range");
  const int64_t Px = external_prefix ? 0 : P, N = L - Px, Lp = P + N;
  check_ids_range(ids_keep, N, op, "ids_keep");
  at::Tensor grad_x = empty_output({B, L, D}, grad_out.options());
  // batch sums by position: all P + N when pos_embed needs a gradient, else with an
  // external prefix the first P (the prefix tokens' gradient), else none
  const int64_t n_sum = need_pos ? Lp : (external_prefix ? P : 0);
  at::Tensor grad_pos = n_sum > 0 || need_pos ? at::empty({n_sum, D}, grad_out.options())
                                              : at::empty({0}, grad_out.options());
  if (grad_out.numel() == 0 || grad_x.numel() == 0) {
    grad_x.zero_();
    if (n_sum > 0) {
      if (grad_out.numel() == 0) grad_pos.zero_();
      else grad_pos.copy_(grad_out.narrow(1, 0, std::min(n_sum, Lo)).sum(0).narrow(0, 0, n_sum));
    }
    return {grad_x, grad_pos};
  }
  const int64_t* ids = ids_keep.data_ptr<int64_t>();
  dispatch_float(grad_out.scalar_type(), "gather_tokens_backward: grad_out", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* gp = ptr<T>(grad_out);
    T* gx = ptr<T>(grad_x);
    const Split split(B);
    // grad_pos[s] = sum over every grad_out row that came from position s: each task
    // sums its images into its own buffer (fused here, so grad_x is not read again).
    std::vector<std::vector<A>> pos_part(n_sum > 0 ? split.tasks : 0);
    const bool stream = grad_x.nbytes() >= static_cast<size_t>(kStreamMinBytes);
    at::parallel_for(0, split.tasks, 1, [&](int64_t task_lo, int64_t task_hi) {
      // first[s] = the grad_out row that first wrote row s of grad_x (-1: none yet);
      // rows hit more than once are summed in an accumulation-precision buffer.
      std::vector<int64_t> first(L);
      std::vector<int32_t> slot(L);
      std::vector<A> acc;
      for (int64_t task = task_lo; task < task_hi; ++task) {
        A* pp = nullptr;
        if (n_sum > 0) {
          pos_part[task].assign(static_cast<size_t>(n_sum * D), A(0));
          pp = pos_part[task].data();
        }
        for (int64_t b = task * split.per; b < std::min(B, (task + 1) * split.per); ++b) {
          std::fill(first.begin(), first.end(), -1);
          std::fill(slot.begin(), slot.end(), -1);
          acc.clear();
          int32_t nslots = 0;
          T* gxb = gx + b * L * D;
          for (int64_t m = 0; m < M; ++m) {
            const int64_t row = mask_major ? m * B + b : b * M + m;
            const T* g = gp + row * Lo * D;
            for (int64_t t = 0; t < Lo; ++t) {
              const int64_t i = t < P ? -1 : ids[(b * M + m) * Nk + (t - P)];
              const T* src = g + t * D;
              if (pp && (i < 0 || need_pos)) add_to(pp + (i < 0 ? t : P + i) * D, src, D);
              if (i < 0 && external_prefix) continue;  // a shared prefix token: not a row of x
              const int64_t s = i < 0 ? t : Px + i;
              if (first[s] < 0) {
                first[s] = row * Lo + t;
                if constexpr (std::is_same_v<T, A>) {
                  put_row(gxb + s * D, src, static_cast<const T*>(nullptr), D, stream);  // a repeat reads it back: same thread
                }
              } else {
                if constexpr (std::is_same_v<T, A>) {
                  add_to(gxb + s * D, src, D);
                } else {
                  if (slot[s] < 0) {  // second hit: start an fp32 sum from the first row
                    slot[s] = nslots++;
                    acc.resize(static_cast<size_t>(nslots) * D, A(0));
                    A* a = acc.data() + static_cast<int64_t>(slot[s]) * D;
                    const T* f = gp + first[s] * D;
                    for (int64_t d = 0; d < D; ++d) a[d] = ld(f, d);
                  }
                  add_to(acc.data() + static_cast<int64_t>(slot[s]) * D, src, D);
                }
              }
            }
          }
          for (int64_t s = 0; s < L; ++s) {
            if (first[s] < 0) {
              put_zero_row(gxb + s * D, D, stream);
            } else if constexpr (!std::is_same_v<T, A>) {
              if (slot[s] < 0) {
                std::memcpy(gxb + s * D, gp + first[s] * D, D * sizeof(T));
              } else {
                const A* a = acc.data() + static_cast<int64_t>(slot[s]) * D;
                for (int64_t d = 0; d < D; ++d) st(gxb + s * D, d, a[d]);
              }
            }
          }
        }
      }
      stream_fence();
    });
    if (n_sum > 0) reduce_partials(ptr<T>(grad_pos), pos_part, n_sum * D);
  });
  return {grad_x, grad_pos};
}

// ---------------------------------------------------------------------------------------
at::Tensor restore_tokens_cpu(const at::Tensor& x_vis, const at::Tensor& ids_restore,
                              const std::optional<at::Tensor>& mask_token, const std::optional<at::Tensor>& fill,
                              const std::optional<at::Tensor>& pos, int64_t P) {
  const char* op = "restore_tokens";
  check_common(x_vis, op, "x_vis", 3);
  check_ids(ids_restore, op, "ids_restore", 2);
  const int64_t B = x_vis.size(0), Lv = x_vis.size(1), D = x_vis.size(2);
  const int64_t N = ids_restore.size(1), Nk = Lv - P, L = P + N;
  TORCH_CHECK(P >= 0 && Nk >= 0 && Nk <= N && ids_restore.size(0) == B, "sslkern.", op, ": inconsistent sizes");
  const bool has_mt = mask_token.has_value() && mask_token->defined();
  const bool has_fill = fill.has_value() && fill->defined();
  TORCH_CHECK(has_mt != has_fill, "sslkern.", op, ": exactly one of mask_token and fill must be given");
  if (has_mt) {
    check_common(*mask_token, op, "mask_token", 1);
    TORCH_CHECK(mask_token->size(0) == D && mask_token->scalar_type() == x_vis.scalar_type(),
                "sslkern.", op, ": mask_token must be (", D, ",) of x_vis's dtype");
  } else {
    check_common(*fill, op, "fill", 3);
    TORCH_CHECK(fill->size(0) == B && fill->size(1) == N && fill->size(2) == D &&
                    fill->scalar_type() == x_vis.scalar_type(),
                "sslkern.", op, ": fill must be (", B, ", ", N, ", ", D, ") of x_vis's dtype");
  }
  const bool has_pos = pos.has_value() && pos->defined();
  if (has_pos) {
    check_common(*pos, op, "pos_embed", 2);
    TORCH_CHECK(pos->size(0) == L && pos->size(1) == D && pos->scalar_type() == x_vis.scalar_type(),
                "sslkern.", op, ": pos_embed must be (", L, ", ", D, ") of x_vis's dtype");
  }
  check_permutation(ids_restore, op);
  at::Tensor out = empty_output({B, L, D}, x_vis.options());
  if (out.numel() == 0) return out;
  const int64_t* ids = ids_restore.data_ptr<int64_t>();
  dispatch_float(x_vis.scalar_type(), "restore_tokens: x_vis", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(x_vis);
    const T* mt = has_mt ? ptr<T>(*mask_token) : nullptr;
    const T* fp = has_fill ? ptr<T>(*fill) : nullptr;
    const T* pp = has_pos ? ptr<T>(*pos) : nullptr;
    T* o = ptr<T>(out);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    const bool stream = out.nbytes() >= static_cast<size_t>(kStreamMinBytes);
    at::parallel_for(0, B * L, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / L, t = r % L;
        const T* src;
        if (t < P) {
          src = xp + (b * Lv + t) * D;
        } else {
          const int64_t i = t - P, k = ids[b * N + i];
          src = k < Nk ? xp + (b * Lv + P + k) * D : (mt ? mt : fp + (b * N + i) * D);
        }
        put_row(o + r * D, src, pp ? pp + t * D : nullptr, D, stream);
      }
      stream_fence();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> restore_tokens_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t Nk, int64_t P, bool need_mask_token,
    bool need_fill, bool need_pos) {
  const char* op = "restore_tokens_backward";
  check_common(grad_out, op, "grad_out", 3);
  check_ids(ids_restore, op, "ids_restore", 2);
  const int64_t B = ids_restore.size(0), N = ids_restore.size(1), D = grad_out.size(2), L = P + N, Lv = P + Nk;
  TORCH_CHECK(P >= 0 && Nk >= 0 && Nk <= N && grad_out.size(0) == B && grad_out.size(1) == L,
              "sslkern.", op, ": inconsistent sizes");
  check_permutation(ids_restore, op);
  const auto opts = grad_out.options();
  at::Tensor gxv = empty_output({B, Lv, D}, opts);
  at::Tensor gfill = need_fill ? empty_output({B, N, D}, opts) : at::empty({0}, opts);
  at::Tensor gmt = need_mask_token ? at::empty({D}, opts) : at::empty({0}, opts);
  at::Tensor gpos = need_pos ? at::empty({L, D}, opts) : at::empty({0}, opts);
  const int64_t* ids = ids_restore.data_ptr<int64_t>();
  dispatch_float(grad_out.scalar_type(), "restore_tokens_backward: grad_out", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* g = ptr<T>(grad_out);
    T* gv = ptr<T>(gxv);
    T* gf = need_fill ? ptr<T>(gfill) : nullptr;
    const Split split(B);
    // per task: mask-token sum (D) and position sum (L × D) in accumulation precision
    std::vector<std::vector<A>> mt_part(need_mask_token ? std::max<int64_t>(split.tasks, 1) : 0);
    std::vector<std::vector<A>> pos_part(need_pos ? std::max<int64_t>(split.tasks, 1) : 0);
    for (auto& v : mt_part) v.assign(static_cast<size_t>(D), A(0));
    for (auto& v : pos_part) v.assign(static_cast<size_t>(L * D), A(0));
    const bool stream = gxv.nbytes() >= static_cast<size_t>(kStreamMinBytes);
    at::parallel_for(0, split.tasks, 1, [&](int64_t task_lo, int64_t task_hi) {
      for (int64_t task = task_lo; task < task_hi; ++task) {
        A* mp = need_mask_token ? mt_part[task].data() : nullptr;
        A* pp = need_pos ? pos_part[task].data() : nullptr;
        for (int64_t b = task * split.per; b < std::min(B, (task + 1) * split.per); ++b) {
          if (P > 0) std::memcpy(gv + b * Lv * D, g + b * L * D, P * D * sizeof(T));
          if (pp) {
            for (int64_t t = 0; t < P; ++t) add_to(pp + t * D, g + (b * L + t) * D, D);
          }
          for (int64_t i = 0; i < N; ++i) {
            const int64_t k = ids[b * N + i];
            const T* src = g + (b * L + P + i) * D;
            if (pp) add_to(pp + (P + i) * D, src, D);
            if (k < Nk) {
              put_row(gv + (b * Lv + P + k) * D, src, static_cast<const T*>(nullptr), D, stream);
              if (gf) zero_row(gf + (b * N + i) * D, D);
            } else {
              if (gf) std::memcpy(gf + (b * N + i) * D, src, D * sizeof(T));
              if (mp) add_to(mp, src, D);
            }
          }
        }
      }
      stream_fence();
    });
    if (need_mask_token) reduce_partials(ptr<T>(gmt), mt_part, D);
    if (need_pos) reduce_partials(ptr<T>(gpos), pos_part, L * D);
  });
  return {gxv, gmt, gfill, gpos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("gather_tokens_cpu(Tensor x, Tensor ids_keep, Tensor? pos_embed, int num_prefix_tokens, bool mask_major, "
        "Tensor? prefix_tokens=None) -> Tensor",
        &gather_tokens_cpu);
  m.def("gather_tokens_backward_cpu(Tensor grad_out, Tensor ids_keep, int num_tokens, int num_prefix_tokens, "
        "bool mask_major, bool need_pos, bool external_prefix=False) -> (Tensor, Tensor)",
        &gather_tokens_backward_cpu);
  m.def("restore_tokens_cpu(Tensor x_vis, Tensor ids_restore, Tensor? mask_token, Tensor? fill, Tensor? pos_embed, "
        "int num_prefix_tokens) -> Tensor",
        &restore_tokens_cpu);
  m.def("restore_tokens_backward_cpu(Tensor grad_out, Tensor ids_restore, int num_visible, int num_prefix_tokens, "
        "bool need_mask_token, bool need_fill, bool need_pos) -> (Tensor, Tensor, Tensor, Tensor)",
        &restore_tokens_backward_cpu);
}

}  // namespace sslkern
