// cross_correlation_loss — Barlow Twins loss and its gradients, C++ CPU kernel; no (D x D) matrix.
//
// za, zb (N x D) are standardised per group of rows (mean, biased variance + eps) into ha, hb;
// c_i = Σ_n ha·hb / N is the diagonal of C = haᵀhb / N. For the rows R = [r0, r1) the kernel
// needs two (|R| x D) products of C,
//   P = ha[R]·C   (= K_a[R,:]·hb / N,  K_a = ha haᵀ)      Q = hb[R]·Cᵀ  (= K_b[R,:]·ha / N),
// from which, with δ_i = 2(c_i − 1) − 2λc_i,
//   G_a = ∂L/∂ha[R] = scale/N · (2λ·Q + hb[R]⊙δ),    G_b = ∂L/∂hb[R] = scale/N · (2λ·P + ha[R]⊙δ),
//   ‖C‖²_F = Σ_{n∈R} ⟨K_a[n], K_b[n]⟩/N² = Σ P⊙hb[R] / N   (R's share; all rows: the whole sum).
// Gram form: K_a[R,:], K_b[R,:] (|R| x N) by two GEMMs, then P and Q by two more. Tiled form: C in
// (bw x D) strips of rows I, S = ha[:, I]ᵀ·hb / N, then Q[:, I] = hb[R]·Sᵀ and P += ha[R, I]·S:
// every strip's products consume it at once, so no (D x D) tensor exists. The standardisation's
// backward, dz = rstd·(G − mean(G) − h·mean(G⊙h)) per group, follows in place (finish), or the
// caller gets G and the column sums to add across ranks first (see sslkern/ops/cross_correlation_loss.py).
// fp16 / bf16 inputs are converted to fp32 once; fp64 runs in fp64.
#include "redundancy.h"

#include <string>
#include <tuple>
#include <type_traits>

namespace sslkern {
namespace {

using namespace redundancy;

// Per group of m rows: mean, rstd = 1/sqrt(var + eps) (biased variance, two passes in double),
// h = (z − mean)·rstd; stat = [mean_a, rstd_a, mean_b, rstd_b] each (groups x D); c = Σ_n ha·hb.
template <typename A>
void standardize_pair(const A* za, const A* zb, int64_t N, int64_t D, int64_t groups, double eps, A* ha, A* hb,
                      A* stat, double* c) {
  const int64_t m = N / groups;
  for_column_chunks(D, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<double> s(w), s2(w);
    std::vector<A> mean(w), rstd(w);
    for (int v = 0; v < 2; ++v) {
      const A* z = v ? zb : za;
      A* h = v ? hb : ha;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = g * m, r1 = r0 + m;
        column_sum(z, D, r0, r1, c0, c1, s.data());
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t j = 0; j < w; ++j) s[j] /= static_cast<double>(m);
        for (int64_t n = r0; n < r1; ++n) {
          const A* __restrict row = z + n * D + c0;
          double* __restrict acc = s2.data();
          const double* __restrict mu = s.data();
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const double d = static_cast<double>(row[j]) - mu[j];
            acc[j] += d * d;
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          mean[j] = static_cast<A>(s[j]);
          rstd[j] = static_cast<A>(1.0 / std::sqrt(s2[j] / static_cast<double>(m) + eps));
          stat[((2 * v) * groups + g) * D + c0 + j] = mean[j];
          stat[((2 * v + 1) * groups + g) * D + c0 + j] = rstd[j];
        }
        for (int64_t n = r0; n < r1; ++n) {
          const A* __restrict row = z + n * D + c0;
          A* __restrict out = h + n * D + c0;
          const A* __restrict mu = mean.data();
          const A* __restrict rs = rstd.data();
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) out[j] = (row[j] - mu[j]) * rs[j];
        }
      }
    }
    double* __restrict cc = c + c0;
    std::fill(cc, cc + w, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const A* __restrict x = ha + n * D + c0;
      const A* __restrict y = hb + n * D + c0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) cc[j] += static_cast<double>(x[j]) * static_cast<double>(y[j]);
    }
  });
}

struct Outputs {
  double on = 0, sq = 0, tr = 0, tr2 = 0;
};

