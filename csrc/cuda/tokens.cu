// gather_tokens / restore_tokens — CUDA C++ kernels (semantics: csrc/cpu/tokens.cpp).
//
// Forward: one warp per output row (blockDim = 32 x kRowsPerBlock). The warp resolves the
// row's source (prefix row, kept patch, visible token, mask token or fill row) once, then
// copies it with 16-byte vector accesses (4 fp32 / 8 bf16 or fp16 per thread) and adds the
// position row in fp32 on the way. Falls back to scalar accesses when a base address or the
// row pitch is not 16-byte aligned.
// Backward: gather scatter-adds grad rows into an fp32 (fp64) buffer with (relaxed) atomics
// (a token kept by several clone masks adds up); restore scatters visible rows, and sums the
// mask token's gradient with atomics. The positions' gradient is a separate batch reduction
// (at::sum), not atomics. The accumulation buffers are cast to the input dtype by the launcher.
// gpu_report: threads=128
// Index values are checked once by the public Python functions (check_indices=True: one
// device reduction + host sync); the launchers never sync (CUDA-graph capturable), and the
// kernels skip any out-of-range row.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace sslkern {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename AccT<T>::type to_acc(T v) {
  return static_cast<typename AccT<T>::type>(v);
}

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// dst[0:D] = src[0:D] (+ pos[0:D]); lanes of one warp stride over 16-byte vectors.
template <typename T, int VEC>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, const T* __restrict__ pos,
                                         int64_t D, int lane) {
  using V = Vec<T, VEC>;
  const int64_t nvec = D / VEC;
  for (int64_t i = lane; i < nvec; i += 32) {
    V a = reinterpret_cast<const V*>(src)[i];
    if (pos != nullptr) {
      const V p = reinterpret_cast<const V*>(pos)[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = static_cast<T>(to_acc(a.v[e]) + to_acc(p.v[e]));
    }
    reinterpret_cast<V*>(dst)[i] = a;
  }
  for (int64_t d = nvec * VEC + lane; d < D; d += 32) {
    dst[d] = pos != nullptr ? static_cast<T>(to_acc(src[d]) + to_acc(pos[d])) : src[d];
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ dst, int64_t D, int lane) {
  for (int64_t d = lane; d < D; d += 32) dst[d] = static_cast<T>(0.f);
}

template <typename T, typename A>
__device__ __forceinline__ void atomic_add_row(A* __restrict__ dst, const T* __restrict__ src, int64_t D, int lane) {
  for (int64_t d = lane; d < D; d += 32) atomicAdd(dst + d, to_acc(src[d]));
}

struct GatherIdx {
  int64_t b, m, t;
};

__device__ __forceinline__ GatherIdx gather_index(int64_t r, int64_t B, int64_t M, int64_t Lo, bool mask_major) {
  const int64_t row = r / Lo, t = r % Lo;
  return mask_major ? GatherIdx{row % B, row / B, t} : GatherIdx{row / M, row % M, t};
}

template <typename T, int VEC>
__global__ void gather_tokens_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids, const T* __restrict__ pos,
                                     T* __restrict__ out, int64_t B, int64_t M, int64_t Nk, int64_t L, int64_t P,
                                     int64_t D, int64_t rows, bool mask_major) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const GatherIdx g = gather_index(r, B, M, P + Nk, mask_major);
  const int64_t s = g.t < P ? g.t : P + ids[(g.b * M + g.m) * Nk + (g.t - P)];
  if (s < 0 || s >= L) {  // unreachable after the launcher's check; never read out of bounds
    zero_row(out + r * D, D, threadIdx.x);
    return;
  }
  copy_row<T, VEC>(out + r * D, x + (g.b * L + s) * D, pos != nullptr ? pos + s * D : nullptr, D, threadIdx.x);
}

template <typename T, typename A>
__global__ void gather_tokens_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ids,
                                              A* __restrict__ grad_x, int64_t B, int64_t M, int64_t Nk, int64_t L,
                                              int64_t P, int64_t D, int64_t rows, bool mask_major) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const GatherIdx g = gather_index(r, B, M, P + Nk, mask_major);
  const int64_t s = g.t < P ? g.t : P + ids[(g.b * M + g.m) * Nk + (g.t - P)];
  if (s < 0 || s >= L) return;
  atomic_add_row(grad_x + (g.b * L + s) * D, grad_out + r * D, D, threadIdx.x);
}

