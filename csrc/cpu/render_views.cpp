// render_views — training views of a ragged uint8 batch, C++ CPU kernel.
//
// One task renders one view end to end in fp32 (threads take views from a shared counter, so
// views of unequal cost spread evenly), in the order of sslkern/reference/render_views.py:
//   1. crop + resize into a planar C x S x S buffer. Without rotation: ATen's antialiased
//      bilinear weights (_upsample_bilinear2d_aa), computed once per view and axis; the
//      vertical pass combines whole source rows of the box (contiguous uint8 → fp32, the 1/255
//      folded into the weights) into one row buffer, the horizontal pass computes 16 output
//      columns at a time from the window of source pixels they read (weights regrouped per
//      block: a broadcast-FMA per pixel, no gathers). The flip reverses the horizontal tap
//      table. With rotation: bilinear sampling of the rotated box, coordinates clamped to the
//      image (border padding). Threads take the views in source-image order.
//   2. the jitter ops in the view's order, then grayscale, each a pass over the buffer (the
//      contrast op needs the mean of the current image, so the ops cannot share one pass);
//   3. separable Gaussian blur: vertical pass into a second buffer, then per row a
//      reflect-padded copy and the horizontal pass, fused with
//   4. solarize, normalise and the cast to the output dtype on the way out.
// Every argument and parameter value is checked here too (TORCH_CHECK), so a direct call of
// torch.ops.sslkern_C.render_views_cpu cannot read outside an image.
//
// No FP exception traps are read here: without -fno-trapping-math gcc does not if-convert the
// hue conversion's divisions and selects, and that loop stays scalar. Results unchanged. Set
// for this file only, before any include, so every function here has the same options.
#pragma GCC optimize("no-trapping-math")
#include "common.h"

#include <algorithm>
#include <atomic>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <numeric>
#include <vector>

namespace sslkern {
namespace {

constexpr float kGrayR = 0.2989f, kGrayG = 0.587f, kGrayB = 0.114f;

// Taps of one axis for every output index i: source pixels start[i] .. start[i] + mt - 1 with
// weights w[t * out + i] (zero past the pixel's own count, so loops run a fixed mt taps).
struct AxisTaps {
  int64_t mt = 0;
  std::vector<int32_t> start;
  std::vector<float> w;
};

// ATen's _upsample_bilinear2d_aa weights for the box [begin, begin + length) of an axis of
// `in` pixels, output `out` pixels: centre c = begin + scale·(i + 0.5), support max(scale, 1),
// weight of pixel p max(0, 1 - |p + 0.5 - c| / support) over p in [floor(c - support + 0.5),
// floor(c + support + 0.5)) ∩ [floor(begin), ceil(begin + length)) ∩ [0, in), normalised.
// Only pixels of positive weight are kept (|p + 0.5 - c| < support: at most ceil(2·support) of
// them, from floor(c - support - 0.5) + 1); ATen's range adds zero-weight pixels at its ends.
void aa_taps(double begin, double length, int64_t out, int64_t in, float gain, bool reverse, AxisTaps& t) {
  const double scale = length / static_cast<double>(out);
  const double support = std::max(scale, 1.0);
  const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(begin)));
  const int64_t hi = std::min<int64_t>(in, static_cast<int64_t>(std::ceil(begin + length)));
  t.mt = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(2.0 * support)));
  t.start.assign(out, static_cast<int32_t>(lo));
  t.w.assign(t.mt * out, 0.f);
  std::vector<double> w(t.mt);
  for (int64_t i = 0; i < out; ++i) {
    const double c = begin + scale * (static_cast<double>(i) + 0.5);
    const int64_t x0 = std::max<int64_t>(lo, static_cast<int64_t>(std::floor(c - support - 0.5)) + 1);
    const int64_t x1 = std::min<int64_t>({hi, static_cast<int64_t>(std::floor(c + support + 0.5)), x0 + t.mt});
    double total = 0.0;
    for (int64_t x = x0; x < x1; ++x) {
      w[x - x0] = std::max(0.0, 1.0 - std::abs(static_cast<double>(x) + 0.5 - c) / support);
      total += w[x - x0];
    }
    const int64_t o = reverse ? out - 1 - i : i;
    t.start[o] = static_cast<int32_t>(std::min(x0, std::max<int64_t>(hi - 1, 0)));
    if (total <= 0.0) continue;  // no pixel (cannot happen for a box inside the image): zeros
    for (int64_t x = x0; x < x1; ++x) t.w[(x - x0) * out + o] = static_cast<float>(w[x - x0] / total * gain);
  }
}

