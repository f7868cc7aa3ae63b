// masked_regression_loss — data2vec / I-JEPA masked regression, C++ CPU kernel.
//
//   loss = scale * sum_{r, j masked} sum_d l(pred[r, j, d] - target[r / M, pos(r, j), d])
//
// l(e) = e^2 (beta = 0), smooth-L1 with beta, or |e| (l1), each element optionally times a
// per-element weight w[r, j, d] (same shape as pred); pos(r, j) = j (mask form, rows of pred are
// full sequences and mask[r, j] selects) or ids[r, j] (ids form, pred holds only the
// predicted tokens). Row r of pred (one of M clones of image r / M) reads the per-image
// target directly, so the clone repeat is never materialized. "mean" divides by the
// number of masked tokens (0 when there are none).
//
// Forward: one pass over the predictions, rows split across threads; per-row partial sums
// (fp64 across tokens) are added in row order, so the result does not depend on the
// thread count. Backward recomputes the difference (nothing is saved but the inputs) and
// writes d loss / d pred, zero at unmasked positions.
#include "common.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace sslkern {
namespace {

template <typename C, typename T> inline C load_c(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) return static_cast<C>(p[i]);
  else return static_cast<C>(load_f(p, i));
}
template <typename C, typename T> inline void store_c(T* p, int64_t i, C v) {
  if constexpr (std::is_same_v<T, double>) p[i] = static_cast<double>(v);
  else store_f(p, i, static_cast<float>(v));
}

struct Geometry {
  int64_t R, N, D, B, T, M;
  int64_t ps0, ps1;  // pred strides (rows, tokens); unit stride on D
  int64_t ys0, ys1;  // target strides
  const bool* mask;  // (R, N) contiguous, or null
  const int64_t* ids;  // (R, N) contiguous, or null
};

Geometry geometry(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& ids) {
  TORCH_CHECK(pred.dim() == 3 && target.dim() == 3, "masked_regression_loss: pred and target must be 3-d");
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), "masked_regression_loss: tensors must be on the CPU");
  Geometry g{};
  g.R = pred.size(0), g.N = pred.size(1), g.D = pred.size(2);
  g.B = target.size(0), g.T = target.size(1);
  TORCH_CHECK(target.size(2) == g.D, "masked_regression_loss: target D ", target.size(2), " != pred D ", g.D);
  TORCH_CHECK(g.B > 0 && g.R % g.B == 0, "masked_regression_loss: pred rows ", g.R, " not a multiple of target batch ", g.B);
  g.M = g.R / g.B;
  TORCH_CHECK(g.D <= 1 || (pred.stride(2) == 1 && target.stride(2) == 1),
              "masked_regression_loss: pred and target need a unit stride on D");
  g.ps0 = pred.stride(0), g.ps1 = pred.stride(1), g.ys0 = target.stride(0), g.ys1 = target.stride(1);
  const bool has_mask = mask.has_value() && mask->defined();
  const bool has_ids = ids.has_value() && ids->defined();
  TORCH_CHECK(!(has_mask && has_ids), "masked_regression_loss: pass mask or ids, not both");
  if (has_ids) {
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->is_contiguous() && ids->dim() == 2 && ids->size(0) == g.R &&
                    ids->size(1) == g.N, "masked_regression_loss: ids must be contiguous int64 (R, Nm)");
    g.ids = ids->data_ptr<int64_t>();
    const int64_t n = ids->numel();
    for (int64_t i = 0; i < n; ++i) {  // every index is checked before any is used
      TORCH_CHECK(g.ids[i] >= 0 && g.ids[i] < g.T, "masked_regression_loss: ids expected values in [0, ", g.T,
                  "), got ", g.ids[i], " at flat position ", i);
    }
  } else {
    TORCH_CHECK(g.N == g.T, "masked_regression_loss: pred tokens ", g.N, " != target tokens ", g.T);
  }
  if (has_mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == g.R && mask->size(1) == g.N,
                "masked_regression_loss: mask must be contiguous bool (R, T)");
    g.mask = mask->data_ptr<bool>();
  }
  return g;
}

int64_t masked_count(const Geometry& g) {
  if (!g.mask) return g.R * g.N;
  int64_t c = 0;
  for (int64_t i = 0; i < g.R * g.N; ++i) c += g.mask[i] ? 1 : 0;
  return c;
}

// Sum over D of w · l(p - y) for one token (w = 1 when wt is null).
template <typename C, typename P, typename Y>
inline C token_loss(const P* p, const Y* y, const C* wt, int64_t D, C beta, bool l1) {
  C s = 0;
  if (l1) {
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += (wt ? wt[d] : C(1)) * std::abs(load_c<C>(p, d) - load_c<C>(y, d));
  } else if (beta == C(0)) {
    if (wt) {
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) {
        const C e = load_c<C>(p, d) - load_c<C>(y, d);
        s += wt[d] * (e * e);
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) {
        const C e = load_c<C>(p, d) - load_c<C>(y, d);
        s += e * e;
      }
    }
  } else {
    const C half_inv_beta = C(0.5) / beta, half_beta = C(0.5) * beta;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) {
      const C e = load_c<C>(p, d) - load_c<C>(y, d);
      const C a = std::abs(e);
      s += (wt ? wt[d] : C(1)) * (a < beta ? e * e * half_inv_beta : a - half_beta);
    }
  }
  return s;
}

