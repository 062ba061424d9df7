// The Python module physmdn._C: build facts and CPU kernel selection. Loading it registers the ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/buffer_pool.h"

namespace physmdn {
std::string cpu_isa();
std::string set_cpu_isa(const std::string& isa);
bool set_cpu_rows_path(bool enabled);
bool set_cuda_lanes_schedule(bool enabled);
bool cuda_lanes_schedule();
}  // namespace physmdn

#ifndef PHYSMDN_CUDA_VERSION
#define PHYSMDN_CUDA_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "physmdn compiled kernels (torch.ops.physmdn.*)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = PHYSMDN_VERSION;
    info["torch_version"] = PHYSMDN_TORCH_VERSION;  // the torch whose headers it was built with
    info["torch_minimum"] = PHYSMDN_TORCH_MINIMUM;  // the oldest torch it loads under (the stable ABI target)
#ifdef PHYSMDN_WITH_CUDA
    info["cuda_kernels"] = true;
    info["cuda_version"] = PHYSMDN_CUDA_VERSION;
    info["cuda_arch_list"] = PHYSMDN_CUDA_ARCH_LIST;
#else
    info["cuda_kernels"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_arch_list"] = pybind11::none();
#endif
#ifdef PHYSMDN_WITH_CUDA_LANES
    info["cuda_lanes_schedule"] = true;  // compiled (CMake option PHYSMDN_CUDA_LANES); set_cuda_lanes_schedule turns it on
#else
    info["cuda_lanes_schedule"] = false;
#endif
#ifdef PHYSMDN_HAVE_AVX2_KERNELS
    info["cpu_kernels"] = "default, avx2";
#else
    info["cpu_kernels"] = "default";
#endif
    return info;
  });
  m.def("cpu_isa", &physmdn::cpu_isa, "The CPU kernel variant in use: 'default' or 'avx2'.");
  m.def("set_cpu_isa", &physmdn::set_cpu_isa, "Select the CPU kernel variant; returns the previous one.");
  m.def("set_cpu_rows_path", &physmdn::set_cpu_rows_path,
        "Whether the AVX2 float mixture NLL takes its row-wise path where it applies (D in {1, 2, 4} with K D a "
        "multiple of 8, or D a multiple of 8; on by default); returns the previous setting. For tests and "
        "benchmarks.");
  m.def("set_cuda_lanes_schedule", [](bool enabled) {
#ifndef PHYSMDN_WITH_CUDA_LANES
    if (enabled)
      throw std::runtime_error(
          "set_cuda_lanes_schedule(True): this build of physmdn lacks the CUDA lane-per-element schedule "
          "(build_info()['cuda_lanes_schedule'] is False); build it with CUDA kernels and the CMake option "
          "PHYSMDN_CUDA_LANES=ON (pip install --no-build-isolation -Ccmake.define.PHYSMDN_CUDA_LANES=ON .)");
#endif
    return physmdn::set_cuda_lanes_schedule(enabled);
  }, pybind11::arg("enabled"),
        "Whether the CUDA mixture NLL takes its lane-per-element schedule where it applies (contiguous inputs, D <= "
        "32, K times D rounded up to a power of two <= 256; off by default: not yet measured on a GPU); returns the "
        "previous setting. For tests and benchmarks. Raises RuntimeError for True in a build without the schedule "
        "(CMake option PHYSMDN_CUDA_LANES, off by default).");
  m.def("cuda_lanes_schedule", &physmdn::cuda_lanes_schedule,
        "Whether the CUDA mixture NLL takes its lane-per-element schedule (see set_cuda_lanes_schedule; the "
        "environment variable PHYSMDN_CUDA_LANES=1 turns it on at import).");
  m.def("get_num_threads", [] { return static_cast<int>(torch::stable::get_num_threads()); });
  m.def("cpu_pool_stats", [] {
    const auto s = physmdn::cpu::pool_stats();
    pybind11::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["live_bytes"] = s.live_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  }, "Buffer pool of the CPU ops' outputs: limit, cached (free) and live bytes, hits and misses.");
  m.def("set_cpu_pool_limit", &physmdn::cpu::set_pool_limit, pybind11::arg("bytes"),
        "Set the CPU buffer pool's cache limit in bytes (0 disables caching); returns the previous limit.");
  m.def("cpu_pool_release_cached", &physmdn::cpu::pool_release_cached, "Free the CPU buffer pool's cached blocks.");
}
