// hog_targets — MaskFeat per-patch HOG targets, C++ CPU kernel.
//
// For each requested (image, patch) and channel: the (p+2)x(p+2) tile around the patch
// (reflect padding at the image border, converted to fp32) is loaded once; per pixel the
// Sobel gradients gx, gy (summed in the order of sslkern/reference/hog_targets.py), the
// magnitude sqrt(gx² + gy²) (times the tiled Gaussian window, if any) and the unsigned
// orientation bin: the vector (gy, gx) turned into the upper half plane, its bin the number
// of edges t_k = kπ/nbins with gx·cos t_k >= gy·sin t_k (two rounded products compared, as
// the reference and the Triton kernel do, so every backend bins every pixel alike). The
// magnitudes are summed into the patch's cells per bin, and each cell's histogram is
// divided by max(‖h‖₂, 1e-12) (F.normalize). Only the requested patches are computed; the
// full HOG map (B·C·nbins·H·W floats in SlowFast) is never formed.
//
// Work is split over (image, patch) rows of the output; each task writes one row of
// C·nbins·u² floats, u = patch / pool.
#include "common.h"

#include <cmath>
#include <vector>

namespace sslkern {
namespace {

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

struct HogShape {
  int64_t C, H, W, p, pool, nbins, u, gw;
  int64_t sb, sc, sh, sw;
};

template <typename X>
void hog_patch(const X* img, const HogShape& s, int64_t py, int64_t px, const float* win, const float* cosk,
               const float* sink, float* tile, float* mag, float* va, float* vb, int32_t* bin, float* hist,
               float* out) {
  const int64_t p = s.p, t = p + 2, uu = s.u * s.u, y0 = py * p, x0 = px * p;
  for (int64_t c = 0; c < s.C; ++c) {
    const X* ch = img + c * s.sc;
    for (int64_t r = 0; r < t; ++r) {
      const X* row = ch + reflect(y0 - 1 + r, s.H) * s.sh;
      float* dst = tile + r * t;
      const bool inside = x0 >= 1 && x0 + p + 1 <= s.W;
      if (inside && s.sw == 1) {
        const X* src = row + x0 - 1;
#pragma omp simd
        for (int64_t j = 0; j < t; ++j) dst[j] = load_f(src, j);
      } else {
        for (int64_t j = 0; j < t; ++j) dst[j] = load_f(row, reflect(x0 - 1 + j, s.W) * s.sw);
      }
    }
    for (int64_t k = 0; k < s.nbins * uu; ++k) hist[k] = 0.f;
    for (int64_t y = 0; y < p; ++y) {
      const float* a = tile + y * t;  // rows y-1, y, y+1 of the patch
      const float* m = a + t;
      const float* b = m + t;
#pragma omp simd
      for (int64_t j = 0; j < p; ++j) {
        const float d0 = a[j] - a[j + 2], d1 = m[j] - m[j + 2], d2 = b[j] - b[j + 2];
        const float gx = (d0 + 2.f * d1) + d2;
        const float s0 = (a[j] + 2.f * a[j + 1]) + a[j + 2], s2 = (b[j] + 2.f * b[j + 1]) + b[j + 2];
        const float gy = s0 - s2;
        mag[j] = std::sqrt(gx * gx + gy * gy);
        const bool flip = gx < 0.f || (gx == 0.f && gy < 0.f);
        vb[j] = flip ? -gx : gx;
        va[j] = flip ? -gy : gy;
        bin[j] = 0;
      }
      for (int64_t e = 0; e + 1 < s.nbins; ++e) {
        const float ce = cosk[e], se = sink[e];
#pragma omp simd
        for (int64_t j = 0; j < p; ++j) bin[j] += (vb[j] * ce >= va[j] * se) ? 1 : 0;
      }
      if (win != nullptr) {
        const float* wrow = win + ((y0 + y) % s.gw) * s.gw;
        for (int64_t j = 0; j < p; ++j) mag[j] *= wrow[(x0 + j) % s.gw];
      }
      float* hrow = hist + (y / s.pool) * s.u;
      for (int64_t j = 0; j < p; ++j) hrow[bin[j] * uu + j / s.pool] += mag[j];
    }
    float* o = out + c * s.nbins * uu;
    for (int64_t cell = 0; cell < uu; ++cell) {
      float q = 0.f;
      for (int64_t k = 0; k < s.nbins; ++k) q += hist[k * uu + cell] * hist[k * uu + cell];
      const float d = std::max(std::sqrt(q), 1e-12f);
      for (int64_t k = 0; k < s.nbins; ++k) o[k * uu + cell] = hist[k * uu + cell] / d;
    }
  }
}

at::Tensor hog_targets_cpu(const at::Tensor& images, const c10::optional<at::Tensor>& ids_opt,
                           const c10::optional<at::Tensor>& window_opt, int64_t patch_size, int64_t pool,
                           int64_t nbins) {
  TORCH_CHECK(images.device().is_cpu(), "hog_targets: images is not on the CPU");
  TORCH_CHECK(images.dim() == 4, "hog_targets: images expected 4 dims (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(patch_size >= 1 && pool >= 1 && patch_size % pool == 0,
              "hog_targets: patch_size expected a positive multiple of pool, got ", patch_size, " and ", pool);
  TORCH_CHECK(nbins >= 1 && nbins <= 256, "hog_targets: nbins expected in [1, 256], got ", nbins);
  HogShape s{images.size(1), images.size(2), images.size(3), patch_size, pool, nbins, patch_size / pool, 0,
             images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  const int64_t B = images.size(0);
  TORCH_CHECK(s.H >= 2 && s.W >= 2 && s.H % patch_size == 0 && s.W % patch_size == 0,
              "hog_targets: images expected H and W multiples of patch_size ", patch_size, " and at least 2, got ",
              images.sizes());
  const int64_t wp = s.W / patch_size, N = (s.H / patch_size) * wp;
  at::Tensor ids;
  int64_t Nm = N;
  if (ids_opt.has_value()) {
    ids = *ids_opt;
    TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == B,
                "hog_targets: ids expected a CPU int64 tensor of shape (", B, ", *), got ", ids.sizes());
    ids = ids.contiguous();
    Nm = ids.size(1);
  }
  std::vector<float> win_host;
  if (window_opt.has_value()) {
    const at::Tensor& w = *window_opt;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == w.size(1) && w.size(0) >= 2 && w.scalar_type() == at::kFloat,
                "hog_targets: window expected a square fp32 (g, g) tensor, got ", w.sizes());
    s.gw = w.size(0);
    TORCH_CHECK(s.H % s.gw == 0 && s.W % s.gw == 0, "hog_targets: window size ", s.gw, " must divide H and W");
    at::Tensor wc = w.contiguous();
    win_host.assign(wc.data_ptr<float>(), wc.data_ptr<float>() + s.gw * s.gw);
  }
  const int64_t uu = s.u * s.u, F = s.C * nbins * uu;
  at::Tensor out = empty_output({B, Nm, F}, images.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  std::vector<float> cosk(std::max<int64_t>(nbins - 1, 1)), sink(cosk.size());
  for (int64_t k = 1; k < nbins; ++k) {  // fp32 roundings of the double values (the reference's)
    cosk[k - 1] = static_cast<float>(std::cos(static_cast<double>(k) * M_PI / static_cast<double>(nbins)));
    sink[k - 1] = static_cast<float>(std::sin(static_cast<double>(k) * M_PI / static_cast<double>(nbins)));
  }
  const int64_t* id = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  if (id != nullptr) {
    for (int64_t i = 0; i < B * Nm; ++i)
      TORCH_CHECK(id[i] >= 0 && id[i] < N, "hog_targets: ids expected values in [0, ", N, "), got ", id[i]);
  }
  const float* win = win_host.empty() ? nullptr : win_host.data();
  float* o = out.data_ptr<float>();
  dispatch_float(images.scalar_type(), "hog_targets: images", [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) {
      TORCH_CHECK(false, "hog_targets: images expected float32, bfloat16 or float16, got float64");
    } else {
      const X* img = ptr<const X>(images);
      const int64_t t = patch_size + 2;
      at::parallel_for(0, B * Nm, 8, [&](int64_t lo, int64_t hi) {
        std::vector<float> scratch(t * t + 3 * patch_size + nbins * uu);
        std::vector<int32_t> bins(patch_size);
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t b = r / Nm, j = id != nullptr ? id[r] : r % Nm;
          hog_patch<X>(img + b * s.sb, s, j / wp, j % wp, win, cosk.data(), sink.data(), scratch.data(),
                       scratch.data() + t * t, scratch.data() + t * t + patch_size,
                       scratch.data() + t * t + 2 * patch_size, bins.data(), scratch.data() + t * t + 3 * patch_size,
                       o + r * F);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("hog_targets_cpu(Tensor images, Tensor? ids, Tensor? window, int patch_size, int pool, int nbins) -> Tensor",
        &hog_targets_cpu);
}

}  // namespace sslkern
