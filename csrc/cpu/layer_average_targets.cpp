// layer_average_targets — data2vec teacher targets, C++ CPU kernel.
//
//   y[b,t,:] = final_norm( (1/K) * sum_k norm_k(x_k)[b,t,:] )
//
// norm_k is an instance norm over tokens (per image and channel, biased variance, as
// F.instance_norm on (B, D, T)), a parameter-free layer norm over D, or nothing. The
// result is fp32 (B, T, D), written once; the K layers are never copied or stacked.
//
// Work is split by image. For the instance-norm path each layer is read twice: once for
// the per-channel statistics (sums of x - x[0,:], shifted so that a large channel mean
// does not cancel the variance), once to normalize and accumulate into the output, whose
// image slice (T*D fp32) stays in cache across the K layers. For the layer-norm path the
// loop is row-major: each output row is finished (all K layers, then the final norm)
// while it is in L1.
#include "common.h"

#include <cmath>
#include <string>
#include <vector>

namespace sslkern {
namespace {

enum class Norm { kNone, kInstance, kLayer };

Norm parse_norm(const std::string& s, const char* arg) {
  if (s == "none") return Norm::kNone;
  if (s == "instance") return Norm::kInstance;
  if (s == "layer") return Norm::kLayer;
  TORCH_CHECK(false, "layer_average_targets: ", arg, " must be 'instance', 'layer' or 'none', got '", s, "'");
}

// Parameter-free layer norm of one fp32 row in place (two passes over a row in L1).
inline void layer_norm_row(float* row, int64_t D, float eps) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += row[d];
  const float mean = s / static_cast<float>(D);
  float q = 0.f;
#pragma omp simd reduction(+ : q)
  for (int64_t d = 0; d < D; ++d) q += (row[d] - mean) * (row[d] - mean);
  const float rstd = 1.f / std::sqrt(q / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) row[d] = (row[d] - mean) * rstd;
}

// Instance norm of one fp32 image (T, D) in place: per channel over tokens.
void instance_norm_image(float* y, int64_t T, int64_t D, float eps, float* mean, float* rstd) {
  for (int64_t d = 0; d < D; ++d) mean[d] = 0.f, rstd[d] = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = y + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) mean[d] += row[d];
  }
  for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<float>(T);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = y + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) rstd[d] += (row[d] - mean[d]) * (row[d] - mean[d]);
  }
  for (int64_t d = 0; d < D; ++d) rstd[d] = 1.f / std::sqrt(rstd[d] / static_cast<float>(T) + eps);
  for (int64_t t = 0; t < T; ++t) {
    float* row = y + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = (row[d] - mean[d]) * rstd[d];
  }
}