// P = ha[R]·C and Q = hb[R]·Cᵀ (either may be null: not needed) and, when R is every row, ‖C‖²_F
// (else 0: the caller takes R's share from P). Returns ‖C‖²_F or 0.
template <typename A>
double products(const A* ha, const A* hb, int64_t N, int64_t D, int64_t r0, int64_t r1, bool tiled, A* P, A* Q) {
  const int64_t nr = r1 - r0;
  const bool full = r0 == 0 && r1 == N;
  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  const A inv_n = A(1) / static_cast<A>(N);
  double sq = 0.0;
  if (!tiled) {
    at::Tensor ka = at::empty({nr, N}, opts), kb = at::empty({nr, N}, opts);
    gemm<A>(false, true, nr, N, D, A(1), ha + r0 * D, D, ha, D, A(0), ka.data_ptr<A>(), N);
    gemm<A>(false, true, nr, N, D, A(1), hb + r0 * D, D, hb, D, A(0), kb.data_ptr<A>(), N);
    if (full) sq = dot_rows(ka.data_ptr<A>(), kb.data_ptr<A>(), N, N) / (static_cast<double>(N) * N);
    if (P) gemm<A>(false, false, nr, D, N, inv_n, ka.data_ptr<A>(), N, hb, D, A(0), P, D);
    if (Q) gemm<A>(false, false, nr, D, N, inv_n, kb.data_ptr<A>(), N, ha, D, A(0), Q, D);
    return sq;
  }
  const int64_t sb = strip_width(D);
  at::Tensor strip = at::empty({sb, D}, opts);
  A* S = strip.data_ptr<A>();
  if (P) std::fill(P, P + nr * D, A(0));
  for (int64_t i0 = 0; i0 < D; i0 += sb) {
    const int64_t bw = std::min(sb, D - i0);
    gemm<A>(true, false, bw, D, N, inv_n, ha + i0, D, hb, D, A(0), S, D);  // C[I, :]
    if (full) sq += dot_rows(S, S, bw, D);
    if (Q) gemm<A>(false, true, nr, bw, D, A(1), hb + r0 * D, D, S, D, A(0), Q + i0, D);
    if (P) gemm<A>(false, false, nr, D, bw, A(1), ha + r0 * D + i0, D, S, D, A(1), P, D);
  }
  return sq;
}

// G = scale/N · (2λ·X + y[R]⊙δ), in place over X (|R| x D).
template <typename A>
void gradient_rows(A* X, const A* y, int64_t nr, int64_t D, const A* delta, A two_lambda, A coef) {
  at::parallel_for(0, nr, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      A* __restrict g = X + n * D;
      const A* __restrict yy = y + n * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) g[j] = coef * (two_lambda * g[j] + yy[j] * delta[j]);
    }
  });
}

// The standardisation's backward over whole groups of m rows in R: G (|R| x D, rows r0.., in
// place) becomes dz = rstd·(G − mean_g(G) − h·mean_g(G⊙h)); h = the standardised rows.
template <typename A>
void finish_groups(A* G, const A* h, const A* rstd_all, int64_t r0, int64_t nr, int64_t m, int64_t D) {
  const int64_t g0 = r0 / m, ng = nr / m;
  for_column_chunks(D, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<double> s1(w), s2(w);
    std::vector<A> a1(w), a2(w);
    for (int64_t g = 0; g < ng; ++g) {
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t n = g * m; n < (g + 1) * m; ++n) {
        const A* __restrict gr = G + n * D + c0;
        const A* __restrict hr = h + (r0 + n) * D + c0;
        double* __restrict p1 = s1.data();
        double* __restrict p2 = s2.data();
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          p1[j] += static_cast<double>(gr[j]);
          p2[j] += static_cast<double>(gr[j]) * static_cast<double>(hr[j]);
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        a1[j] = static_cast<A>(s1[j] / static_cast<double>(m));
        a2[j] = static_cast<A>(s2[j] / static_cast<double>(m));
      }
      const A* __restrict rs = rstd_all + (g0 + g) * D + c0;
      for (int64_t n = g * m; n < (g + 1) * m; ++n) {
        A* __restrict gr = G + n * D + c0;
        const A* __restrict hr = h + (r0 + n) * D + c0;
        const A* __restrict m1 = a1.data();
        const A* __restrict m2 = a2.data();
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) gr[j] = rs[j] * (gr[j] - m1[j] - hr[j] * m2[j]);
      }
    }
  });
}

