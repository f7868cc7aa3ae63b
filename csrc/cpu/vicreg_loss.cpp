// vicreg_loss — VICReg loss and its gradients, C++ CPU kernel; no (D x D) covariance.
//
// Per view: X = z − mean (columns), s_i = Σ_n X_ni², var = s/(N − 1), std = √(var + eps), and
// for the rows R = [r0, r1) the product Y = X[R]·XᵀX, from which
//   Σ_{i≠j} cov² = (‖XᵀX‖²_F − Σ s²)/(N − 1)²     (R's share: (Σ_{n∈R} ‖K[n]‖² − |R|/N·Σ s²)/(N − 1)²)
//   ∂/∂X[R] of cov_coeff·Σ_{i≠j} cov²/D = 4·cov_coeff/((N − 1)²·D) · (Y − X[R]⊙s).
// Gram form: K[R,:] = X[R]·Xᵀ (|R| x N), Y = K[R,:]·X. Tiled form: XᵀX in (bw x D) strips of
// rows I, S = X[:, I]ᵀ·X; XᵀX is symmetric, so Y[:, I] = X[R]·Sᵀ — each strip writes its own
// columns of Y and is then dropped: no (D x D) tensor. With the std term's gradient
// −std_coeff·std_scale/D · 1[std < 1]·X/((N − 1)·std) and the invariance term's ±2·sim/(N·D)·(z_a − z_b)
// the gradient rows are complete: the centring's backward is the identity (every term's
// gradient has zero column means). fp16 / bf16 inputs are converted to fp32 once; fp64 runs in fp64.
#include "redundancy.h"

#include <string>
#include <tuple>
#include <type_traits>

namespace sslkern {
namespace {

using namespace redundancy;

// X = z − mean(z) (columns) into x; s[i] = Σ_n X_ni² (double).
template <typename A>
void centre(const A* z, int64_t N, int64_t D, A* x, double* s) {
  for_column_chunks(D, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<double> sum(w);
    std::vector<A> mean(w);
    column_sum(z, D, 0, N, c0, c1, sum.data());
    for (int64_t j = 0; j < w; ++j) mean[j] = static_cast<A>(sum[j] / static_cast<double>(N));
    double* __restrict sq = s + c0;
    std::fill(sq, sq + w, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const A* __restrict row = z + n * D + c0;
      A* __restrict out = x + n * D + c0;
      const A* __restrict mu = mean.data();
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const A d = row[j] - mu[j];
        out[j] = d;
        sq[j] += static_cast<double>(d) * static_cast<double>(d);
      }
    }
  });
}

// One view's covariance part: Y = X[R]·XᵀX into Y (may be null when only the full loss is
// wanted) and the returned Σ_{n∈R} ‖K[n]‖² (all rows: ‖XᵀX‖²_F).
template <typename A>
double covariance_rows(const A* x, int64_t N, int64_t D, int64_t r0, int64_t r1, bool tiled, A* Y) {
  const int64_t nr = r1 - r0;
  const bool full = r0 == 0 && r1 == N;
  const auto opts = at::TensorOptions().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
  if (!tiled) {
    at::Tensor k = at::empty({nr, N}, opts);
    A* kp = k.data_ptr<A>();
    gemm<A>(false, true, nr, N, D, A(1), x + r0 * D, D, x, D, A(0), kp, N);
    if (Y) gemm<A>(false, false, nr, D, N, A(1), kp, N, x, D, A(0), Y, D);
    return dot_rows(kp, kp, nr, N);
  }
  const int64_t sb = strip_width(D);
  at::Tensor strip = at::empty({sb, D}, opts);
  A* S = strip.data_ptr<A>();
  double sq = 0.0;
  for (int64_t i0 = 0; i0 < D; i0 += sb) {
    const int64_t bw = std::min(sb, D - i0);
    gemm<A>(true, false, bw, D, N, A(1), x + i0, D, x, D, A(0), S, D);  // (XᵀX)[I, :]
    if (full) sq += dot_rows(S, S, bw, D);
    if (Y) gemm<A>(false, true, nr, bw, D, A(1), x + r0 * D, D, S, D, A(0), Y + i0, D);
  }
  if (!full) sq = dot_rows(x + r0 * D, Y, nr, D);  // Σ_{n∈R} X[n]·(XᵀX)·X[n]ᵀ = Σ_{n∈R} ‖K[n]‖²
  return sq;
}

