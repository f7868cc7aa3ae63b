// info_nce_loss — InfoNCE / NT-Xent contrastive loss and its gradients, C++ CPU kernel.
//
// Rows q (N x D), columns k (M x D), s_ij = q_i·k_j·inv_temp, one positive pos[i] and
// optionally one excluded column exclude[i] (-1 = none) per row:
//   loss = 1/N sum_i (lse_i - s_i,pos[i]),  lse_i = log sum_{j != exclude[i]} exp(s_ij)
//   G = (P - onehot(pos)) · inv_temp / N,   P_ij = exp(s_ij - lse_i) (0 at the excluded column)
//   dq = G·K,  dk = Gᵀ·Q
// The (N x M) logits are never stored: the rows are split into blocks of BQ rows; a task
// forms one block's logits S (BQ x M, one BLAS product), takes the row statistics and turns
// S into G in place (one vectorized pass: max, exp and sum, scale), then dq of its rows
// (G·K) and its share of dk (Gᵀ·Q_block, accumulated in a per-task (M x D) buffer; the
// buffers are added in a fixed order at the end). Three tile products in all — the eager
// code's three matmuls — and nothing of size N x M: extra memory O((threads·BQ + M)·D +
// threads·BQ·M) with BQ·M capped at 2^22 elements per task.
// The tile products run single-threaded inside the tasks (ATen's parallel_for). fp16 / bf16
// inputs are converted to fp32 copies first; fp64 runs in fp64. The exponential is
// exp_fast (common.h): exact 0 below exp(-87), so no float32 subnormal ever enters G.
// RINCE (rince_q > 0; chingyaoc/RINCE): the row loss is ((lam·Z_i)^q − exp(q·s_pos))/q with
// Z_i the row's sum of exp (lse_i = log Z_i), evaluated as exp(q·s_pos)·expm1(q·(log lam + lse_i
// − s_pos))/q in double from the row statistics, never from an exp of a logit; the gradient row
// is (w_i·P_i − u_i·onehot(pos))·inv_temp/N with w_i = (lam·Z_i)^q, u_i = exp(q·s_pos): the same
// pass with another scale of the row and another weight on the positive. rince_q = 0: InfoNCE
// (+ log lam, the q → 0 limit).
// As alibi_attention.cpp: without -fno-trapping-math gcc does not if-convert exp_fast's clamps
// on AVX2, and the exp loops stay scalar. Set for this file only, before any include. Results
// unchanged (no FP exception flags are read here).
#pragma GCC optimize("no-trapping-math")
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "blas.h"

namespace sslkern {
namespace {

// Elements of one task's logits block (BQ x M): 16 MiB of fp32.
constexpr int64_t kBlockElems = int64_t(1) << 22;
constexpr int64_t kMaxBQ = 256, kMinBQ = 16;

template <typename A>
A row_max(const A* __restrict s, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] = exp(s[j] - m); returns the sum.
template <typename A>
A exp_sum(A* __restrict s, int64_t n, A m) {
  A z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) {
    const A e = exp_fast(s[j] - m);
    s[j] = e;
    z += e;
  }
  return z;
}

// s[j] *= a, results below the smallest normal number flushed to 0: exp_fast keeps P normal
// or 0, and this keeps G = P·inv_temp/(N·Z) normal or 0 (the tile products never see a subnormal).
template <typename A>
void scale_row(A* __restrict s, int64_t n, A a) {
  const A tiny = std::numeric_limits<A>::min();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const A v = s[j] * a;
    s[j] = v < tiny ? A(0) : v;
  }
}

// dst (rows x D) += parts[t] for t < n_parts, each part rows x D, summed in task order (so the
// result is deterministic for a thread count); rows are split across threads.
template <typename A>
void add_task_buffers(A* __restrict dst, const A* __restrict parts, int64_t n_parts, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    const int64_t n = (hi - lo) * D;
    for (int64_t t = 0; t < n_parts; ++t) {
      const A* __restrict src = parts + t * rows * D + lo * D;
      A* __restrict out = dst + lo * D;
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) out[e] += src[e];
    }
  });
}

