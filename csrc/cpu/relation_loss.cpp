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
// alpha = scale), takes the per-pair statistics in class-outer vector loops per tile row, and
// (backward) turns S into G = dℓ/dx in place, then dq_b += G_c·K_c (accumulated over tiles) and
// dk_b[tile] = G_cᵀ·Q_c. The labels come from the grid coordinates inside the pass; nothing of
// size (B, N, N) or (B, C, N, N) exists: extra memory is C·N·JT (+ 8·JT) per thread (JT = N up
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
void image_pass(const Problem<A>& P, int64_t b, A* S, int32_t* rj, int32_t* cj, A* work, int32_t* lab, int64_t jt,
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
        // class-outer loops over the tile row (each one a plain vector loop over jj): labels,
        // max and argmax, exp-sum, the label and mean logits, then the loss or G in place
        const int32_t ri = static_cast<int32_t>(pi / P.W), ci = static_cast<int32_t>(pi % P.W);
        const A one_minus = A(1) - P.smooth, s_over = P.smooth / A(kRel);
        A* __restrict m = work;
        A* __restrict z = work + nj;
        A* __restrict xy = work + 2 * nj;
        A* __restrict xs = work + 3 * nj;
        int32_t* __restrict y = lab;
        int32_t* __restrict am = lab + nj;
        const A* __restrict s0 = S + i * nj;
#pragma omp simd
        for (int64_t jj = 0; jj < nj; ++jj) {
          y[jj] = 3 * ((ri > rj[jj]) - (ri < rj[jj]) + 1) + ((ci > cj[jj]) - (ci < cj[jj]) + 1);
          m[jj] = s0[jj];
          am[jj] = 0;
          z[jj] = 0;
          xy[jj] = 0;
          xs[jj] = 0;
        }
        for (int c = 1; c < kRel; ++c) {
          const A* __restrict sc = S + c * N * nj + i * nj;
#pragma omp simd
          for (int64_t jj = 0; jj < nj; ++jj) {
            const bool gt = sc[jj] > m[jj];
            am[jj] = gt ? c : am[jj];
            m[jj] = gt ? sc[jj] : m[jj];
          }
        }
        for (int c = 0; c < kRel; ++c) {
          const A* __restrict sc = S + c * N * nj + i * nj;
#pragma omp simd
          for (int64_t jj = 0; jj < nj; ++jj) {
            const A x = sc[jj];
            z[jj] += exp_fast(x - m[jj]);
            xy[jj] += y[jj] == c ? x : A(0);
            xs[jj] += x;
          }
        }
        if (with_loss) {
          A row_loss = 0, row_hits = 0;
#pragma omp simd reduction(+ : row_loss, row_hits)
          for (int64_t jj = 0; jj < nj; ++jj) {
            row_loss += m[jj] + log_fast(z[jj]) - one_minus * xy[jj] - s_over * xs[jj];
            row_hits += am[jj] == y[jj] ? A(1) : A(0);
          }
          loss += static_cast<double>(row_loss);
          hits += static_cast<double>(row_hits);
        }
        if (backward) {
#pragma omp simd
          for (int64_t jj = 0; jj < nj; ++jj) z[jj] = gcoef / z[jj];
          const A g_smooth = gcoef * s_over, g_label = gcoef * one_minus;
          for (int c = 0; c < kRel; ++c) {
            A* __restrict sc = S + c * N * nj + i * nj;
#pragma omp simd
            for (int64_t jj = 0; jj < nj; ++jj)
              sc[jj] = exp_fast(sc[jj] - m[jj]) * z[jj] - g_smooth - (y[jj] == c ? g_label : A(0));
          }
        }
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
  at::Tensor idx_all = at::empty({threads, 4 * jt}, at::TensorOptions().dtype(at::kInt));  // rj, cj, y, argmax
  at::Tensor work_all = at::empty({threads, 4 * jt}, opts);                                  // m, z, x_y, sum x
  // one task per chunk of images, a scratch block per chunk (chunks = threads)
  parallel_for_ftz(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      A* S = S_all.data_ptr<A>() + t * C * N * jt;
      int32_t* rj = idx_all.data_ptr<int32_t>() + t * 4 * jt;
      A* work = work_all.data_ptr<A>() + t * 4 * jt;
      const int64_t b0 = t * P.B / threads, b1 = (t + 1) * P.B / threads;
      for (int64_t b = b0; b < b1; ++b)
        image_pass<A>(P, b, S, rj, rj + jt, work, rj + 2 * jt, jt, backward, with_loss, gcoef, dq, dk, lp[b], hp[b]);
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