inline int64_t reflect_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

inline float clamp01(float x) { return std::min(std::max(x, 0.f), 1.f); }

// dst[j] = Σ_t w[t] · rows[t][j], j < n: the weighted sum of K source rows (resample and blur
// taps), accumulated in registers over blocks of 32 columns (one load of each source element,
// one store of each result) instead of K read-modify-write passes over dst. GCC's generic
// vectors (two zmm registers with AVX-512, four ymm with AVX2): left to itself gcc vectorizes
// the tap loop with gathers and keeps the sums on the stack.
#pragma GCC diagnostic ignored "-Wpsabi"  // internal functions: no ABI to keep
typedef float f32x16 __attribute__((vector_size(64)));
inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// 16 bytes → 16 floats. gcc scalarizes __builtin_convertvector from uint8 vectors (a convert
// instruction per byte), hence the zero-extension intrinsics where the ISA has them.
inline f32x16 load16(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  f32x16 v;
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
#else
  f32x16 v;
  for (int q = 0; q < 16; ++q) v[q] = static_cast<float>(p[q]);
  return v;
#endif
}

template <typename X>
void weighted_rows(const X* const* rows, const float* w, int64_t K, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {  // four independent sums: an FMA's latency is 4 cycles
    f32x16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    for (int64_t t = 0; t < K; ++t) {
      const X* src = rows[t] + j;
      acc0 += w[t] * load16(src);
      acc1 += w[t] * load16(src + 16);
      acc2 += w[t] * load16(src + 32);
      acc3 += w[t] * load16(src + 48);
    }
    std::memcpy(dst + j, &acc0, sizeof acc0);
    std::memcpy(dst + j + 16, &acc1, sizeof acc1);
    std::memcpy(dst + j + 32, &acc2, sizeof acc2);
    std::memcpy(dst + j + 48, &acc3, sizeof acc3);
  }
  for (; j + 16 <= n; j += 16) {
    f32x16 acc = {};
    for (int64_t t = 0; t < K; ++t) acc += w[t] * load16(rows[t] + j);
    std::memcpy(dst + j, &acc, sizeof acc);
  }
  for (; j < n; ++j) {
    float acc = 0.f;
    for (int64_t t = 0; t < K; ++t) acc += w[t] * static_cast<float>(rows[t][j]);
    dst[j] = acc;
  }
}

struct ViewArgs {
  int64_t src;
  float top, left, h, w, angle;
  bool flip, gray, solarize;
  float jit[4];
  int64_t order[4];
  float sigma;
  int64_t radius;
};

// The horizontal taps regrouped per block of 16 output columns: block k reads the source
// window [base[k], base[k] + len[k]) and w holds, per window pixel x, the 16 outputs' weights
// of that pixel (w[(k·lmax + x)·16 + q], zero where output q does not use it). A row is then
// resampled with one broadcast-FMA per window pixel and block instead of one gather per tap.
struct Band {
  int64_t lmax = 0;
  std::vector<int32_t> base, len;
  std::vector<float> w;
};

