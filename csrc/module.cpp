// The Python module sslkern._C. Kernels register themselves as torch ops in the
// `sslkern_C` namespace (TORCH_LIBRARY_FRAGMENT in each kernel file); this file only
// defines the namespace and the build facts the Python side reports.
#include <torch/extension.h>

#include "common.h"

TORCH_LIBRARY(sslkern_C, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslkern native kernels (C++ CPU, and CUDA when built with it)";
  m.def("cuda_built", []() {
#ifdef SSLKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("openmp_threads", []() { return at::get_num_threads(); });
  m.def("output_cache_clear", &sslkern::output_cache_clear);
  m.def("output_cache_set_limit", &sslkern::output_cache_set_limit);
  m.def("output_cache_info", &sslkern::output_cache_info);
}
