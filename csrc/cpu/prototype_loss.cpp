// prototype_loss — DINO / iBOT prototype head (weight-normalised last layer) fused with the
// DINO / iBOT loss, C++ CPU kernel. No (rows, K) logits are ever stored.
//
// Student bottleneck features zs (Rs x D), teacher features zt (Rt x D), last-layer weights
// v (K x D) with optional gains g (K): W = g v / ||v|| (rows; W = v without gains), the same
// for the teacher. Logits s = zs W^T, t = zt Wt^T; then exactly the dino_loss contract
// (csrc/cpu/dino_loss.cpp): B groups, V student and T teacher rows per group (crop-major),
//   p_q = softmax((t_q - c) / tt),
//   loss = scale * sum_b w_b sum_v sum_{q paired with v} (logsumexp(s_v/ts) - sum_k p_q[k] s_v[k]/ts)
//   G_v  = dloss/ds_v = scale * w_b / ts * (n_v softmax(s_v/ts) - sum_{q paired} p_q)
// and the gradients through the head's last layer
//   dzs = G W,  dW = G^T zs,  dv_k = r_k (dW_k - (dW_k . v_k) v_k / ||v_k||^2),
//   dg_k = dW_k . v_k / ||v_k||,  r_k = g_k / ||v_k||,
// plus the column sum of the raw teacher logits (the center update).
//
// Tiling: the prototypes are cut into tiles of n <= 1024 rows of v (n chosen so that the tile
// logits of every student and teacher row, (Rs + Rt) x n, hold <= 2^24 elements; 2^22 for
// fp16 / bf16 weights, whose tiles are also converted). Two passes over
// the tiles, each parallel over tasks of consecutive tiles:
//   pass 1: S = zs V_tile^T r, T = zt Vt_tile^T rt (two tile GEMMs); per (row, tile) the max
//           and the exp-sum relative to it, merged into running statistics per (task, row)
//           (online logsumexp); the teacher column sums. The tasks' statistics are then
//           merged in task order into each row's max and log normaliser.
//   pass 2: the same two GEMMs again (bitwise the same tiles), T -> p in place, S -> G in
//           place with the loss dots, then dW_tile = G^T zs (complete for the tile: every
//           row is in it, so the weight-norm backward and the store happen right here),
//           G r -> dzs += (G r) V_tile (one (Rs x D) accumulator per task, summed in task order).
// Six tile GEMMs per tile (the unfused head + loss does four full-size ones); extra memory:
// per task two logits tiles, two weight tiles (fp32 copies for fp16 / bf16 weights), a dW
// tile and a (Rs x D) accumulator, plus O(tasks * (Rs + Rt)) row statistics — never O(rows * K).
// Scratch is ATen tensors, so memory profilers see it.
//
// Subnormals: every task runs under FlushDenormals (parallel_for_ftz); exp_fast returns 0
// below -87, so no subnormal reaches the tile GEMMs either.
// NaN: a NaN in a student row (feature) makes that row's loss term and gradient NaN; a NaN
// in a teacher row makes p of that row NaN, hence the loss and the gradient of every paired
// student row, as the unfused head + dino_loss.
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

// (Rs + Rt) x n logits per task: at most 64 MiB of fp32, and n <= 1024 prototypes. Wide tiles
// matter: every tile GEMM re-reads (and BLAS re-packs) the (rows x D) features, so narrower
// tiles made the iBOT case slower (docs/ops/prototype_loss.md, *Tile width*).
constexpr int64_t kTileElems = int64_t(1) << 24;

// Copy n elements of storage type `dtype` at src (element offset off) into dst (compute type A).
template <typename A>
void load_rows(const at::Tensor& src, int64_t off, int64_t n, A* __restrict dst) {
  dispatch_float(src.scalar_type(), "prototype_loss", [&](auto tag) {
    using T = decltype(tag);
    const T* __restrict s = ptr<T>(src) + off;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(s[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(load_f(s, i));
    }
  });
}

template <typename A>
void store_rows(at::Tensor& dst, int64_t off, int64_t n, const A* __restrict src) {
  dispatch_float(dst.scalar_type(), "prototype_loss", [&](auto tag) {
    using T = decltype(tag);
    T* __restrict d = ptr<T>(dst) + off;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store_f(d, i, static_cast<float>(src[i]));
    }
  });
}