void make_band(const AxisTaps& t, int64_t out, Band& b) {
  const int64_t blocks = (out + 15) / 16;
  b.base.assign(blocks, 0);
  b.len.assign(blocks, 0);
  b.lmax = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    int64_t lo = INT64_MAX, hi = 0;
    for (int64_t j = 16 * k; j < std::min(out, 16 * k + 16); ++j) {
      lo = std::min<int64_t>(lo, t.start[j]);
      hi = std::max<int64_t>(hi, t.start[j] + t.mt);
    }
    b.base[k] = static_cast<int32_t>(lo);
    b.len[k] = static_cast<int32_t>(hi - lo);
    b.lmax = std::max<int64_t>(b.lmax, hi - lo);
  }
  b.w.assign(blocks * b.lmax * 16, 0.f);
  for (int64_t j = 0; j < out; ++j) {
    const int64_t k = j / 16, q = j % 16;
    for (int64_t tt = 0; tt < t.mt; ++tt)
      b.w[(k * b.lmax + t.start[j] + tt - b.base[k]) * 16 + q] = t.w[tt * out + j];
  }
}

struct Scratch {
  std::vector<float> a, b, row, planar, pad;
  AxisTaps ty, tx;
  Band band;
};

// Step 1 without rotation: antialiased resize of the box into a (C, S, S).
void resize_box(const uint8_t* img, int64_t H, int64_t W, int64_t C, const ViewArgs& v, int64_t S, Scratch& s,
                float* a) {
  aa_taps(v.top, v.h, S, H, 1.f / 255.f, false, s.ty);
  aa_taps(v.left, v.w, S, W, 1.f, v.flip, s.tx);
  int64_t xa = W, xb = 0;  // the source columns any output column reads
  for (int64_t j = 0; j < S; ++j) {
    xa = std::min<int64_t>(xa, s.tx.start[j]);
    xb = std::max<int64_t>(xb, std::min<int64_t>(s.tx.start[j] + s.tx.mt, W));
  }
  const int64_t n = xb - xa, mtx = s.tx.mt, mty = s.ty.mt;
  make_band(s.tx, S, s.band);
  s.row.resize(n * C);
  s.planar.assign(C * (n + mtx), 0.f);  // zero tail: taps past the last column read zeros
  const int64_t plane = S * S;
  std::vector<const uint8_t*> src(mty);
  std::vector<float> wy(mty);
  for (int64_t i = 0; i < S; ++i) {
    float* row = s.row.data();
    const int64_t y0 = s.ty.start[i];
    int64_t taps = 0;
    for (int64_t t = 0; t < mty && y0 + t < H; ++t) {
      if (s.ty.w[t * S + i] == 0.f) continue;
      src[taps] = img + ((y0 + t) * W + xa) * C;
      wy[taps++] = s.ty.w[t * S + i];
    }
    weighted_rows(src.data(), wy.data(), taps, n * C, row);
    for (int64_t c = 0; c < C; ++c) {
      float* pc = s.planar.data() + c * (n + mtx);
      if (C == 1) {
        std::copy(row, row + n, pc);
      } else {
        for (int64_t x = 0; x < n; ++x) pc[x] = row[x * C + c];
      }
      float* out = a + c * plane + i * S;
      const Band& band = s.band;
      for (int64_t k = 0, j0 = 0; j0 < S; ++k, j0 += 16) {
        const float* src = pc + band.base[k] - xa;
        const float* wk = band.w.data() + k * band.lmax * 16;
        f32x16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};  // independent sums (FMA latency)
        int64_t x = 0;
        for (; x + 4 <= band.len[k]; x += 4) {
          acc0 += load16(wk + 16 * x) * src[x];
          acc1 += load16(wk + 16 * x + 16) * src[x + 1];
          acc2 += load16(wk + 16 * x + 32) * src[x + 2];
          acc3 += load16(wk + 16 * x + 48) * src[x + 3];
        }
        for (; x < band.len[k]; ++x) acc0 += load16(wk + 16 * x) * src[x];
        const f32x16 acc = (acc0 + acc1) + (acc2 + acc3);
        std::memcpy(out + j0, &acc, sizeof(float) * std::min<int64_t>(16, S - j0));
      }
    }
  }
}

