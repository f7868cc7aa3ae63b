// ema_update_ — multi-tensor EMA of teacher parameters, C++ CPU kernel.
//
//   teacher <- teacher + (1 - m) * (student - teacher)      (= m*teacher + (1-m)*student)
//
// evaluated like torch.lerp: t + w*(s - t) for w = 1 - m < 0.5, else s - m*(s - t), which
// is exact at both ends (m = 1 keeps the teacher, m = 0 copies the student).
//
// All tensor pairs are cut into fixed-size chunks and the chunk list is split across
// threads in runs of equal element counts, so the parallelism is over the whole parameter
// set, not per tensor (a ViT has many tiny tensors). Arithmetic is fp32 (fp64 when the
// teacher is fp64); the teacher and student may have different storage dtypes (fp32
// teacher, bf16/fp16 student).
#include "common.h"

#include <algorithm>
#include <vector>

namespace sslkern {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per task: 64 KiB of fp32 teacher

using RangeFn = void (*)(void* teacher, const void* student, int64_t begin, int64_t end, double w);

template <typename TT, typename ST>
void ema_range(void* teacher, const void* student, int64_t begin, int64_t end, double w) {
  TT* t = static_cast<TT*>(teacher);
  const ST* s = static_cast<const ST*>(student);
  if constexpr (std::is_same_v<TT, double>) {
    for (int64_t i = begin; i < end; ++i) {
      const double sv = std::is_same_v<ST, double> ? static_cast<double>(reinterpret_cast<const double*>(s)[i])
                                                   : static_cast<double>(load_f(s, i));
      t[i] = w < 0.5 ? t[i] + w * (sv - t[i]) : sv - (1.0 - w) * (sv - t[i]);
    }
  } else {
    // Which lerp form is uniform over the call, so the branch sits outside the loop.
    const bool small_w = w < 0.5;
    const float c = static_cast<float>(small_w ? w : 1.0 - w);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float tv = load_f(t, i);
      const float sv = std::is_same_v<ST, double> ? static_cast<float>(reinterpret_cast<const double*>(s)[i])
                                                  : load_f(s, i);
      store_f(t, i, small_w ? tv + c * (sv - tv) : sv - c * (sv - tv));
    }
  }
}

// load_f<double> narrows; the double student path above never calls it for a double teacher.
template <typename TT>
RangeFn range_fn_for_student(at::ScalarType sdtype) {
  return dispatch_float(sdtype, "ema_update_: students", [](auto s) -> RangeFn {
    return &ema_range<TT, decltype(s)>;
  });
}

RangeFn range_fn(at::ScalarType tdtype, at::ScalarType sdtype) {
  return dispatch_float(tdtype, "ema_update_: teachers", [&](auto t) -> RangeFn {
    return range_fn_for_student<decltype(t)>(sdtype);
  });
}

struct Task {
  int64_t pair;
  int64_t begin;
  int64_t end;
};

void ema_update_cpu(at::TensorList teachers, at::TensorList students, const std::optional<at::Tensor>& momentum,
                    double momentum_value) {
  TORCH_CHECK(teachers.size() == students.size(), "ema_update_: got ", teachers.size(), " teachers and ",
              students.size(), " students");
  double m = momentum_value;
  if (momentum.has_value() && momentum->defined()) {
    TORCH_CHECK(momentum->numel() == 1, "ema_update_: momentum must have one element");
    m = momentum->item<double>();  // a CPU scalar: no device sync involved
  }
  const double w = 1.0 - m;

  std::vector<RangeFn> fns(teachers.size());
  std::vector<Task> tasks;
  for (size_t i = 0; i < teachers.size(); ++i) {
    const at::Tensor& t = teachers[i];
    const at::Tensor& s = students[i];
    TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu(), "ema_update_: pair ", i, " is not on the CPU");
    TORCH_CHECK(t.numel() == s.numel(), "ema_update_: pair ", i, " has ", t.numel(), " vs ", s.numel(), " elements");
    TORCH_CHECK(t.is_non_overlapping_and_dense() && t.strides() == s.strides(),
                "ema_update_: pair ", i, " must be dense with equal strides");
    fns[i] = range_fn(t.scalar_type(), s.scalar_type());
    for (int64_t b = 0; b < t.numel(); b += kChunk) {
      tasks.push_back({static_cast<int64_t>(i), b, std::min<int64_t>(b + kChunk, t.numel())});
    }
  }
  if (tasks.empty()) return;

  std::vector<void*> tptr(teachers.size());
  std::vector<const void*> sptr(teachers.size());
  for (size_t i = 0; i < teachers.size(); ++i) {
    // Dense tensors with equal strides: memory order is the same for both, so a linear
    // walk from the lowest address pairs up matching elements.
    tptr[i] = teachers[i].numel() ? teachers[i].data_ptr() : nullptr;
    sptr[i] = students[i].numel() ? students[i].data_ptr() : nullptr;
  }
  // Each thread takes a contiguous run of tasks holding an equal share of the elements (not of
  // the tasks: a ViT's many tiny tensors would otherwise load one thread more than the other).
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::vector<int64_t> upto(ntasks + 1, 0);  // elements in tasks [0, k)
  for (int64_t k = 0; k < ntasks; ++k) upto[k + 1] = upto[k] + (tasks[k].end - tasks[k].begin);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  // part p runs the tasks whose first element falls in [p, p + 1) · total / parts
  auto first = [&](int64_t part) {
    const int64_t e = upto[ntasks] / parts * part + std::min<int64_t>(part, upto[ntasks] % parts);
    return static_cast<int64_t>(std::lower_bound(upto.begin(), upto.end() - 1, e) - upto.begin());
  };
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      for (int64_t k = first(p), end = p + 1 == parts ? ntasks : first(p + 1); k < end; ++k) {
        const Task& task = tasks[k];
        fns[task.pair](tptr[task.pair], sptr[task.pair], task.begin, task.end, w);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslkern_C, m) {
  m.def("ema_update_cpu(Tensor(a!)[] teachers, Tensor[] students, Tensor? momentum, float momentum_value) -> ()",
        &ema_update_cpu);
}

}  // namespace sslkern
