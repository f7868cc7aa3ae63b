// ema_update_ — multi-tensor EMA, CUDA C++ kernel.
//
//   teacher <- teacher + (1 - m) * (student - teacher)
//
// evaluated like torch.lerp (t + w*(s - t) for w < 0.5, else s - m*(s - t)): exact at m = 0, 1.
//
// One launch per (teacher dtype, student dtype) group over a chunk table: each CUDA block
// owns one chunk of one tensor pair, read from a small table of (teacher address,
// student address, begin, end) rows copied to the device with the launch. m is read on the
// device from a 0-dim tensor when given one, so the update never waits on the host.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <map>
#include <utility>
#include <vector>

namespace sslkern {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 512;

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

template <typename TT, typename ST>
__global__ void ema_update_kernel(const int64_t* __restrict__ table, const float* __restrict__ momentum,
                                  float momentum_value) {
  const int64_t* row = table + 4 * static_cast<int64_t>(blockIdx.x);
  TT* __restrict__ t = reinterpret_cast<TT*>(row[0]);
  const ST* __restrict__ s = reinterpret_cast<const ST*>(row[1]);
  const int64_t begin = row[2], end = row[3];
  const float m = momentum != nullptr ? *momentum : momentum_value;
  const float w = 1.f - m;
  const bool small_w = w < 0.5f;
  const float c = small_w ? w : m;
  auto lerp = [=](float tv, float sv) { return small_w ? tv + c * (sv - tv) : sv - c * (sv - tv); };

  if constexpr (std::is_same_v<TT, float> && std::is_same_v<ST, float>) {
    // 16-byte accesses when both chunk starts are aligned (kChunk is a multiple of 4).
    if ((reinterpret_cast<uintptr_t>(t + begin) | reinterpret_cast<uintptr_t>(s + begin)) % 16 == 0) {
      const int64_t n4 = (end - begin) / 4;
      float4* t4 = reinterpret_cast<float4*>(t + begin);
      const float4* s4 = reinterpret_cast<const float4*>(s + begin);
      for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 a = t4[i];
        const float4 b = s4[i];
        a.x = lerp(a.x, b.x);
        a.y = lerp(a.y, b.y);
        a.z = lerp(a.z, b.z);
        a.w = lerp(a.w, b.w);
        t4[i] = a;
      }
      for (int64_t i = begin + 4 * n4 + threadIdx.x; i < end; i += blockDim.x) t[i] = lerp(t[i], s[i]);
      return;
    }
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    t[i] = from_f<TT>(lerp(to_f(t[i]), to_f(s[i])));
  }
}

template <typename TT, typename ST>
void launch(const at::Tensor& table_dev, int64_t nchunks, const float* momentum, float momentum_value,
            cudaStream_t stream) {
  ema_update_kernel<TT, ST><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
      table_dev.data_ptr<int64_t>(), momentum, momentum_value);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TT>
void launch_for_student(at::ScalarType sdtype, const at::Tensor& table, int64_t n, const float* mom, float mv,
                        cudaStream_t stream) {
  switch (sdtype) {
    case at::kFloat: return launch<TT, float>(table, n, mom, mv, stream);
    case at::kHalf: return launch<TT, c10::Half>(table, n, mom, mv, stream);
    case at::kBFloat16: return launch<TT, c10::BFloat16>(table, n, mom, mv, stream);
    default: TORCH_CHECK(false, "ema_update_: students must be float32, float16 or bfloat16 on CUDA, got ", sdtype);
  }
}

void ema_update_cuda(at::TensorList teachers, at::TensorList students, const std::optional<at::Tensor>& momentum,
                     double momentum_value) {
  TORCH_CHECK(teachers.size() == students.size(), "ema_update_: got ", teachers.size(), " teachers and ",
              students.size(), " students");
  if (teachers.empty()) return;
  const c10::cuda::CUDAGuard guard(teachers[0].device());
  at::Tensor mom;
  if (momentum.has_value() && momentum->defined()) mom = momentum->to(teachers[0].device(), at::kFloat);

  // Group pairs by dtype combination; one launch per group.
  std::map<std::pair<int, int>, std::vector<int64_t>> rows;
  for (size_t i = 0; i < teachers.size(); ++i) {
    const at::Tensor& t = teachers[i];
    const at::Tensor& s = students[i];
    TORCH_CHECK(t.is_cuda() && s.device() == t.device(), "ema_update_: pair ", i, " is not on ", teachers[0].device());
    TORCH_CHECK(t.numel() == s.numel(), "ema_update_: pair ", i, " has ", t.numel(), " vs ", s.numel(), " elements");
    TORCH_CHECK(t.is_non_overlapping_and_dense() && t.strides() == s.strides(),
                "ema_update_: pair ", i, " must be dense with equal strides");
    auto& r = rows[{static_cast<int>(t.scalar_type()), static_cast<int>(s.scalar_type())}];
    for (int64_t b = 0; b < t.numel(); b += kChunk) {
      r.insert(r.end(), {reinterpret_cast<int64_t>(t.data_ptr()), reinterpret_cast<int64_t>(s.data_ptr()), b,
                         std::min<int64_t>(b + kChunk, t.numel())});
    }
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (auto& [key, r] : rows) {
    if (r.empty()) continue;
    const int64_t nchunks = static_cast<int64_t>(r.size()) / 4;
    at::Tensor host = at::empty({static_cast<int64_t>(r.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(r.begin(), r.end(), host.data_ptr<int64_t>());
    at::Tensor table = host.to(teachers[0].device(), /*non_blocking=*/true);
    const float* mptr = mom.defined() ? mom.data_ptr<float>() : nullptr;
    const float mv = static_cast<float>(momentum_value);
    switch (static_cast<at::ScalarType>(key.first)) {
      case at::kFloat: launch_for_student<float>(static_cast<at::ScalarType>(key.second), table, nchunks, mptr, mv, stream); break;
      case at::kHalf: launch_for_student<c10::Half>(static_cast<at::ScalarType>(key.second), table, nchunks, mptr, mv, stream); break;
      case at::kBFloat16: launch_for_student<c10::BFloat16>(static_cast<at::ScalarType>(key.second), table, nchunks, mptr, mv, stream); break;
      default: TORCH_CHECK(false, "ema_update_: teachers must be float32, float16 or bfloat16 on CUDA");
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("ema_update_cuda(Tensor(a!)[] teachers, Tensor[] students, Tensor? momentum, float momentum_value) -> ()",
        &ema_update_cuda);
}

}  // namespace sslkern