// Step 1 with rotation: bilinear samples of the rotated box, border padding (grid_sample's
// align_corners=False coordinates: pixel k spans [k, k + 1)).
void rotate_box(const uint8_t* img, int64_t H, int64_t W, int64_t C, const ViewArgs& v, int64_t S, float* a) {
  const double cs = std::cos(static_cast<double>(v.angle)), sn = std::sin(static_cast<double>(v.angle));
  const double cx = static_cast<double>(v.left) + v.w / 2.0, cy = static_cast<double>(v.top) + v.h / 2.0;
  const int64_t plane = S * S;
  for (int64_t i = 0; i < S; ++i) {
    const double dv = ((static_cast<double>(i) + 0.5) / S - 0.5) * v.h;
    for (int64_t j = 0; j < S; ++j) {
      const double du = ((static_cast<double>(j) + 0.5) / S - 0.5) * v.w;
      const double x = std::min(std::max(cx + cs * du - sn * dv - 0.5, 0.0), static_cast<double>(W - 1));
      const double y = std::min(std::max(cy + sn * du + cs * dv - 0.5, 0.0), static_cast<double>(H - 1));
      const int64_t x0 = static_cast<int64_t>(x), y0 = static_cast<int64_t>(y);
      const int64_t x1 = std::min(x0 + 1, W - 1), y1 = std::min(y0 + 1, H - 1);
      const float fx = static_cast<float>(x - x0), fy = static_cast<float>(y - y0);
      const int64_t o = i * S + (v.flip ? S - 1 - j : j);
      for (int64_t c = 0; c < C; ++c) {
        const float p00 = img[(y0 * W + x0) * C + c], p01 = img[(y0 * W + x1) * C + c];
        const float p10 = img[(y1 * W + x0) * C + c], p11 = img[(y1 * W + x1) * C + c];
        const float top = p00 + fx * (p01 - p00), bot = p10 + fx * (p11 - p10);
        a[c * plane + o] = (top + fy * (bot - top)) * (1.f / 255.f);
      }
    }
  }
}

// Step 2: the colour ops on the planar buffer (torchvision's float formulas).
void brightness(float* a, int64_t n, float f) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) a[k] = clamp01(a[k] * f);
}

double gray_mean(const float* a, int64_t C, int64_t plane) {
  double total = 0.0;
  if (C == 1) {
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < plane; ++k) total += a[k];
  } else {
    const float *r = a, *g = a + plane, *b = a + 2 * plane;
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < plane; ++k) total += kGrayR * r[k] + kGrayG * g[k] + kGrayB * b[k];
  }
  return total / static_cast<double>(plane);
}

void contrast(float* a, int64_t C, int64_t plane, float f) {
  const float m = static_cast<float>(gray_mean(a, C, plane)) * (1.f - f);
#pragma omp simd
  for (int64_t k = 0; k < C * plane; ++k) a[k] = clamp01(a[k] * f + m);
}

void saturation(float* a, int64_t plane, float f) {
  float *r = a, *g = a + plane, *b = a + 2 * plane;
  const float f1 = 1.f - f;
#pragma omp simd
  for (int64_t k = 0; k < plane; ++k) {
    const float l = (kGrayR * r[k] + kGrayG * g[k] + kGrayB * b[k]) * f1;
    r[k] = clamp01(r[k] * f + l);
    g[k] = clamp01(g[k] * f + l);
    b[k] = clamp01(b[k] * f + l);
  }
}