template <typename X>
void average_image(const std::vector<const X*>& layers, int64_t sb, int64_t st, int64_t b, int64_t T, int64_t D,
                   Norm layer_norm, Norm final_norm, float eps, float* out, float* shift, float* s1, float* s2) {
  const int64_t K = static_cast<int64_t>(layers.size());
  const float inv_k = 1.f / static_cast<float>(K);
  float* y = out + b * T * D;
  if (layer_norm == Norm::kInstance) {
    for (int64_t k = 0; k < K; ++k) {
      const X* x = layers[k] + b * sb;
      // Pass 1: shifted sums per channel.
      for (int64_t d = 0; d < D; ++d) shift[d] = load_f(x, d), s1[d] = 0.f, s2[d] = 0.f;
      for (int64_t t = 1; t < T; ++t) {
        const X* row = x + t * st;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float v = load_f(row, d) - shift[d];
          s1[d] += v;
          s2[d] += v * v;
        }
      }
      const float inv_t = 1.f / static_cast<float>(T);
      for (int64_t d = 0; d < D; ++d) {
        const float m = s1[d] * inv_t;
        const float var = std::max(s2[d] * inv_t - m * m, 0.f);
        s1[d] = shift[d] + m;                         // mean
        s2[d] = inv_k / std::sqrt(var + eps);         // rstd / K
      }
      // Pass 2: normalize and accumulate.
      for (int64_t t = 0; t < T; ++t) {
        const X* row = x + t * st;
        float* yr = y + t * D;
        if (k == 0) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) yr[d] = (load_f(row, d) - s1[d]) * s2[d];
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) yr[d] += (load_f(row, d) - s1[d]) * s2[d];
        }
      }
    }
    if (final_norm == Norm::kLayer) {
      for (int64_t t = 0; t < T; ++t) layer_norm_row(y + t * D, D, eps);
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      float* yr = y + t * D;
      for (int64_t k = 0; k < K; ++k) {
        const X* row = layers[k] + b * sb + t * st;
        float mean = 0.f, scale = inv_k;
        if (layer_norm == Norm::kLayer) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += load_f(row, d);
          mean = s / static_cast<float>(D);
          float q = 0.f;
#pragma omp simd reduction(+ : q)
          for (int64_t d = 0; d < D; ++d) {
            const float v = load_f(row, d) - mean;
            q += v * v;
          }
          scale = inv_k / std::sqrt(q / static_cast<float>(D) + eps);
        }
        if (k == 0) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) yr[d] = (load_f(row, d) - mean) * scale;
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) yr[d] += (load_f(row, d) - mean) * scale;
        }
      }
      if (final_norm == Norm::kLayer) layer_norm_row(yr, D, eps);
    }
  }
  if (final_norm == Norm::kInstance) instance_norm_image(y, T, D, eps, s1, s2);
}

at::Tensor layer_average_targets_cpu(at::TensorList layers, std::string layer_norm, std::string final_norm,
                                     double eps) {
  const Norm ln = parse_norm(layer_norm, "layer_norm");
  const Norm fn = parse_norm(final_norm, "final_norm");
  TORCH_CHECK(!layers.empty(), "layer_average_targets: layers must not be empty");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() == 3, "layer_average_targets: layers[0] expected 3 dims (B, T, D), got ", first.sizes());
  const int64_t B = first.size(0), T = first.size(1), D = first.size(2);
  for (size_t k = 0; k < layers.size(); ++k) {
    const at::Tensor& x = layers[k];
    TORCH_CHECK(x.device().is_cpu(), "layer_average_targets: layers[", k, "] is not on the CPU");
    TORCH_CHECK(x.sizes() == first.sizes(), "layer_average_targets: layers[", k, "] expected shape ", first.sizes(),
                ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), "layer_average_targets: layers[", k, "] dtype ",
                x.scalar_type(), " differs from layers[0] ", first.scalar_type());
    TORCH_CHECK(x.strides() == first.strides() && (D <= 1 || x.stride(2) == 1),
                "layer_average_targets: layers must share strides with a unit stride on D");
  }
  at::Tensor out = empty_output({B, T, D}, first.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t sb = first.stride(0), st = first.stride(1);
  dispatch_float(first.scalar_type(), "layer_average_targets: layers", [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) {
      TORCH_CHECK(false, "layer_average_targets: layers expected float32, bfloat16 or float16, got float64");
    } else {
      std::vector<const X*> ptrs(layers.size());
      for (size_t k = 0; k < layers.size(); ++k) ptrs[k] = ptr<const X>(layers[k]);
      float* o = out.data_ptr<float>();
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        std::vector<float> scratch(3 * D);
        for (int64_t b = lo; b < hi; ++b) {
          average_image<X>(ptrs, sb, st, b, T, D, ln, fn, static_cast<float>(eps), o, scratch.data(),
                           scratch.data() + D, scratch.data() + 2 * D);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("layer_average_targets_cpu(Tensor[] layers, str layer_norm, str final_norm, float eps) -> Tensor",
        &layer_average_targets_cpu);
}

}  // namespace sslkern
