// Shared helpers for sslkern's C++ kernels: scalar load/store with fp32 compute for
// fp32 / fp64 / fp16 / bf16 storage, dtype dispatch, and argument checks that name the
// argument. The Python front door validates arguments first; the TORCH_CHECKs here are
// the second line that keeps a direct torch.ops call from touching memory it must not.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace sslkern {

// Flush-to-zero + denormals-are-zero on the current thread while the guard lives; the
// thread's previous modes are restored on exit (also on an exception), and its sticky
// exception flags are left as the kernel raised them. Float32 subnormals (|x| < 1.2e-38)
// cost a microcode assist (~100+ cycles) per instruction that reads or produces one on x86:
// softmax kernels whose logits / temperature spread over more than ~87 hit them on every
// row (the DINO teacher at tt = 0.04 on cosine logits), and the products of tiny
// probabilities with gradients produce them even when exp itself returns 0 or a normal.
// With the guard such values become 0, an error below 1.2e-38 absolute. Every exp-based
// kernel holds one on the calling thread and in each task of its at::parallel_for
// (OpenMP workers keep their own MXCSR, so the caller's setting would not reach them).
namespace ftz_detail {
#if defined(__aarch64__)
constexpr uint32_t kBits = 1u << 24;  // FPCR.FZ
inline uint32_t get() {
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  return static_cast<uint32_t>(fpcr & kBits);
}
inline void set(uint32_t bits) {
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  fpcr = (fpcr & ~static_cast<uint64_t>(kBits)) | bits;
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
#elif defined(__x86_64__) || defined(__i386__)
constexpr uint32_t kBits = 0x8040u;  // MXCSR FTZ (bit 15) | DAZ (bit 6)
inline uint32_t get() { return _mm_getcsr() & kBits; }
inline void set(uint32_t bits) { _mm_setcsr((_mm_getcsr() & ~kBits) | bits); }
#else
constexpr uint32_t kBits = 0;
inline uint32_t get() { return 0; }
inline void set(uint32_t) {}
#endif
// Per thread: how many guards are live, and the modes the thread had before the outermost.
inline int& depth() { thread_local int d = 0; return d; }
inline uint32_t& outer() { thread_local uint32_t bits = 0; return bits; }
}  // namespace ftz_detail

class FlushDenormals {
 public:
  FlushDenormals() : saved_(ftz_detail::get()) {
    if (ftz_detail::depth()++ == 0) ftz_detail::outer() = saved_;
    ftz_detail::set(ftz_detail::kBits);
  }
  ~FlushDenormals() {
    --ftz_detail::depth();
    ftz_detail::set(saved_);
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint32_t saved_;
};

// The calling thread back in the modes it had before its outermost FlushDenormals, while
// this lives. Threads inherit the floating-point environment of the thread that creates
// them (POSIX): an OpenMP / ATen pool created or grown inside a parallel_for launched under
// a guard would otherwise start with FTZ/DAZ set, keep it after the kernel (each task
// restores what its thread had) and flush every later op of the process.
class CallerModes {
 public:
  CallerModes() : saved_(ftz_detail::get()) {
    if (ftz_detail::depth() > 0) ftz_detail::set(ftz_detail::outer());
  }
  ~CallerModes() { ftz_detail::set(saved_); }
  CallerModes(const CallerModes&) = delete;
  CallerModes& operator=(const CallerModes&) = delete;

 private:
  uint32_t saved_;
};

// at::parallel_for with a FlushDenormals guard in every task (worker threads and the
// caller), launched with the caller's own modes so that threads it spawns inherit those.
template <typename F>
inline void parallel_for_ftz(int64_t begin, int64_t end, int64_t grain, const F& f) {
  CallerModes launch;
  at::parallel_for(begin, end, grain, [&f](int64_t lo, int64_t hi) {
    FlushDenormals guard;
    f(lo, hi);
  });
}

// Storage types. fp16 uses the compiler's _Float16 (vectorizes to F16C conversions);
// bf16 is converted by bit manipulation (round to nearest even on store).
struct bf16_t { uint16_t bits; };
using f16_t = _Float16;

template <typename T> inline float load_f(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <> inline float load_f<bf16_t>(const bf16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> inline void store_f(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }
template <> inline void store_f<bf16_t>(bf16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    p[i].bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i].bits = static_cast<uint16_t>(u >> 16);
}

// Calls f(T{}) with T the storage type of `dtype` (float, double, f16_t, bf16_t).
template <typename F>
inline auto dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(f16_t{});
    case at::kBFloat16: return f(bf16_t{});
    default:
      TORCH_CHECK(false, what, ": expected a float16, bfloat16, float32 or float64 tensor, got ", dtype);
  }
}

// exp for float, vectorizable: Cody-Waite range reduction and Cephes' degree-6 polynomial
// (~1 ulp). Inputs below -87 return exactly 0 (exp(-87) ~ 1.6e-38 is just above the
// smallest normal, 1.18e-38: the result is never subnormal, so exp itself never costs a
// denormal assist; products of its results can still be subnormal, see FlushDenormals). Inputs above 88.3 are clamped (callers pass x <= ~0: scores minus
// a row max or log-sum-exp). NaN stays NaN. Shared by the dino_loss and alibi_attention kernels.
inline float exp_fast(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  x = x > 88.3f ? 88.3f : x;
  // round to nearest by the 1.5*2^23 trick (std::floor would be a libm call, not vectorized)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.0f : e * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

#if defined(__AVX512F__)
// gcc 12 flags the intrinsics' internal _mm512_undefined operands (GCC bug 105593); every
// file that includes this header and uses AVX-512 intrinsics is covered by this pragma.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// exp_fast on 16 lanes with AVX-512's scalef (2^n · e without bit tricks or clamps): the same
// range reduction and polynomial, ~40 % fewer instructions. Lanes below -87 (and -inf) give
// exactly 0, NaN stays NaN. For loops whose trip count is a multiple of 16.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), e, n);
}
#endif

template <typename T> inline T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// A contiguous uninitialized CPU tensor for a kernel output, from the output cache
// (csrc/cpu/output_cache.cpp): storage that no tensor refers to any more is reused instead
// of faulting in fresh pages every step. Use it for large outputs only a kernel writes.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
void output_cache_clear();
void output_cache_set_limit(int64_t bytes);
std::vector<int64_t> output_cache_info();

}  // namespace sslkern