// RGB → HSV (Pillow's formulas as torchvision's _rgb_to_hsv), hue + shift mod 1, HSV → RGB
// (torchvision's _hsv_to_rgb: sector i = floor(6h) picks from v, p, q, t). Written as selects
// of values computed for every pixel so that the loop vectorizes.
void hue(float* a, int64_t plane, float shift) {
  float *r = a, *g = a + plane, *b = a + 2 * plane;
#pragma omp simd
  for (int64_t k = 0; k < plane; ++k) {
    const float R = r[k], G = g[k], B = b[k];
    const float maxc = std::max(R, std::max(G, B)), minc = std::min(R, std::min(G, B));
    const bool same = maxc == minc;
    const float span = maxc - minc;
    const float sat = span / (same ? 1.f : maxc);
    const float div = same ? 1.f : span;
    const float rc = (maxc - R) / div, gc = (maxc - G) / div, bc = (maxc - B) / div;
    const float h_r = bc - gc, h_g = 2.f + rc - bc, h_b = 4.f + gc - rc;
    float h = maxc == R ? h_r : (maxc == G ? h_g : h_b);
    h = h / 6.f + 1.f;
    h = h - std::floor(h);          // fmod(h / 6 + 1, 1): the argument is positive
    h = h + shift;
    h = h - std::floor(h);          // remainder(h + shift, 1)
    const float h6 = h * 6.f;
    float sector = std::floor(h6);
    const float f = h6 - sector;
    sector = sector >= 6.f ? sector - 6.f : sector;
    const float v = maxc;
    const float p = clamp01(v * (1.f - sat)), q = clamp01(v * (1.f - sat * f));
    const float t = clamp01(v * (1.f - sat * (1.f - f)));
    const bool s0 = sector == 0.f, s1 = sector == 1.f, s2 = sector == 2.f, s3 = sector == 3.f, s4 = sector == 4.f;
    float R2 = v, G2 = p, B2 = q;   // sector 5
    R2 = s4 ? t : R2;
    G2 = s4 ? p : G2;
    B2 = s4 ? v : B2;
    R2 = s3 ? p : R2;
    G2 = s3 ? q : G2;
    B2 = s3 ? v : B2;
    R2 = s2 ? p : R2;
    G2 = s2 ? v : G2;
    B2 = s2 ? t : B2;
    R2 = s1 ? q : R2;
    G2 = s1 ? v : G2;
    B2 = s1 ? p : B2;
    R2 = s0 ? v : R2;
    G2 = s0 ? t : G2;
    B2 = s0 ? p : B2;
    r[k] = R2;
    g[k] = G2;
    b[k] = B2;
  }
}

void grayscale(float* a, int64_t plane) {
  float *r = a, *g = a + plane, *b = a + 2 * plane;
#pragma omp simd
  for (int64_t k = 0; k < plane; ++k) {
    const float l = kGrayR * r[k] + kGrayG * g[k] + kGrayB * b[k];
    r[k] = l;
    g[k] = l;
    b[k] = l;
  }
}

// Steps 4-5 for one output row of one channel: solarize, normalise, cast, store.
template <typename T>
inline void finish_row(const float* x, int64_t S, bool solar, float mean, float inv_std, T* out) {
  if (solar) {
    for (int64_t j = 0; j < S; ++j) {
      const float y = x[j] >= 0.5f ? 1.f - x[j] : x[j];
      store_f(out, j, (y - mean) * inv_std);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < S; ++j) store_f(out, j, (x[j] - mean) * inv_std);
  }
}