// The robust (RINCE) form's per-row pieces, in double; q = 0 is InfoNCE.
struct RowLoss {
  double q, log_lam;
  bool robust() const { return q > 0; }
  // the row's loss from its log-sum-exp and positive logit (log lam is added once, by the caller, for q = 0)
  double loss(double lse, double s_pos) const {
    if (!robust()) return lse - s_pos;
    return std::exp(q * s_pos) * std::expm1(q * (log_lam + lse - s_pos)) / q;
  }
  // log w_i: exp(s − (lse − log_w)) = w_i·P_i
  double log_w(double lse) const { return robust() ? q * (log_lam + lse) : 0.0; }
  // u_i, the weight of the positive's one-hot
  double pos_weight(double s_pos) const { return robust() ? std::exp(q * s_pos) : 1.0; }
  double finish(double mean) const { return robust() ? mean : mean + log_lam; }
};

// q, k: contiguous (N x D), (M x D) in the compute type A. dq: N x D (or null), dk: M x D
// (or null), both A. Returns the loss.
template <typename A>
double info_nce_impl(const A* q, const A* k, int64_t N, int64_t M, int64_t D, const int64_t* pos,
                     const int64_t* excl, A inv_temp, A* dq, A* dk, const RowLoss& rl) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t bq = std::clamp<int64_t>(kBlockElems / std::max<int64_t>(M, 1), kMinBQ, kMaxBQ);
  bq = std::min(bq, (N + threads - 1) / threads);  // every thread gets a block
  bq = std::max<int64_t>(1, bq);
  const int64_t n_blocks = (N + bq - 1) / bq;
  const int64_t n_tasks = std::min(threads, n_blocks);
  const bool need_grad = dq != nullptr || dk != nullptr;
  std::vector<double> partial(n_blocks, 0.0);
  // Scratch as ATen tensors (so memory profilers see it): one logits block per task, and a
  // dk buffer per task but the first, which accumulates into dk itself.
  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  at::Tensor S_all = at::empty({n_tasks, bq * M}, opts);
  at::Tensor dk_parts = at::empty({dk ? n_tasks - 1 : 0, M * D}, opts);
  const A g_scale = inv_temp / static_cast<A>(N);
  at::parallel_for(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      A* S = S_all.data_ptr<A>() + task * bq * M;
      A* dk_acc = nullptr;
      if (dk) {
        dk_acc = task == 0 ? dk : dk_parts.data_ptr<A>() + (task - 1) * M * D;
        std::fill(dk_acc, dk_acc + M * D, A(0));
      }
      const int64_t b0 = task * n_blocks / n_tasks, b1 = (task + 1) * n_blocks / n_tasks;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * bq, nr = std::min(bq, N - r0);
        const A* qb = q + r0 * D;
        gemm<A>(false, true, nr, M, D, inv_temp, qb, D, k, D, A(0), S, M);
        double acc = 0.0;
        for (int64_t i = 0; i < nr; ++i) {
          A* s = S + i * M;
          const int64_t p = pos[r0 + i];
          const int64_t x = excl ? excl[r0 + i] : -1;
          const A s_pos = s[p];
          if (x >= 0) s[x] = -std::numeric_limits<A>::infinity();
          const A m = row_max(s, M);
          if (!need_grad) {
            A z = 0;
#pragma omp simd reduction(+ : z)
            for (int64_t j = 0; j < M; ++j) z += exp_fast(s[j] - m);
            acc += rl.loss(static_cast<double>(m) + std::log(static_cast<double>(z)), static_cast<double>(s_pos));
            continue;
          }
          const A z = exp_sum(s, M, m);
          if (!rl.robust()) {
            acc += static_cast<double>(m) + std::log(static_cast<double>(z)) - static_cast<double>(s_pos);
            scale_row(s, M, g_scale / z);
            s[p] -= g_scale;
            continue;
          }
          const double log_z = std::log(static_cast<double>(z)), lse = static_cast<double>(m) + log_z;
          acc += rl.loss(lse, static_cast<double>(s_pos));
          scale_row(s, M, static_cast<A>(static_cast<double>(g_scale) * std::exp(rl.log_w(lse) - log_z)));
          s[p] -= static_cast<A>(static_cast<double>(g_scale) * rl.pos_weight(static_cast<double>(s_pos)));
        }
        partial[blk] = acc;
        if (dq) gemm<A>(false, false, nr, D, M, A(1), S, M, k, D, A(0), dq + r0 * D, D);
        if (dk) gemm<A>(true, false, M, D, nr, A(1), S, M, qb, D, A(1), dk_acc, D);
      }
    }
  });
  if (dk && n_tasks > 1) add_task_buffers(dk, dk_parts.data_ptr<A>(), n_tasks - 1, M, D);  // in task order
  double total = 0.0;
  for (double v : partial) total += v;  // fixed order: deterministic for a thread count
  return rl.finish(total / static_cast<double>(N));
}