// 1 / ||v_k|| for every row of v (K x D, any float dtype), accumulated in A: no converted copy of v.
template <typename A>
at::Tensor row_inv_norms(const at::Tensor& v, at::ScalarType acc) {
  const int64_t K = v.size(0), D = v.size(1);
  at::Tensor out = at::empty({K}, v.options().dtype(acc));
  A* o = ptr<A>(out);
  dispatch_float(v.scalar_type(), "prototype_loss", [&](auto tag) {
    using T = decltype(tag);
    const T* p = ptr<T>(v);
    at::parallel_for(0, K, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const T* __restrict x = p + k * D;
        A ss = 0;
        if constexpr (std::is_same_v<T, double>) {
          for (int64_t e = 0; e < D; ++e) ss += static_cast<A>(x[e]) * static_cast<A>(x[e]);
        } else {
#pragma omp simd reduction(+ : ss)
          for (int64_t e = 0; e < D; ++e) {
            const A y = static_cast<A>(load_f(x, e));
            ss += y * y;
          }
        }
        o[k] = A(1) / std::sqrt(ss);
      }
    });
  });
  return out;
}

struct Config {
  int64_t B, K, D, V, T;
  bool skip, grad, gain_grad, colsum;
  double scale, ts, tt;
};

// Per-row statistics of one tile: max m and z = sum exp((x - m) * inv), x = s (student) or
// t - c (teacher). NaN rows get m = NaN.
template <typename A>
inline void tile_stats(const A* __restrict x, const A* __restrict c, int64_t n, A inv, A& m_out, A& z_out) {
  A m = -std::numeric_limits<A>::infinity();
  int nan_count = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan_count)
  for (int64_t k = 0; k < n; ++k) {
    const A y = c ? x[k] - c[k] : x[k];
    m = std::max(m, y);
    nan_count += (y != y);
  }
  A z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t k = 0; k < n; ++k) z += exp_fast(((c ? x[k] - c[k] : x[k]) - m) * inv);
  m_out = nan_count ? std::numeric_limits<A>::quiet_NaN() : m;
  z_out = z;
}