template <typename T>
void render_view(const uint8_t* img, int64_t H, int64_t W, int64_t C, const ViewArgs& v, int64_t S,
                 const float* mean, const float* inv_std, Scratch& s, T* out) {
  const int64_t plane = S * S;
  s.a.resize(C * plane);
  float* a = s.a.data();
  if (v.angle == 0.f) {
    resize_box(img, H, W, C, v, S, s, a);
  } else {
    rotate_box(img, H, W, C, v, S, a);
  }
  for (int k = 0; k < 4; ++k) {
    const int64_t op = v.order[k];
    const float f = v.jit[op];
    if (op == 0 && f != 1.f) brightness(a, C * plane, f);
    if (op == 1 && f != 1.f) contrast(a, C, plane, f);
    if (op == 2 && f != 1.f && C == 3) saturation(a, plane, f);
    if (op == 3 && f != 0.f && C == 3) hue(a, plane, f);
  }
  if (v.gray && C == 3) grayscale(a, plane);
  if (v.sigma <= 0.f) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < S; ++i)
        finish_row(a + c * plane + i * S, S, v.solarize, mean[c], inv_std[c], out + c * plane + i * S);
    return;
  }
  const int64_t r = v.radius, K = 2 * r + 1;
  std::vector<float> k(K);
  {
    double total = 0.0;
    std::vector<double> kd(K);
    for (int64_t d = -r; d <= r; ++d) {
      kd[d + r] = std::exp(-static_cast<double>(d * d) / (2.0 * static_cast<double>(v.sigma) * v.sigma));
      total += kd[d + r];
    }
    // taps below 1e-30 of the centre are dropped: they change nothing and their products
    // with pixels would be subnormal (a microcode assist per instruction on x86)
    for (int64_t d = 0; d < K; ++d) k[d] = kd[d] / total < 1e-30 ? 0.f : static_cast<float>(kd[d] / total);
  }
  // taps of weight 0 (dropped above) are skipped
  std::vector<float> kw;
  std::vector<int64_t> kd;
  for (int64_t d = 0; d < K; ++d)
    if (k[d] != 0.f) {
      kw.push_back(k[d]);
      kd.push_back(d - r);
    }
  const int64_t taps = static_cast<int64_t>(kw.size());
  std::vector<const float*> src(taps);
  s.b.resize(C * plane);
  s.pad.resize(S + 2 * r);
  for (int64_t c = 0; c < C; ++c) {
    const float* ac = a + c * plane;
    float* bc = s.b.data() + c * plane;
    for (int64_t i = 0; i < S; ++i) {  // vertical pass
      for (int64_t t = 0; t < taps; ++t) src[t] = ac + reflect_index(i + kd[t], S) * S;
      weighted_rows(src.data(), kw.data(), taps, S, bc + i * S);
    }
    float* p = s.pad.data();
    for (int64_t t = 0; t < taps; ++t) src[t] = p + r + kd[t];
    for (int64_t i = 0; i < S; ++i) {  // horizontal pass on a reflect-padded copy, then the rest
      const float* srow = bc + i * S;
      for (int64_t j = 0; j < r; ++j) p[j] = srow[reflect_index(j - r, S)];
      std::copy(srow, srow + S, p + r);
      for (int64_t j = S + r; j < S + 2 * r; ++j) p[j] = srow[reflect_index(j - r, S)];
      float* dst = s.a.data() + c * plane + i * S;  // a's row i of channel c is no longer read
      weighted_rows(src.data(), kw.data(), taps, S, dst);
      finish_row(dst, S, v.solarize, mean[c], inv_std[c], out + c * plane + i * S);
    }
  }
}

