// CUDA build of the ops: the CUDA backend of csrc/cuda/backend.cuh (launchers and schedules) over the kernels of
// csrc/cuda/device_kernels.cuh, launched on the current CUDA stream, registered for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define PHYSMDN_LAUNCH(grid, block, shared_bytes, ...) \
  __VA_ARGS__<<<(grid), (block), (shared_bytes), c10::cuda::getCurrentCUDAStream()>>>
#define PHYSMDN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define PHYSMDN_DEVICE_GUARD(device) const c10::cuda::CUDAGuard physmdn_device_guard_(device)
#define PHYSMDN_ON_DEVICE(tensor) ((tensor).is_cuda())

namespace physmdn {
namespace {
int multiprocessor_count(int device_index) {
  int sms = 0;  // (ATen/cuda/CUDAContext.h would need the cuSPARSE headers)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index));
  return sms;
}
}  // namespace
}  // namespace physmdn

#include "cuda/backend.cuh"

namespace physmdn {

TORCH_LIBRARY_IMPL(physmdn, CUDA, m) {
  PHYSMDN_OP_IMPLS(m, CudaBackend);
  m.impl("_scale_by_", &cuda_scale_by_);
}

}  // namespace physmdn