// (m, z) <- the statistics of the union of two column sets; NaN in either stays NaN.
template <typename A>
inline void merge_stats(A& m, A& z, A mj, A zj, A inv) {
  if (m != m || mj != mj) {
    m = z = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  if (zj == 0) return;
  if (z == 0) {
    m = mj;
    z = zj;
    return;
  }
  const A M = std::max(m, mj);
  z = z * exp_fast((m - M) * inv) + zj * exp_fast((mj - M) * inv);
  m = M;
}

template <typename A>
struct Tensors {
  const A* zs;          // Rs x D
  const A* zt;          // Rt x D
  at::Tensor v, vt;     // K x D, any float dtype (contiguous)
  const A* r;           // K: g / ||v|| (null: no gains, W = v)
  const A* rt;          // K
  const A* inv_norm;    // K: 1 / ||v|| (gains only)
  const A* c;           // K center
  const A* w;           // B group weights (or null)
};

template <typename A>
void prototype_loss_kernel(const Config& cfg, const Tensors<A>& in, A* loss_out, A* dzs_out, at::Tensor& dv,
                           A* dg_out, A* colsum_out) {
  FlushDenormals ftz;
  const int64_t B = cfg.B, K = cfg.K, D = cfg.D, V = cfg.V, T = cfg.T;
  const int64_t Rs = V * B, Rt = T * B;
  const A inv_ts = static_cast<A>(1.0 / cfg.ts), inv_tt = static_cast<A>(1.0 / cfg.tt);
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const bool v_direct = in.v.scalar_type() == (std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const bool vt_direct = in.vt.scalar_type() == (std::is_same_v<A, double> ? at::kDouble : at::kFloat);

  // fp16 / bf16 weights also need fp32 tile copies: a quarter of the tile budget keeps the
  // scratch a small share of the (half-size) memory an unfused bf16 head uses
  const int64_t budget = v_direct ? kTileElems : kTileElems / 4;
  int64_t n = budget / std::max<int64_t>(Rs + Rt, 1);
  n = std::clamp<int64_t>(n / 16 * 16, 16, 1024);
  n = std::min(n, K);
  const int64_t n_tiles = (K + n - 1) / n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_tasks = std::min(threads, n_tiles);

  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  // per task: S (Rs x n), T (Rt x n), V tile, Vt tile (n x D each, when converted), dW (n x D)
  const int64_t per_task = (Rs + Rt) * n + (v_direct ? 0 : n * D) + (vt_direct ? 0 : n * D) +
                           (cfg.grad && !v_direct ? n * D : 0) + n;
  at::Tensor scratch = at::empty({n_tasks, per_task}, opts);
  at::Tensor dzs_parts = at::empty({cfg.grad ? n_tasks : 0, Rs * D}, opts);
  // running statistics (max, exp-sum) per (task, row) over the task's tiles, rows students
  // first then teachers; merged over the tasks in task order
  at::Tensor stats = at::empty({n_tasks, Rs + Rt, 2}, opts);
  A* st = stats.data_ptr<A>();
  std::vector<A> row_m(Rs + Rt), row_lz(Rs + Rt);

  // The logits of tile [k0, k0 + nk) of every row: S raw student logits, T raw teacher logits.
  auto tile_logits = [&](int64_t k0, int64_t nk, A* S, A* Tl, A* vbuf, A* vtbuf) -> const A* {
    const A* vp;
    if (v_direct) {
      vp = ptr<A>(in.v) + k0 * D;
    } else {
      load_rows<A>(in.v, k0 * D, nk * D, vbuf);
      vp = vbuf;
    }
    const A* vtp;
    if (vt_direct) {
      vtp = ptr<A>(in.vt) + k0 * D;
    } else {
      load_rows<A>(in.vt, k0 * D, nk * D, vtbuf);
      vtp = vtbuf;
    }
    gemm<A>(false, true, Rs, nk, D, A(1), in.zs, D, vp, D, A(0), S, nk);
    gemm<A>(false, true, Rt, nk, D, A(1), in.zt, D, vtp, D, A(0), Tl, nk);
    if (in.r) {
      const A* __restrict r = in.r + k0;
      for (int64_t i = 0; i < Rs; ++i) {
        A* __restrict x = S + i * nk;
#pragma omp simd
        for (int64_t k = 0; k < nk; ++k) x[k] *= r[k];
      }
    }
    if (in.rt) {
      const A* __restrict r = in.rt + k0;
      for (int64_t i = 0; i < Rt; ++i) {
        A* __restrict x = Tl + i * nk;
#pragma omp simd
        for (int64_t k = 0; k < nk; ++k) x[k] *= r[k];
      }
    }
    return vp;
  };

  auto task_buffers = [&](int64_t task, A*& S, A*& Tl, A*& vbuf, A*& vtbuf, A*& dW, A*& pex) {
    A* base = scratch.data_ptr<A>() + task * per_task;
    S = base;
    base += Rs * n;
    Tl = base;
    base += Rt * n;
    vbuf = v_direct ? nullptr : base;
    base += v_direct ? 0 : n * D;
    vtbuf = vt_direct ? nullptr : base;
    base += vt_direct ? 0 : n * D;
    dW = cfg.grad && !v_direct ? base : nullptr;  // fp32 / fp64 weights: dW is written into dv itself
    base += cfg.grad && !v_direct ? n * D : 0;
    pex = base;
  };

  // ---- pass 1: tile statistics and the teacher column sums
  parallel_for_ftz(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      A *S, *Tl, *vbuf, *vtbuf, *dW, *pex;
      task_buffers(task, S, Tl, vbuf, vtbuf, dW, pex);
      A* o = st + task * (Rs + Rt) * 2;
      for (int64_t i = 0; i < Rs + Rt; ++i) {
        o[2 * i] = -std::numeric_limits<A>::infinity();
        o[2 * i + 1] = 0;
      }
      for (int64_t j = task * n_tiles / n_tasks; j < (task + 1) * n_tiles / n_tasks; ++j) {
        const int64_t k0 = j * n, nk = std::min(n, K - k0);
        tile_logits(k0, nk, S, Tl, vbuf, vtbuf);
        for (int64_t i = 0; i < Rs + Rt; ++i) {
          A mj, zj;
          if (i < Rs) tile_stats<A>(S + i * nk, nullptr, nk, inv_ts, mj, zj);
          else tile_stats<A>(Tl + (i - Rs) * nk, in.c + k0, nk, inv_tt, mj, zj);
          merge_stats<A>(o[2 * i], o[2 * i + 1], mj, zj, i < Rs ? inv_ts : inv_tt);
        }
        if (colsum_out) {
          A* __restrict cs = colsum_out + k0;
          std::fill(cs, cs + nk, A(0));
          for (int64_t i = 0; i < Rt; ++i) {
            const A* __restrict x = Tl + i * nk;
#pragma omp simd
            for (int64_t k = 0; k < nk; ++k) cs[k] += x[k];
          }
        }
      }
    }
  });
  // merge the tile statistics of each row, in tile order
  parallel_for_ftz(0, Rs + Rt, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const A inv = i < Rs ? inv_ts : inv_tt;
      A m = st[2 * i], z = st[2 * i + 1];
      for (int64_t t = 1; t < n_tasks; ++t) {
        const A* o = st + (t * (Rs + Rt) + i) * 2;
        merge_stats<A>(m, z, o[0], o[1], inv);
      }
      row_m[i] = m;
      row_lz[i] = m != m ? nan : std::log(z);
    }
  });

  // ---- pass 2: probabilities, loss dots, G, dW tile (-> dv, dg), dzs
  std::vector<double> partial(n_tiles, 0.0);
  parallel_for_ftz(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      A *S, *Tl, *vbuf, *vtbuf, *dW, *pex;
      task_buffers(task, S, Tl, vbuf, vtbuf, dW, pex);
      A* dzs_acc = cfg.grad ? dzs_parts.data_ptr<A>() + task * Rs * D : nullptr;
      if (dzs_acc) std::fill(dzs_acc, dzs_acc + Rs * D, A(0));
      for (int64_t j = task * n_tiles / n_tasks; j < (task + 1) * n_tiles / n_tasks; ++j) {
        const int64_t k0 = j * n, nk = std::min(n, K - k0);
        const A* vp = tile_logits(k0, nk, S, Tl, vbuf, vtbuf);
        // teacher probabilities in place
        for (int64_t i = 0; i < Rt; ++i) {
          A* __restrict x = Tl + i * nk;
          const A* __restrict c = in.c + k0;
          const A m = row_m[Rs + i], lz = row_lz[Rs + i];
#pragma omp simd
          for (int64_t k = 0; k < nk; ++k) x[k] = exp_fast((x[k] - c[k] - m) * inv_tt - lz);
        }
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          const A wb = static_cast<A>(cfg.scale) * (in.w ? in.w[b] : A(1));
          int64_t built_for = -2;
          for (int64_t v = 0; v < V; ++v) {
            const int64_t excl = (cfg.skip && v < T) ? v : -1;
            const int64_t n_v = excl >= 0 ? T - 1 : T;
            const int64_t row = v * B + b;
            A* __restrict x = S + row * nk;
            if (n_v == 0) {
              if (cfg.grad) std::fill(x, x + nk, A(0));
              continue;
            }
            if (built_for != excl) {
              std::fill(pex, pex + nk, A(0));
              for (int64_t q = 0; q < T; ++q) {
                if (q == excl) continue;
                const A* __restrict p = Tl + (q * B + b) * nk;
#pragma omp simd
                for (int64_t k = 0; k < nk; ++k) pex[k] += p[k];
              }
              built_for = excl;
            }
            const A m = row_m[row], lz = row_lz[row];
            A dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t k = 0; k < nk; ++k) dot += pex[k] * (x[k] - m);
            acc -= static_cast<double>(wb) * static_cast<double>(dot) * static_cast<double>(inv_ts);
            if (cfg.grad) {
              const A gs = wb * inv_ts, nv = static_cast<A>(n_v);
              const A* __restrict pe = pex;
#pragma omp simd
              for (int64_t k = 0; k < nk; ++k) x[k] = gs * (nv * exp_fast((x[k] - m) * inv_ts - lz) - pe[k]);
            }
          }
        }
        partial[j] = acc;
        if (!cfg.grad) continue;
        // dW tile = G^T zs (nk x D), then the weight-norm backward per prototype
        if (v_direct) dW = ptr<A>(dv) + k0 * D;
        gemm<A>(true, false, nk, D, Rs, A(1), S, nk, in.zs, D, A(0), dW, D);
        for (int64_t k = 0; k < nk; ++k) {
          A* __restrict u = dW + k * D;
          if (in.r) {
            const A* __restrict vk = vp + k * D;
            A d = 0;
#pragma omp simd reduction(+ : d)
            for (int64_t e = 0; e < D; ++e) d += u[e] * vk[e];
            const A invn = in.inv_norm[k0 + k], r = in.r[k0 + k];
            if (dg_out) dg_out[k0 + k] = d * invn;
            const A a = r * d * invn * invn;
#pragma omp simd
            for (int64_t e = 0; e < D; ++e) u[e] = r * u[e] - a * vk[e];
          }
        }
        if (!v_direct) store_rows<A>(dv, k0 * D, nk * D, dW);
        if (in.r) {
          const A* __restrict r = in.r + k0;
          for (int64_t i = 0; i < Rs; ++i) {
            A* __restrict x = S + i * nk;
#pragma omp simd
            for (int64_t k = 0; k < nk; ++k) x[k] *= r[k];
          }
        }
        gemm<A>(false, false, Rs, D, nk, A(1), S, nk, vp, D, A(1), dzs_acc, D);
      }
    }
  });
  if (cfg.grad) {
    parallel_for_ftz(0, Rs, 16, [&](int64_t lo, int64_t hi) {
      A* __restrict dst = dzs_out + lo * D;
      const int64_t cnt = (hi - lo) * D;
      std::copy(dzs_parts.data_ptr<A>() + lo * D, dzs_parts.data_ptr<A>() + lo * D + cnt, dst);
      for (int64_t t = 1; t < n_tasks; ++t) {
        const A* __restrict src = dzs_parts.data_ptr<A>() + t * Rs * D + lo * D;
#pragma omp simd
        for (int64_t e = 0; e < cnt; ++e) dst[e] += src[e];
      }
    });
  }
  // log-normaliser terms: n_v per student row, once for the whole row
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const double wb = cfg.scale * (in.w ? static_cast<double>(in.w[b]) : 1.0);
    for (int64_t v = 0; v < V; ++v) {
      const int64_t n_v = (cfg.skip && v < T) ? T - 1 : T;
      if (n_v) total += wb * static_cast<double>(n_v) * static_cast<double>(row_lz[v * B + b]);
    }
  }
  for (double p : partial) total += p;  // fixed order: deterministic for a thread count
  *loss_out = static_cast<A>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
    const std::optional<at::Tensor>& gain, const at::Tensor& teacher_weight,
    const std::optional<at::Tensor>& teacher_gain, const at::Tensor& center, const std::optional<at::Tensor>& weights,
    double scale, double student_temp, double teacher_temp, int64_t n_student_views, int64_t n_teacher_views,
    bool skip_same_view, bool compute_grad, bool gain_grad, bool center_sum) {
  const char* op = "sslkern.prototype_loss";
  for (const at::Tensor* t : {&student, &teacher, &weight, &teacher_weight, &center}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU");
  }
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && weight.dim() == 2 && teacher_weight.dim() == 2, op,
              ": student, teacher, weight and teacher_weight must be 2-D");
  const int64_t D = student.size(1), K = weight.size(0);
  TORCH_CHECK(teacher.size(1) == D && weight.size(1) == D && teacher_weight.size(1) == D, op,
              ": student, teacher, weight and teacher_weight must have ", D, " columns");
  TORCH_CHECK(teacher_weight.size(0) == K, op, ": teacher_weight must have ", K, " rows");
  TORCH_CHECK(center.numel() == K, op, ": center must have ", K, " elements");
  TORCH_CHECK(n_student_views > 0 && n_teacher_views > 0, op, ": view counts must be positive");
  TORCH_CHECK(student.size(0) % n_student_views == 0, op, ": student rows not divisible by the views");
  const int64_t B = student.size(0) / n_student_views;
  TORCH_CHECK(teacher.size(0) == n_teacher_views * B, op, ": teacher must have ", n_teacher_views * B, " rows");
  TORCH_CHECK(student_temp > 0 && teacher_temp > 0, op, ": temperatures must be positive");
  TORCH_CHECK(K * D < (int64_t(1) << 31) && student.size(0) * D < (int64_t(1) << 31) &&
                  teacher.size(0) * D < (int64_t(1) << 31),
              op, ": sizes beyond 32-bit BLAS indexing");
  const bool has_gain = gain.has_value() && gain->defined();
  const bool has_tgain = teacher_gain.has_value() && teacher_gain->defined();
  TORCH_CHECK(!has_gain || gain->numel() == K, op, ": gain must have ", K, " elements");
  TORCH_CHECK(!has_tgain || teacher_gain->numel() == K, op, ": teacher_gain must have ", K, " elements");
  TORCH_CHECK(!gain_grad || has_gain, op, ": gain_grad needs a gain");
  const bool dbl = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ||
                   weight.scalar_type() == at::kDouble || teacher_weight.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  const auto aopt = student.options().dtype(acc);
  at::Tensor zs = student.to(acc).contiguous(), zt = teacher.to(acc).contiguous();
  at::Tensor v = weight.contiguous(), vt = teacher_weight.contiguous();
  at::Tensor c = center.to(acc).contiguous().reshape({K});
  at::Tensor w;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->numel() == B, op, ": weights must have ", B, " elements");
    w = weights->to(acc).contiguous();
  }
  // r = g / ||v|| (and 1 / ||v|| for the backward) for the weight-normalised layers
  at::Tensor inv_norm, r, rt;
  if (has_gain) {
    inv_norm = dbl ? row_inv_norms<double>(v, acc) : row_inv_norms<float>(v, acc);
    r = (gain->to(acc).reshape({K}) * inv_norm).contiguous();
  }
  if (has_tgain) {
    rt = (teacher_gain->to(acc).reshape({K}) * (dbl ? row_inv_norms<double>(vt, acc) : row_inv_norms<float>(vt, acc)))
             .contiguous();
  }
  at::Tensor loss = at::zeros({}, aopt);
  at::Tensor dzs = compute_grad ? at::empty({student.size(0), D}, aopt) : at::empty({0}, aopt);
  at::Tensor dv = compute_grad ? at::empty({K, D}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor dg = gain_grad && compute_grad ? at::empty({K}, aopt) : at::empty({0}, aopt);
  at::Tensor csum = center_sum ? at::zeros({K}, aopt) : at::empty({0}, aopt);
  if (B > 0 && K > 0 && D > 0) {
    Config cfg{B, K, D, n_student_views, n_teacher_views, skip_same_view, compute_grad, gain_grad && compute_grad,
               center_sum, scale, student_temp, teacher_temp};
    auto run = [&](auto tag) {
      using A = decltype(tag);
      Tensors<A> in{ptr<A>(zs), ptr<A>(zt), v, vt, has_gain ? ptr<A>(r) : nullptr, has_tgain ? ptr<A>(rt) : nullptr,
                    has_gain ? ptr<A>(inv_norm) : nullptr, ptr<A>(c), w.defined() ? ptr<A>(w) : nullptr};
      prototype_loss_kernel<A>(cfg, in, ptr<A>(loss), compute_grad ? ptr<A>(dzs) : nullptr, dv,
                               cfg.gain_grad ? ptr<A>(dg) : nullptr, center_sum ? ptr<A>(csum) : nullptr);
    };
    if (dbl) run(double{}); else run(float{});
  } else if (compute_grad) {
    dzs.zero_();
    dv.zero_();
    dg.zero_();
  }
  if (compute_grad) dzs = dzs.to(student.scalar_type());
  if (gain_grad && compute_grad) dg = dg.to(gain->scalar_type()).reshape(gain->sizes());
  return {loss, dzs, dv, dg, csum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("prototype_loss_cpu(Tensor student, Tensor teacher, Tensor weight, Tensor? gain, Tensor teacher_weight, "
        "Tensor? teacher_gain, Tensor center, Tensor? weights, float scale, float student_temp, float teacher_temp, "
        "int n_student_views, int n_teacher_views, bool skip_same_view, bool compute_grad, bool gain_grad, "
        "bool center_sum) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &prototype_loss_cpu);
}

}  // namespace sslkern