struct ViewStats {
  double relu = 0, std_sum = 0, low = 0, off = 0, var_sum = 0, var_sq = 0;
};

template <typename A>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_impl(
    const at::Tensor& za_in, const at::Tensor& zb_in, double sim, double std_coeff, double cov_coeff, double eps,
    double std_scale, int64_t r0, int64_t r1, bool tiled, bool grad_a, bool grad_b) {
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const auto opts = za_in.options().dtype(acc);
  const at::Tensor za = za_in.to(acc).contiguous(), zb = zb_in.to(acc).contiguous();
  const int64_t N = za.size(0), D = za.size(1), nr = r1 - r0;
  const bool full = r0 == 0 && r1 == N;
  const double frac = static_cast<double>(nr) / static_cast<double>(N), n1 = static_cast<double>(N - 1);
  const A* zap = za.data_ptr<A>();
  const A* zbp = zb.data_ptr<A>();
  double diff = 0.0;
  {
    std::vector<double> part(nr, 0.0);
    at::parallel_for(0, nr, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const A* __restrict a = zap + (r0 + n) * D;
        const A* __restrict b = zbp + (r0 + n) * D;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < D; ++j) {
          const double d = static_cast<double>(a[j]) - static_cast<double>(b[j]);
          s += d * d;
        }
        part[n] = s;
      }
    });
    for (double v : part) diff += v;
  }
  const at::Tensor empty_a = at::empty({0}, za_in.options()), empty_b = at::empty({0}, zb_in.options());
  at::Tensor grads[2] = {empty_a, empty_b};
  ViewStats vs[2];
  const bool want[2] = {grad_a, grad_b};
  const A* zs[2] = {zap, zbp};
  const A c_cov = static_cast<A>(4.0 * cov_coeff / (n1 * n1 * static_cast<double>(D)));
  const A c_std = static_cast<A>(std_coeff * std_scale / static_cast<double>(D));
  const A c_inv = static_cast<A>(2.0 * sim / (static_cast<double>(N) * static_cast<double>(D)));
  for (int v = 0; v < 2; ++v) {
    at::Tensor xt = at::empty({N, D}, opts);
    A* x = xt.data_ptr<A>();
    std::vector<double> s(D);
    centre<A>(zs[v], N, D, x, s.data());
    std::vector<A> sa(D), gstd(D);  // s, and the std term's per-column gradient factor
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) {
      const double var = s[i] / n1, sd = std::sqrt(var + eps);
      vs[v].relu += sd < 1.0 ? 1.0 - sd : 0.0;
      vs[v].std_sum += sd;
      vs[v].low += sd < 1.0;
      vs[v].var_sum += var;
      vs[v].var_sq += var * var;
      ss += s[i] * s[i];
      sa[i] = static_cast<A>(s[i]);
      gstd[i] = sd < 1.0 ? static_cast<A>(static_cast<double>(c_std) / (n1 * sd)) : A(0);
    }
    const bool need_y = want[v] || !full;
    at::Tensor Yt = need_y ? empty_output({nr, D}, opts) : at::empty({0}, opts);
    A* Y = need_y ? Yt.data_ptr<A>() : nullptr;
    const double sq = covariance_rows<A>(x, N, D, r0, r1, tiled, Y);
    vs[v].off = (sq - frac * ss) / (n1 * n1);
    if (!want[v]) continue;
    const A sign = v == 0 ? A(1) : A(-1);
    at::parallel_for(0, nr, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        A* __restrict y = Y + n * D;
        const A* __restrict xr = x + (r0 + n) * D;
        const A* __restrict a = zap + (r0 + n) * D;
        const A* __restrict b = zbp + (r0 + n) * D;
        const A* __restrict sp = sa.data();
        const A* __restrict gs = gstd.data();
#pragma omp simd
        for (int64_t j = 0; j < D; ++j)
          y[j] = c_cov * (y[j] - xr[j] * sp[j]) - gs[j] * xr[j] + sign * c_inv * (a[j] - b[j]);
      }
    });
    grads[v] = to_dtype(Yt, v == 0 ? za_in.scalar_type() : zb_in.scalar_type());
  }
  const double d = static_cast<double>(D);
  at::Tensor loss = at::empty({}, opts);
  loss.fill_(sim * diff / (static_cast<double>(N) * d) + frac * std_coeff * std_scale * (vs[0].relu + vs[1].relu) / d +
             cov_coeff * (vs[0].off + vs[1].off) / d);
  at::Tensor stats = at::empty({13}, opts);
  {
    auto s = stats.accessor<A, 1>();
    const double vals[13] = {diff, vs[0].relu, vs[1].relu, vs[0].std_sum, vs[1].std_sum, vs[0].low, vs[1].low,
                             vs[0].off, vs[1].off, vs[0].var_sum, vs[1].var_sum, vs[0].var_sq, vs[1].var_sq};
    for (int k = 0; k < 13; ++k) s[k] = static_cast<A>(vals[k]);
  }
  return {loss, grads[0], grads[1], stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_loss_cpu(
    const at::Tensor& za, const at::Tensor& zb, double sim_coeff, double std_coeff, double cov_coeff, double eps,
    double std_scale, int64_t row0, int64_t row1, c10::string_view method, bool grad_a, bool grad_b) {
  const char* op = "sslkern.vicreg_loss";
  TORCH_CHECK(za.device().is_cpu() && zb.device().is_cpu(), op, ": za and zb must be CPU tensors");
  TORCH_CHECK(za.dim() == 2 && za.sizes() == zb.sizes(), op, ": za and zb must be (N, D) of one shape, got ",
              za.sizes(), " and ", zb.sizes());
  TORCH_CHECK(za.scalar_type() == zb.scalar_type(), op, ": za and zb must have one dtype");
  const auto dt = za.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", dt);
  const int64_t N = za.size(0), D = za.size(1);
  TORCH_CHECK(N >= 2 && D >= 1, op, ": expected at least 2 rows and 1 column, got ", za.sizes());
  TORCH_CHECK(0 <= row0 && row0 < row1 && row1 <= N, op, ": rows expected 0 <= row0 < row1 <= N = ", N, ", got [",
              row0, ", ", row1, ")");
  TORCH_CHECK(method == "gram" || method == "tiled", op, ": method expected 'gram' or 'tiled', got ", method);
  TORCH_CHECK(eps > 0, op, ": eps must be positive");
  const bool tiled = method == "tiled";
  // BLAS dimensions and leading dimensions are 32-bit; the Gram form also holds (rows x N) blocks
  TORCH_CHECK(N * D < (int64_t(1) << 31) && (tiled || N * N < (int64_t(1) << 31)), op,
              ": sizes beyond 32-bit BLAS indexing (the tiled form takes N·N >= 2^31)");
  if (dt == at::kDouble)
    return vicreg_impl<double>(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, tiled, grad_a,
                               grad_b);
  return vicreg_impl<float>(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, tiled, grad_a, grad_b);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("vicreg_loss_cpu(Tensor za, Tensor zb, float sim_coeff, float std_coeff, float cov_coeff, float eps, "
        "float std_scale, int row0, int row1, str method, bool grad_a, bool grad_b) -> (Tensor, Tensor, Tensor, Tensor)",
        &vicreg_loss_cpu);
}

}  // namespace sslkern