template <typename C, typename P, typename Y>
inline void token_grad(const P* p, const Y* y, const C* wt, P* gp, int64_t D, C beta, C coef, bool l1) {
  if (l1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const C e = load_c<C>(p, d) - load_c<C>(y, d);
      const C c = wt ? coef * wt[d] : coef;
      store_c<C>(gp, d, e > C(0) ? c : (e < C(0) ? -c : C(0)));
    }
  } else if (beta == C(0)) {
    const C two_coef = C(2) * coef;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d)
      store_c<C>(gp, d, (wt ? two_coef * wt[d] : two_coef) * (load_c<C>(p, d) - load_c<C>(y, d)));
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const C e = load_c<C>(p, d) - load_c<C>(y, d);
      const C a = std::abs(e);
      const C c = wt ? coef * wt[d] : coef;
      store_c<C>(gp, d, a < beta ? (c / beta) * e : (e > C(0) ? c : (e < C(0) ? -c : C(0))));
    }
  }
}

// The per-element weights (same shape as pred, pred's compute dtype, contiguous), or null.
template <typename C>
const C* weight_ptr(const std::optional<at::Tensor>& weight, const at::Tensor& pred) {
  if (!weight.has_value() || !weight->defined()) return nullptr;
  const auto want = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight->scalar_type() == want && weight->is_contiguous() && weight->sizes() == pred.sizes(),
              "masked_regression_loss: weight expected a contiguous ", want, " tensor of pred's shape ", pred.sizes(),
              ", got ", weight->scalar_type(), " ", weight->sizes());
  return weight->data_ptr<C>();
}

template <typename F>
auto dispatch_pair(const at::Tensor& pred, const at::Tensor& target, F&& f) {
  return dispatch_float(pred.scalar_type(), "masked_regression_loss: pred", [&](auto p) {
    return dispatch_float(target.scalar_type(), "masked_regression_loss: target", [&](auto y) {
      return f(p, y);
    });
  });
}

at::Tensor masked_regression_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& ids,
                                      double beta, double scale, bool mean, const std::optional<at::Tensor>& weight,
                                      bool l1) {
  const Geometry g = geometry(pred, target, mask, ids);
  const bool f64 = pred.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros({}, pred.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (g.R == 0 || g.N == 0) return out;
  std::vector<double> partial(g.R, 0.0);
  dispatch_pair(pred, target, [&](auto ptag, auto ytag) {
    using P = decltype(ptag);
    using Y = decltype(ytag);
    using C = std::conditional_t<std::is_same_v<P, double>, double, float>;
    const P* pp = ptr<const P>(pred);
    const Y* yp = ptr<const Y>(target);
    const C* wp = weight_ptr<C>(weight, pred);
    at::parallel_for(0, g.R, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const Y* yimg = yp + (r / g.M) * g.ys0;
        double acc = 0.0;
        for (int64_t j = 0; j < g.N; ++j) {
          if (g.mask && !g.mask[r * g.N + j]) continue;
          const int64_t pos = g.ids ? g.ids[r * g.N + j] : j;
          const C* wt = wp ? wp + (r * g.N + j) * g.D : nullptr;
          acc += static_cast<double>(
              token_loss<C>(pp + r * g.ps0 + j * g.ps1, yimg + pos * g.ys1, wt, g.D, C(beta), l1));
        }
        partial[r] = acc;
      }
    });
  });
  double total = 0.0;
  for (double v : partial) total += v;
  total *= scale;
  if (mean) {
    const int64_t n = masked_count(g);
    total = n > 0 ? total / static_cast<double>(n) : 0.0;
  }
  out.fill_(total);
  return out;
}

at::Tensor masked_regression_loss_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pred,
                                               const at::Tensor& target, const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& ids, double beta, double scale,
                                               bool mean, const std::optional<at::Tensor>& weight, bool l1) {
  const Geometry g = geometry(pred, target, mask, ids);
  TORCH_CHECK(grad_out.numel() == 1 && grad_out.device().is_cpu(), "masked_regression_loss_backward: grad_out must be a CPU scalar");
  at::Tensor grad = empty_output(pred.sizes(), pred.options());
  if (grad.numel() == 0) return grad;
  double coef = grad_out.item<double>() * scale;
  if (mean) {
    const int64_t n = masked_count(g);
    coef = n > 0 ? coef / static_cast<double>(n) : 0.0;
  }
  dispatch_pair(pred, target, [&](auto ptag, auto ytag) {
    using P = decltype(ptag);
    using Y = decltype(ytag);
    using C = std::conditional_t<std::is_same_v<P, double>, double, float>;
    const P* pp = ptr<const P>(pred);
    const Y* yp = ptr<const Y>(target);
    P* gp = ptr<P>(grad);
    const C* wp = weight_ptr<C>(weight, pred);
    at::parallel_for(0, g.R, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const Y* yimg = yp + (r / g.M) * g.ys0;
        for (int64_t j = 0; j < g.N; ++j) {
          P* gr = gp + (r * g.N + j) * g.D;
          if (g.mask && !g.mask[r * g.N + j]) {
            std::memset(static_cast<void*>(gr), 0, sizeof(P) * g.D);
            continue;
          }
          const int64_t pos = g.ids ? g.ids[r * g.N + j] : j;
          const C* wt = wp ? wp + (r * g.N + j) * g.D : nullptr;
          token_grad<C>(pp + r * g.ps0 + j * g.ps1, yimg + pos * g.ys1, wt, gr, g.D, C(beta), C(coef), l1);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("masked_regression_loss_cpu(Tensor pred, Tensor target, Tensor? mask, Tensor? ids, float beta, float scale, "
        "bool mean, Tensor? weight, bool l1) -> Tensor",
        &masked_regression_loss_cpu);
  m.def("masked_regression_loss_backward_cpu(Tensor grad_out, Tensor pred, Tensor target, Tensor? mask, Tensor? ids, "
        "float beta, float scale, bool mean, Tensor? weight, bool l1) -> Tensor",
        &masked_regression_loss_backward_cpu);
}

}  // namespace sslkern
