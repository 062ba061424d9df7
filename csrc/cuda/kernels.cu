// CUDA build of the ops: the CUDA backend of csrc/cuda/backend.cuh (launchers and schedules) over the kernels of
// csrc/cuda/device_kernels.cuh, and the correlated-component ops of csrc/cuda/correlated.cuh, launched on torch's
// current CUDA stream, registered for the CUDA dispatch key.
//
// Through the stable ABI only: the device guard is torch::stable's; the current stream comes from the shim's
// aoti_torch_get_current_cuda_stream, which lives in libtorch_cuda. That library is looked up when a CUDA kernel first
// runs (it is loaded whenever torch is a CUDA build), not linked: the same physmdn build then also loads under a
// CPU-only torch, where these kernels are registered but never called. The CUDA runtime is linked statically.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "tensor.h"

namespace physmdn {
namespace {

cudaStream_t current_stream() {
  using GetStream = int32_t (*)(int32_t, void**);
  static const GetStream get_stream = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  PHYSMDN_CHECK(get_stream != nullptr,
                "physmdn: a CUDA kernel was called but torch's CUDA library (libtorch_cuda.so) is not loaded");
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  PHYSMDN_CHECK(err == cudaSuccess, "physmdn: cudaGetDevice failed: ", cudaGetErrorString(err));
  void* stream = nullptr;
  PHYSMDN_CHECK(get_stream(device, &stream) == 0, "physmdn: torch could not give the current CUDA stream of device ",
                device);
  return static_cast<cudaStream_t>(stream);
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  PHYSMDN_CHECK(err == cudaSuccess, "physmdn: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int multiprocessor_count(int device_index) {
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index);
  PHYSMDN_CHECK(err == cudaSuccess, "physmdn: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return sms;
}

}  // namespace
}  // namespace physmdn

#define PHYSMDN_LAUNCH(grid, block, shared_bytes, ...) \
  __VA_ARGS__<<<(grid), (block), (shared_bytes), ::physmdn::current_stream()>>>
#define PHYSMDN_LAUNCH_CHECK() ::physmdn::check_launch()
#define PHYSMDN_DEVICE_GUARD(device) \
  const torch::stable::accelerator::DeviceGuard physmdn_device_guard_((device).index())
#define PHYSMDN_ON_DEVICE(tensor) ((tensor).is_cuda())

#include "cuda/backend.cuh"
#include "cuda/correlated.cuh"

namespace physmdn {

STABLE_TORCH_LIBRARY_IMPL(physmdn, CUDA, m) {
  PHYSMDN_OP_IMPLS(m, CudaBackend);
  m.impl("_scale_by_", TORCH_BOX(&cuda_scale_by_));
  m.impl("mixture_nll_tril", TORCH_BOX(&cuda_mixture_nll_tril));
  m.impl("mixture_nll_tril_backward", TORCH_BOX(&cuda_mixture_nll_tril_backward));
  m.impl("mixture_nll_lowrank", TORCH_BOX(&cuda_mixture_nll_lowrank));
  m.impl("mixture_nll_lowrank_backward", TORCH_BOX(&cuda_mixture_nll_lowrank_backward));
}

}  // namespace physmdn