template <typename T, int VEC>
__global__ void restore_tokens_kernel(const T* __restrict__ x_vis, const int64_t* __restrict__ ids,
                                      const T* __restrict__ mask_token, const T* __restrict__ fill,
                                      const T* __restrict__ pos, T* __restrict__ out, int64_t N, int64_t Nk, int64_t P,
                                      int64_t D, int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const int64_t L = P + N, Lv = P + Nk, b = r / L, t = r % L;
  const T* src;
  if (t < P) {
    src = x_vis + (b * Lv + t) * D;
  } else {
    const int64_t i = t - P, k = ids[b * N + i];
    if (k < 0 || k >= N) {
      zero_row(out + r * D, D, threadIdx.x);
      return;
    }
    src = k < Nk ? x_vis + (b * Lv + P + k) * D : (mask_token != nullptr ? mask_token : fill + (b * N + i) * D);
  }
  copy_row<T, VEC>(out + r * D, src, pos != nullptr ? pos + t * D : nullptr, D, threadIdx.x);
}

template <typename T, typename A>
__global__ void restore_tokens_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ids,
                                               T* __restrict__ grad_vis, T* __restrict__ grad_fill,
                                               A* __restrict__ grad_mt, int64_t N, int64_t Nk, int64_t P, int64_t D,
                                               int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const int64_t L = P + N, Lv = P + Nk, b = r / L, t = r % L;
  const T* g = grad_out + r * D;
  if (t < P) {
    copy_row<T, 1>(grad_vis + (b * Lv + t) * D, g, nullptr, D, threadIdx.x);
    return;
  }
  const int64_t i = t - P, k = ids[b * N + i];
  if (k < 0 || k >= N) return;
  if (k < Nk) {
    copy_row<T, 1>(grad_vis + (b * Lv + P + k) * D, g, nullptr, D, threadIdx.x);
    if (grad_fill != nullptr) zero_row(grad_fill + (b * N + i) * D, D, threadIdx.x);
  } else {
    if (grad_fill != nullptr) copy_row<T, 1>(grad_fill + (b * N + i) * D, g, nullptr, D, threadIdx.x);
    if (grad_mt != nullptr) atomic_add_row(grad_mt, g, D, threadIdx.x);
  }
}

// ---------------------------------------------------------------------------------------
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "sslkern.", op, ": ", name, " must be a contiguous CUDA tensor");
}

void check_index_dtype(const at::Tensor& ids, const char* op, const char* name) {
  // values are not checked here (that would be a host sync): the Python front door does it once
  TORCH_CHECK(ids.scalar_type() == at::kLong, "sslkern.", op, ": ", name, " must be int64");
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename F>
void dispatch_types(at::ScalarType dt, const char* what, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, what, ": expected a float16, bfloat16, float32 or float64 tensor, got ", dt);
  }
}

dim3 grid_for(int64_t rows) { return dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)); }
const dim3 kBlock(32, kRowsPerBlock);

