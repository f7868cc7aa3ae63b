// colorization_targets — colorization soft-encoded ab targets (Zhang et al. 2016), C++ CPU kernel.
//
// Per sampled pixel (every stride-th row and column from 0): RGB clamped to [0, 1] → Lab as
// skimage rgb2lab (sRGB → XYZ → Lab, D65), fp32; the K nearest ab bins by squared distance
// (ties: lower bin id first) with weights exp(-d²/(2σ²)) normalised to sum 1; per image the
// non-grey flag (some sampled pixel with |a| or |b| above the threshold); per pixel the
// rebalancing weight factor[nearest bin] · non-grey. Only the K ids and weights are written
// (sparse); the dense (B, Q, h, w) encoding of the released NNEncLayer is never formed.
//
// Nearest bins: the bins lie on a grid of step g (checked); the candidates are the bins of the
// 7x7 grid points around the pixel's nearest grid point. A bin outside that window is at least
// 3.5 g away in a or b, so when the K-th candidate is nearer than that the window's answer is
// exact; otherwise (a bin set with holes near the pixel) every bin is scanned.
//
// Work is split over output rows (image, sampled row); the per-image flags are combined after.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace sslkern {
namespace {

constexpr int kMaxNeighbors = 16;
constexpr int kWindow = 3;  // grid steps either side of the nearest grid point

// skimage.color.colorconv constants (sRGB D65 → XYZ, D65 2° white)
constexpr float kM[3][3] = {{0.412453f, 0.357580f, 0.180423f},
                            {0.212671f, 0.715160f, 0.072169f},
                            {0.019334f, 0.119193f, 0.950227f}};
constexpr float kWhite[3] = {0.95047f, 1.0f, 1.08883f};

inline float srgb_to_linear(float c) {
  c = std::min(std::max(c, 0.0f), 1.0f);
  return c > 0.04045f ? std::pow((c + 0.055f) / 1.055f, 2.4f) : c / 12.92f;
}
inline float lab_f(float t) { return t > 0.008856f ? std::cbrt(t) : 7.787f * t + 16.0f / 116.0f; }

struct BinGrid {
  float g = 10.f;
  int64_t a0 = 0, b0 = 0, na = 0, nb = 0;  // grid index of bin (a, b): ((a - a0)/g + pad, (b - b0)/g + pad)
  std::vector<int32_t> table;                // (na + 2 pad) x (nb + 2 pad), -1 = no bin
  std::vector<float> qa, qb;
  int64_t stride_row() const { return nb + 2 * kWindow; }
};

BinGrid make_grid(const at::Tensor& bins) {
  TORCH_CHECK(bins.dim() == 2 && bins.size(1) == 2 && bins.size(0) >= 1 && bins.scalar_type() == at::kFloat,
              "colorization_targets: bins expected a float32 (Q, 2) tensor, got ", bins.sizes());
  at::Tensor c = bins.contiguous();
  const float* p = c.data_ptr<float>();
  BinGrid G;
  const int64_t Q = bins.size(0);
  float amin = p[0], bmin = p[1], amax = p[0], bmax = p[1];
  for (int64_t q = 0; q < Q; ++q) {
    amin = std::min(amin, p[2 * q]), amax = std::max(amax, p[2 * q]);
    bmin = std::min(bmin, p[2 * q + 1]), bmax = std::max(bmax, p[2 * q + 1]);
  }
  G.a0 = static_cast<int64_t>(amin), G.b0 = static_cast<int64_t>(bmin);
  G.na = static_cast<int64_t>(std::lround((amax - amin) / G.g)) + 1;
  G.nb = static_cast<int64_t>(std::lround((bmax - bmin) / G.g)) + 1;
  TORCH_CHECK(G.na <= 1024 && G.nb <= 1024, "colorization_targets: bins span too large a grid");
  G.table.assign((G.na + 2 * kWindow) * G.stride_row(), -1);
  G.qa.resize(Q), G.qb.resize(Q);
  for (int64_t q = 0; q < Q; ++q) {
    const float ia = (p[2 * q] - amin) / G.g, ib = (p[2 * q + 1] - bmin) / G.g;
    TORCH_CHECK(ia == std::round(ia) && ib == std::round(ib),
                "colorization_targets: bins expected on a grid of step 10, got (", p[2 * q], ", ", p[2 * q + 1], ")");
    G.table[(static_cast<int64_t>(ia) + kWindow) * G.stride_row() + static_cast<int64_t>(ib) + kWindow] =
        static_cast<int32_t>(q);
    G.qa[q] = p[2 * q], G.qb[q] = p[2 * q + 1];
  }
  return G;
}

// K best (d2, id) pairs, ascending by d2 then id.
struct TopK {
  int k = 0, n = 0;
  float d2[kMaxNeighbors];
  int32_t id[kMaxNeighbors];
  void offer(float d, int32_t q) {
    if (n == k && !(d < d2[n - 1] || (d == d2[n - 1] && q < id[n - 1]))) return;
    int i = n < k ? n++ : n - 1;
    while (i > 0 && (d < d2[i - 1] || (d == d2[i - 1] && q < id[i - 1]))) {
      d2[i] = d2[i - 1], id[i] = id[i - 1];
      --i;
    }
    d2[i] = d, id[i] = q;
  }
};

template <typename X>
void encode_row(const X* img, int64_t sc, int64_t sw, int64_t stride, int64_t w, const BinGrid& G,
                int64_t K, float inv_two_sigma2, float grey, int16_t* ids, float* wts, int32_t* nearest, bool& nongray) {
  const int64_t Q = static_cast<int64_t>(G.qa.size());
  const float far = 3.5f * G.g;  // a bin outside the window is at least this far in a or b
  for (int64_t j = 0; j < w; ++j) {
    const int64_t x = j * stride;
    const float r = srgb_to_linear(load_f(img, x * sw)), gch = srgb_to_linear(load_f(img, sc + x * sw)),
                bl = srgb_to_linear(load_f(img, 2 * sc + x * sw));
    float f[3];
    for (int c = 0; c < 3; ++c) f[c] = lab_f(((kM[c][0] * r + kM[c][1] * gch) + kM[c][2] * bl) / kWhite[c]);
    const float a = 500.0f * (f[0] - f[1]), b = 200.0f * (f[1] - f[2]);
    nongray = nongray || std::abs(a) > grey || std::abs(b) > grey;
    TopK top;
    top.k = static_cast<int>(K);
    const int64_t ca = std::lround((a - static_cast<float>(G.a0)) / G.g), cb = std::lround((b - static_cast<float>(G.b0)) / G.g);
    const bool in_table = ca >= -kWindow && ca < G.na + kWindow && cb >= -kWindow && cb < G.nb + kWindow;
    if (in_table) {
      for (int64_t ia = std::max<int64_t>(ca - kWindow, -kWindow); ia <= std::min<int64_t>(ca + kWindow, G.na + kWindow - 1); ++ia) {
        const int32_t* row = G.table.data() + (ia + kWindow) * G.stride_row() + kWindow;
        for (int64_t ib = std::max<int64_t>(cb - kWindow, -kWindow); ib <= std::min<int64_t>(cb + kWindow, G.nb + kWindow - 1); ++ib) {
          const int32_t q = row[ib];
          if (q < 0) continue;
          const float da = a - G.qa[q], db = b - G.qb[q];
          top.offer(da * da + db * db, q);
        }
      }
    }
    if (!in_table || top.n < K || top.d2[K - 1] >= far * far) {
      top.n = 0;
      for (int64_t q = 0; q < Q; ++q) {
        const float da = a - G.qa[q], db = b - G.qb[q];
        top.offer(da * da + db * db, static_cast<int32_t>(q));
      }
    }
    float e[kMaxNeighbors], sum = 0.f;
    for (int64_t k = 0; k < K; ++k) sum += (e[k] = std::exp(-top.d2[k] * inv_two_sigma2));
    for (int64_t k = 0; k < K; ++k) {
      ids[j * K + k] = static_cast<int16_t>(top.id[k]);
      wts[j * K + k] = e[k] / sum;
    }
    nearest[j] = top.id[0];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> colorization_targets_cpu(
    const at::Tensor& images, const at::Tensor& bins, const at::Tensor& factor, int64_t stride, int64_t num_neighbors,
    double sigma, double grey_threshold) {
  TORCH_CHECK(images.device().is_cpu(), "colorization_targets: images is not on the CPU");
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3,
              "colorization_targets: images expected (B, 3, H, W), got ", images.sizes());
  TORCH_CHECK(stride >= 1, "colorization_targets: stride expected >= 1, got ", stride);
  const int64_t Q = bins.size(0);
  TORCH_CHECK(num_neighbors >= 1 && num_neighbors <= kMaxNeighbors && num_neighbors <= Q,
              "colorization_targets: num_neighbors expected in [1, min(16, Q)], got ", num_neighbors);
  TORCH_CHECK(Q <= 32767, "colorization_targets: at most 32767 bins (int16 ids), got ", Q);
  TORCH_CHECK(factor.dim() == 1 && factor.size(0) == Q && factor.scalar_type() == at::kFloat,
              "colorization_targets: factor expected a float32 (", Q, ",) tensor, got ", factor.sizes());
  TORCH_CHECK(sigma > 0, "colorization_targets: sigma expected > 0, got ", sigma);
  const BinGrid G = make_grid(bins);
  const at::Tensor fac = factor.contiguous();
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  const int64_t h = H == 0 ? 0 : (H - 1) / stride + 1, w = W == 0 ? 0 : (W - 1) / stride + 1, K = num_neighbors;
  at::Tensor ids = empty_output({B, h, w, K}, images.options().dtype(at::kShort));
  at::Tensor wts = empty_output({B, h, w, K}, images.options().dtype(at::kFloat));
  at::Tensor rebalance = at::empty({B, h, w}, images.options().dtype(at::kFloat));
  at::Tensor nongray = at::zeros({B}, images.options().dtype(at::kBool));
  if (B * h * w == 0) return {ids, wts, rebalance, nongray};
  std::vector<int32_t> nearest(B * h * w);
  std::vector<uint8_t> row_nongray(B * h, 0);
  const float inv2s2 = static_cast<float>(1.0 / (2.0 * sigma * sigma)), grey = static_cast<float>(grey_threshold);
  int16_t* id_out = ids.data_ptr<int16_t>();
  float* w_out = wts.data_ptr<float>();
  dispatch_float(images.scalar_type(), "colorization_targets: images", [&](auto tag) {
    using X = decltype(tag);
    if constexpr (std::is_same_v<X, double>) {
      TORCH_CHECK(false, "colorization_targets: images expected float32, bfloat16 or float16, got float64");
    } else {
      const X* img = ptr<const X>(images);
      const int64_t sb = images.stride(0), sc = images.stride(1), sh = images.stride(2), sw = images.stride(3);
      at::parallel_for(0, B * h, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t b = r / h, i = r % h;
          bool ng = false;
          encode_row<X>(img + b * sb + i * stride * sh, sc, sw, stride, w, G, K, inv2s2, grey, id_out + r * w * K,
                        w_out + r * w * K, nearest.data() + r * w, ng);
          row_nongray[r] = ng ? 1 : 0;
        }
      });
    }
  });
  bool* ng = nongray.data_ptr<bool>();
  float* reb = rebalance.data_ptr<float>();
  const float* fp = fac.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    bool any = false;
    for (int64_t i = 0; i < h; ++i) any = any || row_nongray[b * h + i] != 0;
    ng[b] = any;
    for (int64_t p = b * h * w; p < (b + 1) * h * w; ++p) reb[p] = any ? fp[nearest[p]] : 0.0f;
  }
  return {ids, wts, rebalance, nongray};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("colorization_targets_cpu(Tensor images, Tensor bins, Tensor factor, int stride, int num_neighbors, "
        "float sigma, float grey_threshold) -> (Tensor, Tensor, Tensor, Tensor)",
        &colorization_targets_cpu);
}

}  // namespace sslkern