// Column sums over R of G and G⊙h (for the caller's reduction across ranks), into out0, out1.
template <typename A>
void backward_sums(const A* G, const A* h, int64_t r0, int64_t nr, int64_t D, A* out0, A* out1) {
  for_column_chunks(D, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<double> s1(w, 0.0), s2(w, 0.0);
    for (int64_t n = 0; n < nr; ++n) {
      const A* __restrict gr = G + n * D + c0;
      const A* __restrict hr = h + (r0 + n) * D + c0;
      double* __restrict p1 = s1.data();
      double* __restrict p2 = s2.data();
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        p1[j] += static_cast<double>(gr[j]);
        p2[j] += static_cast<double>(gr[j]) * static_cast<double>(hr[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      out0[c0 + j] = static_cast<A>(s1[j]);
      out1[c0 + j] = static_cast<A>(s2[j]);
    }
  });
}

template <typename A>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> barlow_impl(
    const at::Tensor& za_in, const at::Tensor& zb_in, double lambd, double scale, double eps, int64_t groups,
    int64_t r0, int64_t r1, bool finish, bool tiled, bool grad_a, bool grad_b) {
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const auto opts = za_in.options().dtype(acc);
  const at::Tensor za = za_in.to(acc).contiguous(), zb = zb_in.to(acc).contiguous();
  const int64_t N = za.size(0), D = za.size(1), nr = r1 - r0, m = N / groups;
  const bool full = r0 == 0 && r1 == N;
  at::Tensor ha = at::empty({N, D}, opts), hb = at::empty({N, D}, opts);
  at::Tensor stat = at::empty({4, groups, D}, opts);
  std::vector<double> c(D);
  standardize_pair<A>(za.data_ptr<A>(), zb.data_ptr<A>(), N, D, groups, eps, ha.data_ptr<A>(), hb.data_ptr<A>(),
                      stat.data_ptr<A>(), c.data());
  Outputs o;
  std::vector<A> delta(D);
  for (int64_t i = 0; i < D; ++i) {
    const double ci = c[i] / static_cast<double>(N);
    o.on += (1.0 - ci) * (1.0 - ci);
    o.tr += ci;
    o.tr2 += ci * ci;
    delta[i] = static_cast<A>(2.0 * (ci - 1.0) - 2.0 * lambd * ci);
  }
  // P feeds G_b and, for a share of the rows, ‖C‖²; Q feeds G_a
  const bool need_p = grad_b || !full, need_q = grad_a;
  auto buf = [&](bool want) { return want ? empty_output({nr, D}, opts) : at::empty({0}, opts); };
  at::Tensor P = buf(need_p), Q = buf(need_q);
  A* hap = ha.data_ptr<A>();
  A* hbp = hb.data_ptr<A>();
  o.sq = products<A>(hap, hbp, N, D, r0, r1, tiled, need_p ? P.data_ptr<A>() : nullptr,
                     need_q ? Q.data_ptr<A>() : nullptr);
  if (!full) o.sq = dot_rows(P.data_ptr<A>(), hbp + r0 * D, nr, D) / static_cast<double>(N);
  const double frac = static_cast<double>(nr) / static_cast<double>(N);
  at::Tensor loss = at::empty({}, opts);
  loss.fill_(scale * (frac * (o.on - lambd * o.tr2) + lambd * o.sq));
  at::Tensor stats = at::empty({4}, opts);
  {
    auto s = stats.accessor<A, 1>();
    s[0] = static_cast<A>(o.on); s[1] = static_cast<A>(o.sq); s[2] = static_cast<A>(o.tr); s[3] = static_cast<A>(o.tr2);
  }
  const auto gdt = finish ? za_in.scalar_type() : acc;
  at::Tensor empty = at::empty({0}, za_in.options().dtype(gdt));
  if (!grad_a && !grad_b) return {loss, empty, at::empty({0}, za_in.options().dtype(gdt)), stats, at::empty({0}, opts)};
  const A coef = static_cast<A>(scale / static_cast<double>(N)), two_lambda = static_cast<A>(2.0 * lambd);
  if (grad_a) gradient_rows<A>(Q.data_ptr<A>(), hbp + r0 * D, nr, D, delta.data(), two_lambda, coef);
  if (grad_b) gradient_rows<A>(P.data_ptr<A>(), hap + r0 * D, nr, D, delta.data(), two_lambda, coef);
  const A* st = stat.data_ptr<A>();
  if (!finish) {  // groups == 1: G and the column sums for the caller's reduction
    at::Tensor sums = at::zeros({8, D}, opts);
    A* sp = sums.data_ptr<A>();
    if (grad_a) backward_sums<A>(Q.data_ptr<A>(), hap, r0, nr, D, sp, sp + D);
    if (grad_b) backward_sums<A>(P.data_ptr<A>(), hbp, r0, nr, D, sp + 2 * D, sp + 3 * D);
    for (int k = 0; k < 4; ++k) std::copy(st + k * D, st + (k + 1) * D, sp + (4 + k) * D);  // groups == 1
    return {loss, grad_a ? Q : empty, grad_b ? P : empty, stats, sums};
  }
  if (grad_a) finish_groups<A>(Q.data_ptr<A>(), hap, st + 1 * groups * D, r0, nr, m, D);
  if (grad_b) finish_groups<A>(P.data_ptr<A>(), hbp, st + 3 * groups * D, r0, nr, m, D);
  return {loss, grad_a ? to_dtype(Q, za_in.scalar_type()) : empty, grad_b ? to_dtype(P, zb_in.scalar_type()) : empty,
          stats, at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_correlation_loss_cpu(
    const at::Tensor& za, const at::Tensor& zb, double lambd, double scale, double eps, int64_t groups, int64_t row0,
    int64_t row1, bool finish, c10::string_view method, bool grad_a, bool grad_b) {
  const char* op = "sslkern.cross_correlation_loss";
  TORCH_CHECK(za.device().is_cpu() && zb.device().is_cpu(), op, ": za and zb must be CPU tensors");
  TORCH_CHECK(za.dim() == 2 && za.sizes() == zb.sizes(), op, ": za and zb must be (N, D) of one shape, got ",
              za.sizes(), " and ", zb.sizes());
  TORCH_CHECK(za.scalar_type() == zb.scalar_type(), op, ": za and zb must have one dtype");
  const auto dt = za.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", dt);
  const int64_t N = za.size(0), D = za.size(1);
  TORCH_CHECK(N >= 2 && D >= 1, op, ": expected at least 2 rows and 1 column, got ", za.sizes());
  TORCH_CHECK(groups >= 1 && N % groups == 0 && N / groups >= 2, op, ": groups expected a divisor of N = ", N,
              " leaving at least 2 rows per group, got ", groups);
  TORCH_CHECK(0 <= row0 && row0 < row1 && row1 <= N, op, ": rows expected 0 <= row0 < row1 <= N = ", N, ", got [",
              row0, ", ", row1, ")");
  const int64_t m = N / groups;
  TORCH_CHECK(!finish || (row0 % m == 0 && row1 % m == 0), op, ": finish=True expected rows made of whole groups");
  TORCH_CHECK(finish || groups == 1, op, ": finish=False expected groups = 1");
  TORCH_CHECK(method == "gram" || method == "tiled", op, ": method expected 'gram' or 'tiled', got ", method);
  TORCH_CHECK(std::isfinite(lambd) && std::isfinite(scale) && eps > 0, op, ": lambd and scale must be finite, eps > 0");
  const bool tiled = method == "tiled";
  // BLAS dimensions and leading dimensions are 32-bit; the Gram form also holds (rows x N) blocks
  TORCH_CHECK(N * D < (int64_t(1) << 31) && (tiled || N * N < (int64_t(1) << 31)), op,
              ": sizes beyond 32-bit BLAS indexing (the tiled form takes N·N >= 2^31)");
  if (dt == at::kDouble)
    return barlow_impl<double>(za, zb, lambd, scale, eps, groups, row0, row1, finish, tiled, grad_a, grad_b);
  return barlow_impl<float>(za, zb, lambd, scale, eps, groups, row0, row1, finish, tiled, grad_a, grad_b);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("cross_correlation_loss_cpu(Tensor za, Tensor zb, float lambd, float scale, float eps, int groups, int row0, "
        "int row1, bool finish, str method, bool grad_a, bool grad_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &cross_correlation_loss_cpu);
}

}  // namespace sslkern