// The tied form (k is q: SimCLR NT-Xent over the 2n views Z, no exclusion or each row's own
// column excluded). S = Z·Zᵀ/τ is symmetric, so the kernel walks only the tiles (I, J ≥ I)
// of row blocks, each formed once per pass:
//   pass 1: row statistics. A tile gives its rows' (max, sum of exp) row-wise and, off the
//           diagonal, the rows of J column-wise; partial statistics are merged per task and
//           then across tasks (log-sum-exp merge).
//   pass 2: the total gradient dZ = G·Z + Gᵀ·Z. With H_ij = exp(S_ij − lse_j)·c the
//           transpose of G's (J, I) block, A = G_IJ + H holds both, and
//           dZ_I += A·Z_J,  dZ_J += Aᵀ·Z_I (J ≠ I).
// Half the logits products of the untied form and one gradient product instead of two:
// 2 N²D-products' worth of tile GEMMs in all against 3 (and against the eager code's 3:
// logits, then G·Z and Gᵀ·Z through autograd). Each element's exponential is taken twice
// per pass (row- and column-shifted); every task accumulates into its own dZ buffer, summed
// in task order (deterministic for a thread count).
constexpr int64_t kTiedBlock = 256;

template <typename A>
inline void lse_merge(A& m, A& z, A m2, A z2) {
  if (m2 == -std::numeric_limits<A>::infinity()) return;
  if (m2 != m2 || z2 != z2) {  // NaN rows stay NaN
    m = m2; z = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  if (m2 > m) {
    z = z * exp_fast(m - m2) + z2;
    m = m2;
  } else {
    z += z2 * exp_fast(m2 - m);
  }
}

template <typename A>
double info_nce_tied_impl(const A* z, int64_t N, int64_t D, const int64_t* pos, bool excl_self, A inv_temp, A* dz,
                          const RowLoss& rl) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bs = kTiedBlock, nb = (N + bs - 1) / bs;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = i; j < nb; ++j) tiles.emplace_back(i, j);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t n_tasks = std::min(threads, n_tiles);
  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const A ninf = -std::numeric_limits<A>::infinity();
  at::Tensor S_all = at::empty({n_tasks, bs * bs}, opts);
  at::Tensor stats = at::empty({n_tasks, 2, N}, opts);  // per task: max, sum
  // S = Z_I·Z_Jᵀ/τ for tile (I, J) into S (bi × bj, ld bj), own column excluded on the diagonal
  auto form = [&](int64_t I, int64_t J, A* S, int64_t& i0, int64_t& bi, int64_t& j0, int64_t& bj) {
    i0 = I * bs; bi = std::min(bs, N - i0); j0 = J * bs; bj = std::min(bs, N - j0);
    gemm<A>(false, true, bi, bj, D, inv_temp, z + i0 * D, D, z + j0 * D, D, A(0), S, bj);
    if (I == J && excl_self)
      for (int64_t i = 0; i < bi; ++i) S[i * bj + i] = ninf;
  };
  // tiles are dealt round-robin: task t takes t, t + n_tasks, ... (fixed for a thread count)
  at::parallel_for(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> cmax(bs), csum(bs);
    for (int64_t task = lo; task < hi; ++task) {
      A* S = S_all.data_ptr<A>() + task * bs * bs;
      A* m = stats.data_ptr<A>() + task * 2 * N;
      A* zs = m + N;
      std::fill(m, m + N, ninf);
      std::fill(zs, zs + N, A(0));
      for (int64_t t = task; t < n_tiles; t += n_tasks) {
        int64_t i0, bi, j0, bj;
        form(tiles[t].first, tiles[t].second, S, i0, bi, j0, bj);
        for (int64_t i = 0; i < bi; ++i) {
          const A* s = S + i * bj;
          const A mx = row_max(s, bj);
          if (mx == ninf) continue;
          A sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < bj; ++j) sum += exp_fast(s[j] - mx);
          lse_merge(m[i0 + i], zs[i0 + i], mx, sum);
        }
        if (i0 == j0) continue;
        std::fill(cmax.begin(), cmax.begin() + bj, ninf);
        std::fill(csum.begin(), csum.begin() + bj, A(0));
        A* __restrict cm = cmax.data();
        A* __restrict cs = csum.data();
        for (int64_t i = 0; i < bi; ++i) {
          const A* __restrict s = S + i * bj;
#pragma omp simd
          for (int64_t j = 0; j < bj; ++j) cm[j] = (s[j] > cm[j] || s[j] != s[j]) ? s[j] : cm[j];
        }
        for (int64_t i = 0; i < bi; ++i) {
          const A* __restrict s = S + i * bj;
#pragma omp simd
          for (int64_t j = 0; j < bj; ++j) cs[j] += exp_fast(s[j] - cm[j]);
        }
        for (int64_t j = 0; j < bj; ++j) lse_merge(m[j0 + j], zs[j0 + j], cm[j], cs[j]);
      }
    }
  });
  std::vector<A> lse(N);
  for (int64_t r = 0; r < N; ++r) {
    A mr = ninf, zr = 0;
    for (int64_t t = 0; t < n_tasks; ++t) {
      const A* m = stats.data_ptr<A>() + t * 2 * N;
      lse_merge(mr, zr, m[r], m[N + r]);
    }
    lse[r] = mr + std::log(zr);
  }
  // shift: exp(s − shift_i) = w_i·P_i (shift = lse for InfoNCE); pos_w: u_i (1 for InfoNCE)
  std::vector<A> shift(lse), pos_w(N, A(1));
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const A* a = z + i * D;
    const A* b = z + pos[i] * D;
    double dot = 0.0;
    for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(a[d]) * static_cast<double>(b[d]);
    const double s_pos = dot * static_cast<double>(inv_temp);
    total += rl.loss(static_cast<double>(lse[i]), s_pos);
    if (rl.robust()) {
      shift[i] = static_cast<A>(static_cast<double>(lse[i]) - rl.log_w(static_cast<double>(lse[i])));
      pos_w[i] = static_cast<A>(rl.pos_weight(s_pos));
    }
  }
  total = rl.finish(total / static_cast<double>(N));
  if (dz == nullptr) return total;

  const A c = inv_temp / static_cast<A>(N);
  const A tiny = std::numeric_limits<A>::min();
  at::Tensor dz_parts = at::empty({n_tasks - 1, N * D}, opts);
  at::parallel_for(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      A* S = S_all.data_ptr<A>() + task * bs * bs;
      A* acc = task == 0 ? dz : dz_parts.data_ptr<A>() + (task - 1) * N * D;
      std::fill(acc, acc + N * D, A(0));
      for (int64_t t = task; t < n_tiles; t += n_tasks) {
        int64_t i0, bi, j0, bj;
        form(tiles[t].first, tiles[t].second, S, i0, bi, j0, bj);
        const A* __restrict lj = shift.data() + j0;
        for (int64_t i = 0; i < bi; ++i) {
          A* __restrict s = S + i * bj;
          const A li = shift[i0 + i];
#pragma omp simd
          for (int64_t j = 0; j < bj; ++j) {
            const A v = c * (exp_fast(s[j] - li) + exp_fast(s[j] - lj[j]));
            s[j] = v < tiny ? A(0) : v;
          }
        }
        for (int64_t i = 0; i < bi; ++i) {  // the positives: G's one-hot rows and Gᵀ's columns
          const int64_t p = pos[i0 + i];
          if (p >= j0 && p < j0 + bj) S[i * bj + (p - j0)] -= c * pos_w[i0 + i];
        }
        for (int64_t j = 0; j < bj; ++j) {
          const int64_t p = pos[j0 + j];
          if (p >= i0 && p < i0 + bi) S[(p - i0) * bj + j] -= c * pos_w[j0 + j];
        }
        gemm<A>(false, false, bi, D, bj, A(1), S, bj, z + j0 * D, D, A(1), acc + i0 * D, D);
        if (i0 != j0) gemm<A>(true, false, bj, D, bi, A(1), S, bj, z + i0 * D, D, A(1), acc + j0 * D, D);
      }
    }
  });
  if (n_tasks > 1) add_task_buffers(dz, dz_parts.data_ptr<A>(), n_tasks - 1, N, D);
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_loss_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& pos,
                                                                 const std::optional<at::Tensor>& exclude,
                                                                 double inv_temp, bool grad_q, bool grad_k,
                                                                 bool tied, double rince_q, double rince_lam) {
  // every index is checked here (the op's Dispatch declares it: no front-door pass on CPU)
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "sslkern.info_nce_loss: q and k must be CPU tensors");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "sslkern.info_nce_loss: q and k must be 2-D, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "sslkern.info_nce_loss: q and k must have one dtype");
  const int64_t N = q.size(0), D = q.size(1), M = k.size(0);
  TORCH_CHECK(!tied || q.sizes() == k.sizes(), "sslkern.info_nce_loss: tied=True expected k to be q itself, got shapes ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(1) == D, "sslkern.info_nce_loss: k expected ", D, " columns (q's D), got ", k.sizes());
  TORCH_CHECK(N > 0 && M > 0 && D > 0, "sslkern.info_nce_loss: q and k must be non-empty");
  TORCH_CHECK(M * D < (int64_t(1) << 31) && N * D < (int64_t(1) << 31) && M < (int64_t(1) << 31),
              "sslkern.info_nce_loss: sizes beyond 32-bit BLAS indexing");
  TORCH_CHECK(inv_temp > 0 && std::isfinite(inv_temp), "sslkern.info_nce_loss: temperature must be positive");
  TORCH_CHECK(rince_q >= 0 && std::isfinite(rince_q) && rince_lam > 0 && std::isfinite(rince_lam),
              "sslkern.info_nce_loss: rince expected q >= 0 and lambda > 0 (finite), got q = ", rince_q, ", lambda = ",
              rince_lam);
  const RowLoss rl{rince_q, std::log(rince_lam)};
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == N,
              "sslkern.info_nce_loss: pos must be a CPU int64 tensor of shape (", N, ",)");
  at::Tensor pos_c = pos.contiguous();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  at::Tensor ex_c;
  const int64_t* xp = nullptr;
  if (exclude.has_value() && exclude->defined()) {
    TORCH_CHECK(exclude->device().is_cpu() && exclude->scalar_type() == at::kLong && exclude->dim() == 1 &&
                    exclude->size(0) == N,
                "sslkern.info_nce_loss: exclude must be a CPU int64 tensor of shape (", N, ",)");
    ex_c = exclude->contiguous();
    xp = ex_c.data_ptr<int64_t>();
  }
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_INDEX(pp[i] >= 0 && pp[i] < M, "sslkern.info_nce_loss: pos expected values in [0, ", M,
                      ") (column indices of k), got pos[", i, "] = ", pp[i]);
    if (xp) {
      TORCH_CHECK_INDEX(xp[i] >= -1 && xp[i] < M, "sslkern.info_nce_loss: exclude expected values in [-1, ", M,
                        ") (column indices of k, -1 = none), got exclude[", i, "] = ", xp[i]);
      TORCH_CHECK(xp[i] != pp[i], "sslkern.info_nce_loss: exclude expected a column other than the positive, got ",
                  "exclude[", i, "] = pos[", i, "] = ", pp[i]);
    }
  }
  const bool dbl = q.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  if (tied) {
    // k is q: one gradient, returned as dq (d loss / d q with k tied to q); dk is empty.
    // Only k's shape is checked (the columns are read from q): opcheck and tracing may pass
    // a copy of q as k.
    TORCH_CHECK(grad_q == grad_k, "sslkern.info_nce_loss: tied=True expected grad_q == grad_k");
    bool excl_self = false;
    if (xp) {
      excl_self = true;
      for (int64_t i = 0; i < N; ++i)
        TORCH_CHECK(xp[i] == i, "sslkern.info_nce_loss: tied=True expected exclude[i] = i (each row's own column) "
                                "or no exclude, got exclude[", i, "] = ", xp[i]);
    }
    at::Tensor za = q.to(acc).contiguous();
    at::Tensor dz = grad_q ? empty_output(q.sizes(), q.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous))
                           : at::empty({0}, q.options());
    at::Tensor loss = at::empty({}, q.options().dtype(acc));
    if (dbl) {
      loss.fill_(info_nce_tied_impl<double>(za.data_ptr<double>(), N, D, pp, excl_self, inv_temp,
                                            grad_q ? dz.data_ptr<double>() : nullptr, rl));
    } else {
      loss.fill_(info_nce_tied_impl<float>(za.data_ptr<float>(), N, D, pp, excl_self, static_cast<float>(inv_temp),
                                           grad_q ? dz.data_ptr<float>() : nullptr, rl));
    }
    if (grad_q && q.scalar_type() != acc) dz = dz.to(q.scalar_type());
    return {loss, dz, at::empty({0}, k.options())};
  }
  const bool direct = q.scalar_type() == acc;  // fp32 / fp64: outputs written in place
  at::Tensor qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous();
  auto grad_buf = [&](bool want, const at::Tensor& like) {
    if (!want) return at::empty({0}, like.options());
    return empty_output(like.sizes(), like.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  };
  at::Tensor dq = grad_buf(grad_q, q), dk = grad_buf(grad_k, k);
  at::Tensor loss = at::empty({}, q.options().dtype(acc));
  if (dbl) {
    loss.fill_(info_nce_impl<double>(qa.data_ptr<double>(), ka.data_ptr<double>(), N, M, D, pp, xp, inv_temp,
                                     grad_q ? dq.data_ptr<double>() : nullptr, grad_k ? dk.data_ptr<double>() : nullptr,
                                     rl));
  } else {
    loss.fill_(info_nce_impl<float>(qa.data_ptr<float>(), ka.data_ptr<float>(), N, M, D, pp, xp,
                                    static_cast<float>(inv_temp), grad_q ? dq.data_ptr<float>() : nullptr,
                                    grad_k ? dk.data_ptr<float>() : nullptr, rl));
  }
  if (!direct) {
    if (grad_q) dq = dq.to(q.scalar_type());
    if (grad_k) dk = dk.to(k.scalar_type());
  }
  return {loss, dq, dk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("info_nce_loss_cpu(Tensor q, Tensor k, Tensor pos, Tensor? exclude, float inv_temp, bool grad_q, "
        "bool grad_k, bool tied, float rince_q, float rince_lam) -> (Tensor, Tensor, Tensor)",
        &info_nce_loss_cpu);
}

}  // namespace sslkern