template <typename T> const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos,
                              int64_t P, bool mask_major) {
  const char* op = "gather_tokens";
  check_cuda(x, op, "x");
  check_cuda(ids_keep, op, "ids_keep");
  TORCH_CHECK(x.dim() == 3 && ids_keep.dim() == 3 && ids_keep.size(0) == x.size(0), "sslkern.", op, ": bad shapes");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), M = ids_keep.size(1), Nk = ids_keep.size(2);
  TORCH_CHECK(P >= 0 && P <= L, "sslkern.", op, ": num_prefix_tokens out of range");
  if (pos.has_value() && pos->defined()) {
    check_cuda(*pos, op, "pos_embed");
    TORCH_CHECK(pos->numel() == L * D && pos->scalar_type() == x.scalar_type(), "sslkern.", op, ": bad pos_embed");
  }
  c10::cuda::CUDAGuard guard(x.device());
  check_index_dtype(ids_keep, op, "ids_keep");
  at::Tensor out = at::empty({B * M, P + Nk, D}, x.options());
  const int64_t rows = B * M * (P + Nk);
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* pp = opt_ptr<T>(pos);
    const bool vec = (D * sizeof(T)) % 16 == 0 && aligned16({x.data_ptr(), out.data_ptr(), pp});
    if (vec) {
      gather_tokens_kernel<T, 16 / sizeof(T)><<<grid_for(rows), kBlock, 0, stream>>>(
          x.data_ptr<T>(), ids_keep.data_ptr<int64_t>(), pp, out.data_ptr<T>(), B, M, Nk, L, P, D, rows, mask_major);
    } else {
      gather_tokens_kernel<T, 1><<<grid_for(rows), kBlock, 0, stream>>>(
          x.data_ptr<T>(), ids_keep.data_ptr<int64_t>(), pp, out.data_ptr<T>(), B, M, Nk, L, P, D, rows, mask_major);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                               int64_t L, int64_t P, bool mask_major, bool need_pos) {
  const char* op = "gather_tokens_backward";
  check_cuda(grad_out, op, "grad_out");
  check_cuda(ids_keep, op, "ids_keep");
  const int64_t B = ids_keep.size(0), M = ids_keep.size(1), Nk = ids_keep.size(2), D = grad_out.size(2);
  TORCH_CHECK(grad_out.size(0) == B * M && grad_out.size(1) == P + Nk && P >= 0 && P <= L, "sslkern.", op,
              ": bad shapes");
  c10::cuda::CUDAGuard guard(grad_out.device());
  check_index_dtype(ids_keep, op, "ids_keep");
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gx = at::zeros({B, L, D}, grad_out.options().dtype(acc));
  const int64_t rows = B * M * (P + Nk);
  if (rows > 0 && D > 0) {
    dispatch_types(grad_out.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      using A = typename AccT<T>::type;
      gather_tokens_backward_kernel<T, A><<<grid_for(rows), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_out.data_ptr<T>(), ids_keep.data_ptr<int64_t>(), gx.data_ptr<A>(), B, M, Nk, L, P, D, rows,
          mask_major);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // positions: the batch sum of grad_x (a reduction, not atomics); (0,) when not needed, as the fake
  at::Tensor gp = need_pos ? gx.sum(0).to(grad_out.scalar_type()) : at::empty({0}, grad_out.options());
  return {gx.to(grad_out.scalar_type()), gp};
}

at::Tensor restore_tokens_cuda(const at::Tensor& x_vis, const at::Tensor& ids_restore,
                               const std::optional<at::Tensor>& mask_token, const std::optional<at::Tensor>& fill,
                               const std::optional<at::Tensor>& pos, int64_t P) {
  const char* op = "restore_tokens";
  check_cuda(x_vis, op, "x_vis");
  check_cuda(ids_restore, op, "ids_restore");
  const int64_t B = x_vis.size(0), Lv = x_vis.size(1), D = x_vis.size(2), N = ids_restore.size(1), Nk = Lv - P;
  TORCH_CHECK(ids_restore.size(0) == B && P >= 0 && Nk >= 0 && Nk <= N, "sslkern.", op, ": bad shapes");
  const bool has_mt = mask_token.has_value() && mask_token->defined();
  const bool has_fill = fill.has_value() && fill->defined();
  TORCH_CHECK(has_mt != has_fill, "sslkern.", op, ": exactly one of mask_token and fill must be given");
  if (has_mt) {
    check_cuda(*mask_token, op, "mask_token");
    TORCH_CHECK(mask_token->numel() == D && mask_token->scalar_type() == x_vis.scalar_type(), "sslkern.", op,
                ": bad mask_token");
  } else {
    check_cuda(*fill, op, "fill");
    TORCH_CHECK(fill->numel() == B * N * D && fill->scalar_type() == x_vis.scalar_type(), "sslkern.", op, ": bad fill");
  }
  if (pos.has_value() && pos->defined()) {
    check_cuda(*pos, op, "pos_embed");
    TORCH_CHECK(pos->numel() == (P + N) * D && pos->scalar_type() == x_vis.scalar_type(), "sslkern.", op,
                ": bad pos_embed");
  }
  c10::cuda::CUDAGuard guard(x_vis.device());
  check_index_dtype(ids_restore, op, "ids_restore");
  at::Tensor out = at::empty({B, P + N, D}, x_vis.options());
  const int64_t rows = B * (P + N);
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x_vis.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* mt = opt_ptr<T>(mask_token);
    const T* fp = opt_ptr<T>(fill);
    const T* pp = opt_ptr<T>(pos);
    const bool vec = (D * sizeof(T)) % 16 == 0 && aligned16({x_vis.data_ptr(), out.data_ptr(), mt, fp, pp});
    if (vec) {
      restore_tokens_kernel<T, 16 / sizeof(T)><<<grid_for(rows), kBlock, 0, stream>>>(
          x_vis.data_ptr<T>(), ids_restore.data_ptr<int64_t>(), mt, fp, pp, out.data_ptr<T>(), N, Nk, P, D, rows);
    } else {
      restore_tokens_kernel<T, 1><<<grid_for(rows), kBlock, 0, stream>>>(
          x_vis.data_ptr<T>(), ids_restore.data_ptr<int64_t>(), mt, fp, pp, out.data_ptr<T>(), N, Nk, P, D, rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> restore_tokens_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t Nk, int64_t P, bool need_mask_token,
    bool need_fill, bool need_pos) {
  const char* op = "restore_tokens_backward";
  check_cuda(grad_out, op, "grad_out");
  check_cuda(ids_restore, op, "ids_restore");
  const int64_t B = ids_restore.size(0), N = ids_restore.size(1), D = grad_out.size(2), L = P + N;
  TORCH_CHECK(grad_out.size(0) == B && grad_out.size(1) == L && P >= 0 && Nk >= 0 && Nk <= N, "sslkern.", op,
              ": bad shapes");
  c10::cuda::CUDAGuard guard(grad_out.device());
  check_index_dtype(ids_restore, op, "ids_restore");
  const auto opts = grad_out.options();
  const auto acc = opts.dtype(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor gv = at::zeros({B, P + Nk, D}, opts);  // zeros: ranks missing from a non-permutation
  at::Tensor gf = need_fill ? at::empty({B, N, D}, opts) : at::empty({0}, opts);
  at::Tensor gm = at::zeros({need_mask_token ? D : 0}, acc);
  const int64_t rows = B * L;
  if (rows > 0 && D > 0) {
    dispatch_types(grad_out.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      using A = typename AccT<T>::type;
      restore_tokens_backward_kernel<T, A><<<grid_for(rows), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_out.data_ptr<T>(), ids_restore.data_ptr<int64_t>(), gv.data_ptr<T>(),
          need_fill ? gf.data_ptr<T>() : nullptr, need_mask_token ? gm.data_ptr<A>() : nullptr, N, Nk, P, D, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // positions: the batch sum of grad_out in fp32 (a reduction, not atomics); (0,) when not needed
  at::Tensor gp = need_pos ? grad_out.to(acc).sum(0).to(grad_out.scalar_type()) : at::empty({0}, opts);
  return {gv, gm.to(grad_out.scalar_type()), gf, gp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("gather_tokens_cuda(Tensor x, Tensor ids_keep, Tensor? pos_embed, int num_prefix_tokens, bool mask_major) "
        "-> Tensor", &gather_tokens_cuda);
  m.def("gather_tokens_backward_cuda(Tensor grad_out, Tensor ids_keep, int num_tokens, int num_prefix_tokens, "
        "bool mask_major, bool need_pos) -> (Tensor, Tensor)", &gather_tokens_backward_cuda);
  m.def("restore_tokens_cuda(Tensor x_vis, Tensor ids_restore, Tensor? mask_token, Tensor? fill, Tensor? pos_embed, "
        "int num_prefix_tokens) -> Tensor", &restore_tokens_cuda);
  m.def("restore_tokens_backward_cuda(Tensor grad_out, Tensor ids_restore, int num_visible, int num_prefix_tokens, "
        "bool need_mask_token, bool need_fill, bool need_pos) -> (Tensor, Tensor, Tensor, Tensor)",
        &restore_tokens_backward_cuda);
}

}  // namespace sslkern