at::Tensor render_views_cpu(const at::Tensor& data, const at::Tensor& offsets, const at::Tensor& hw,
                            const at::Tensor& src, const at::Tensor& box, const at::Tensor& angle,
                            const at::Tensor& flip, const at::Tensor& jitter, const at::Tensor& jitter_order,
                            const at::Tensor& gray, const at::Tensor& blur_sigma, const at::Tensor& solarize,
                            int64_t channels, int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                            at::ScalarType out_dtype, int64_t blur_kernel_size) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(),
              "render_views: data expected a contiguous 1-D uint8 CPU tensor");
  const int64_t B = offsets.numel(), T = data.numel();
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous(),
              "render_views: offsets expected a contiguous (B,) int64 tensor");
  TORCH_CHECK(hw.scalar_type() == at::kLong && hw.dim() == 2 && hw.size(0) == B && hw.size(1) == 2 &&
                  hw.is_contiguous(),
              "render_views: hw expected a contiguous (", B, ", 2) int64 tensor, got ", hw.sizes());
  TORCH_CHECK(channels == 1 || channels == 3, "render_views: channels expected 1 or 3, got ", channels);
  TORCH_CHECK(size >= 1, "render_views: size expected >= 1, got ", size);
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std_.size()) == channels,
              "render_views: mean and std expected ", channels, " values each");
  TORCH_CHECK(blur_kernel_size == 0 || (blur_kernel_size >= 1 && blur_kernel_size % 2 == 1 && blur_kernel_size <= 8191),
              "render_views: blur_kernel_size expected 0 (per-view default) or an odd size, got ", blur_kernel_size);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "render_views: out_dtype expected float32, bfloat16 or float16, got ", out_dtype);
  const int64_t V = src.numel();
  auto check_param = [&](const at::Tensor& t, const char* name, at::ScalarType dt, int64_t tail) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous() && t.numel() == V * tail &&
                    t.size(0) == V,
                "render_views: params.", name, " expected a contiguous CPU ", dt, " tensor with ", V, " rows, got ",
                t.scalar_type(), " ", t.sizes());
  };
  check_param(src, "src", at::kLong, 1);
  check_param(box, "box", at::kFloat, 4);
  check_param(angle, "angle", at::kFloat, 1);
  check_param(flip, "flip", at::kBool, 1);
  check_param(jitter, "jitter", at::kFloat, 4);
  check_param(jitter_order, "jitter_order", at::kLong, 4);
  check_param(gray, "gray", at::kBool, 1);
  check_param(blur_sigma, "blur_sigma", at::kFloat, 1);
  check_param(solarize, "solarize", at::kBool, 1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* hwp = hw.data_ptr<int64_t>();
  for (int64_t n = 0; n < B; ++n) {
    TORCH_CHECK(hwp[2 * n] >= 1 && hwp[2 * n + 1] >= 1 && off[n] >= 0 &&
                    off[n] + hwp[2 * n] * hwp[2 * n + 1] * channels <= T,
                "render_views: image ", n, " (offset ", off[n], ", size ", hwp[2 * n], "x", hwp[2 * n + 1],
                ") does not fit in data of ", T, " bytes");
  }
  const int64_t* sp = src.data_ptr<int64_t>();
  const float* bp = box.data_ptr<float>();
  const float* ap = angle.data_ptr<float>();
  const bool* fp = flip.data_ptr<bool>();
  const float* jp = jitter.data_ptr<float>();
  const int64_t* op = jitter_order.data_ptr<int64_t>();
  const bool* gp = gray.data_ptr<bool>();
  const float* sg = blur_sigma.data_ptr<float>();
  const bool* sol = solarize.data_ptr<bool>();
  std::vector<ViewArgs> views(V);
  for (int64_t v = 0; v < V; ++v) {
    ViewArgs& a = views[v];
    a.src = sp[v];
    TORCH_CHECK(a.src >= 0 && a.src < B, "render_views: params.src expected values in [0, ", B, "), got ", a.src);
    const double H = static_cast<double>(hwp[2 * a.src]), W = static_cast<double>(hwp[2 * a.src + 1]);
    a.top = bp[4 * v];
    a.left = bp[4 * v + 1];
    a.h = bp[4 * v + 2];
    a.w = bp[4 * v + 3];
    TORCH_CHECK(std::isfinite(a.top) && std::isfinite(a.left) && std::isfinite(a.h) && std::isfinite(a.w) &&
                    a.h > 0.f && a.w > 0.f && a.top >= 0.f && a.left >= 0.f &&
                    static_cast<double>(a.top) + a.h <= H + 1e-3 + 1e-6 * H &&
                    static_cast<double>(a.left) + a.w <= W + 1e-3 + 1e-6 * W,
                "render_views: params.box expected a box inside its image, got params.box[", v, "] = (", a.top, ", ",
                a.left, ", ", a.h, ", ", a.w, ") for an image of ", H, "x", W);
    a.angle = ap[v];
    TORCH_CHECK(std::isfinite(a.angle), "render_views: params.angle expected finite values, got ", a.angle);
    a.flip = fp[v];
    a.gray = gp[v];
    a.solarize = sol[v];
    bool seen[4] = {false, false, false, false};
    for (int k = 0; k < 4; ++k) {
      a.jit[k] = jp[4 * v + k];
      a.order[k] = op[4 * v + k];
      TORCH_CHECK(a.order[k] >= 0 && a.order[k] < 4 && !seen[a.order[k]],
                  "render_views: params.jitter_order expected a permutation of 0..3, got row ", v);
      seen[a.order[k]] = true;
    }
    TORCH_CHECK(std::isfinite(a.jit[0]) && std::isfinite(a.jit[1]) && std::isfinite(a.jit[2]) &&
                    std::isfinite(a.jit[3]) && a.jit[0] >= 0.f && a.jit[1] >= 0.f && a.jit[2] >= 0.f &&
                    std::abs(a.jit[3]) <= 0.5f,
                "render_views: params.jitter expected factors >= 0 and a hue shift in [-0.5, 0.5], got row ", v);
    a.sigma = sg[v];
    TORCH_CHECK(a.sigma >= 0.f && a.sigma <= 1000.f, "render_views: params.blur_sigma expected values in [0, 1000]");
    const int64_t default_radius = static_cast<int64_t>(std::ceil(3.f * a.sigma));
    a.radius = a.sigma > 0.f ? (blur_kernel_size > 0 ? blur_kernel_size / 2 : default_radius) : 0;
  }
  std::vector<float> mean_f(channels), inv_std(channels);
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK(std_[c] > 0.0, "render_views: std expected values > 0");
    mean_f[c] = static_cast<float>(mean[c]);
    inv_std[c] = static_cast<float>(1.0 / std_[c]);
  }
  at::Tensor out = empty_output({V, channels, size, size}, data.options().dtype(out_dtype));
  if (V == 0) return out;
  const uint8_t* base = data.data_ptr<uint8_t>();
  const int64_t per_view = channels * size * size;
  dispatch_float(out_dtype, "render_views: out_dtype", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(false, "render_views: out_dtype float64 is not supported");
    } else {
      T* o = ptr<T>(out);
      // views of one image one after another: its rows stay in cache between its views
      std::vector<int64_t> queue(V);
      std::iota(queue.begin(), queue.end(), int64_t{0});
      std::stable_sort(queue.begin(), queue.end(), [&](int64_t x, int64_t y) { return views[x].src < views[y].src; });
      std::atomic<int64_t> next{0};
      const int64_t workers = std::min<int64_t>(at::get_num_threads(), V);
      parallel_for_ftz(0, workers, 1, [&](int64_t lo, int64_t hi) {
        Scratch s;
        for (int64_t q = next.fetch_add(1); q < V; q = next.fetch_add(1)) {
          const int64_t v = queue[q];
          const ViewArgs& a = views[v];
          render_view<T>(base + off[a.src], hwp[2 * a.src], hwp[2 * a.src + 1], channels, a, size, mean_f.data(),
                         inv_std.data(), s, o + v * per_view);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("render_views_cpu(Tensor data, Tensor offsets, Tensor hw, Tensor src, Tensor box, Tensor angle, Tensor flip, "
        "Tensor jitter, Tensor jitter_order, Tensor gray, Tensor blur_sigma, Tensor solarize, int channels, int size, "
        "float[] mean, float[] std, ScalarType out_dtype, int blur_kernel_size) -> Tensor",
        &render_views_cpu);
}

}  // namespace sslkern
