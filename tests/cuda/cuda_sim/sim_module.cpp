// The CUDA kernels of csrc/cuda/device_kernels.cuh run on the CPU by the simulator of host_sim.h, one function per
// kernel family, launched with the shapes csrc/cuda/backend.cuh uses (tests/cuda/test_cuda_sim.py builds this with
// torch.utils.cpp_extension and compares the results with the reference). CPU tensors in, CPU tensors out; the
// outputs are allocated as the CUDA backend allocates them (gradients in the accumulation dtype, or in the input
// dtype for the lanes kernel when asked).
// backend.cuh over ATen tensors (csrc/tensor.h), as this module is built with torch's full C++ API
#define PHYSMDN_ATEN_TENSORS 1
#include <torch/extension.h>

#include <atomic>

#include "host_sim.h"

// csrc/cuda/backend.cuh's hooks: launches run in the simulator; "the device" is the CPU
#define PHYSMDN_LAUNCH(grid, block, shared_bytes, ...) \
  ::cuda_sim::Launch{(__VA_ARGS__), dim3(grid), dim3(block), static_cast<size_t>(shared_bytes)}
#define PHYSMDN_LAUNCH_CHECK() ((void)0)
#define PHYSMDN_DEVICE_GUARD(device) ((void)(device))
#define PHYSMDN_ON_DEVICE(tensor) ((tensor).is_cpu())
// The simulator runs every schedule, the lane-per-element one too (in the extension: CMake option PHYSMDN_CUDA_LANES).
#define PHYSMDN_WITH_CUDA_LANES 1

namespace physmdn {
namespace {
// the simulated shared memory of one block (tiled_nll_kernel declares it `extern __shared__`)
constexpr size_t kSimSharedBytes = 64 * 1024;
alignas(16) unsigned char tile_smem[kSimSharedBytes];
int multiprocessor_count(int) { return 2; }  // (small grids: scale_by_kernel's grid-stride loop runs)
}  // namespace

// What csrc/ops.cpp defines for the real extension.
std::atomic<bool>& cuda_lanes_schedule_enabled() {
  static std::atomic<bool> enabled{false};
  return enabled;
}
void scale_by_on_host(const std::vector<at::Tensor>&, const at::Tensor&, double) {
  TORCH_CHECK(false, "cuda_sim: _scale_by_'s host path (an upstream value on the host) is not simulated");
}
}  // namespace physmdn

#include "cuda/backend.cuh"
#include "cuda/correlated.cuh"

namespace physmdn {
namespace {

using at::Tensor;
using Stats = cuda_sim::Stats;

struct RegisterShared {
  RegisterShared() { cuda_sim::shared_buffer() = {tile_smem, kSimSharedBytes}; }
} register_shared;

py::dict stats_dict(const Stats& s) {
  py::dict d;
  d["blocks"] = s.blocks, d["threads"] = s.threads, d["shuffles"] = s.shuffles, d["syncwarps"] = s.syncwarps,
  d["syncthreads"] = s.syncthreads, d["block_threads"] = s.block_threads, d["shared_bytes"] = s.shared_bytes;
  return d;
}

// The launchers' optional outputs and inputs: null for an undefined tensor.
Tensor* defined_or_null(Tensor& t) { return t.defined() ? &t : nullptr; }

// Output buffers of a simulated launch: NaN inside (an element no thread writes stays NaN and fails the tests'
// comparisons), kGuard elements of a sentinel on either side (check() raises when a thread wrote outside the tensor).
class Outputs {
 public:
  static constexpr int64_t kGuard = 64;
  static constexpr double kSentinel = -7.0;

  Tensor make(at::IntArrayRef sizes, const at::TensorOptions& o) {
    const int64_t n = c10::multiply_integers(sizes);
    auto base = at::full({n + 2 * kGuard}, kSentinel, o);
    auto inner = base.narrow(0, kGuard, n);
    inner.fill_(std::numeric_limits<double>::quiet_NaN());
    bases_.push_back(base);
    return inner.view(sizes);
  }
  void check() const {
    for (size_t i = 0; i < bases_.size(); ++i) {
      const auto& b = bases_[i];
      const auto want = at::full({kGuard}, kSentinel, b.options());
      const int64_t n = b.numel();
      TORCH_CHECK(at::equal(b.narrow(0, 0, kGuard), want) && at::equal(b.narrow(0, n - kGuard, kGuard), want),
                  "cuda_sim: a kernel wrote outside output ", i);
    }
  }

 private:
  std::vector<Tensor> bases_;
};

void check_inputs(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target) {
  TORCH_CHECK(means.dim() == 3 && logits.dim() == 2 && log_scales.sizes() == means.sizes() && target.dim() == 2,
              "cuda_sim: logits [B, K], means / log_scales [B, K, D], target [B, D]");
  for (const Tensor* t : {&logits, &means, &log_scales, &target})
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == means.scalar_type(), "cuda_sim: CPU tensors of one dtype");
}

// The lanes and tiled kernels' outputs (checks their contiguous inputs): loss and saved (with write_loss), the
// gradients (with grad; in the input dtype or the accumulation dtype), and the upstream gradient in the input dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> nll_outputs(
    Outputs& out, const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
    const c10::optional<Tensor>& grad_loss, bool grad, bool grads_in_input_dtype, bool write_loss) {
  check_inputs(logits, means, log_scales, target);
  for (const Tensor* t : {&logits, &means, &log_scales, &target})
    TORCH_CHECK(t->is_contiguous(), "cuda_sim: the lanes and tiled kernels take contiguous inputs");
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  const auto dtype = means.scalar_type(), acc = acc_dtype(dtype);
  Tensor loss, saved, gl, gm, gs, gt;
  if (write_loss) {
    loss = out.make({B}, means.options());
    saved = out.make({B, math::kSavedPerSample}, means.options().dtype(acc));
  }
  if (grad) {
    const auto o = means.options().dtype(grads_in_input_dtype ? dtype : acc);
    gl = out.make({B, K}, o), gm = out.make({B, K, D}, o), gs = out.make({B, K, D}, o), gt = out.make({B, D}, o);
  }
  return {loss, saved, gl, gm, gs, gt, grad_loss.has_value() ? grad_loss->to(dtype) : Tensor()};
}

// lanes_nll_kernel through backend.cuh's launch_lanes_typed (whatever the schedule switch): the forward (grad =
// false: loss and saved state), the forward with gradients (grad_loss undefined: every sample's upstream gradient is
// g_default) or the backward (grad_loss [B], loss and saved not written). Returns loss, saved, gl, gm, gs, gt (undefined where not computed), stats.
py::tuple lanes_nll(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
                    const c10::optional<Tensor>& grad_loss, double g_default, bool grad, bool grads_in_input_dtype,
                    bool write_loss) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  TORCH_CHECK(D <= 32 && K * pow2_at_least(D) <= kLanesMaxElements, "cuda_sim: lanes_inputs does not hold");
  Outputs out;
  auto [loss, saved, gl, gm, gs, gt, g] = nll_outputs(out, logits, means, log_scales, target, grad_loss, grad,
                                                      grads_in_input_dtype, write_loss);
  cuda_sim::last_stats() = {};
  if (B > 0) {  // (the backend's launcher, with the grid and the kernel instance it picks)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "cuda_sim_lanes", [&] {
      using acc_t = physmdn::acc_type<scalar_t>;
      with_grad_type<scalar_t>(grad ? &gm : nullptr, [&](auto grad_tag) {
        using grad_t = typename decltype(grad_tag)::type;
        const auto launch = [&](auto kgrad) {
          launch_lanes_typed<decltype(kgrad)::value, scalar_t, acc_t, grad_t>(
              logits, means, log_scales, target, defined_or_null(g), g_default, defined_or_null(loss),
              defined_or_null(saved), defined_or_null(gl), defined_or_null(gm), defined_or_null(gs),
              defined_or_null(gt), B, K, D);
        };
        grad ? launch(std::true_type{}) : launch(std::false_type{});
      });
    });
  }
  out.check();
  const LanesLaunch c = lanes_launch(B, K, D);
  return py::make_tuple(loss, saved, gl, gm, gs, gt, stats_dict(cuda_sim::last_stats()), c.J, c.log2_G, c.log2_Dp);
}

// tiled_nll_kernel through backend.cuh's launch_tiled: as lanes_nll.
py::tuple tiled_nll(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
                    const c10::optional<Tensor>& grad_loss, double g_default, bool grad, bool grads_in_input_dtype,
                    bool write_loss) {
  const int64_t K = means.size(1), D = means.size(2);
  Outputs out;
  auto [loss, saved, gl, gm, gs, gt, g] = nll_outputs(out, logits, means, log_scales, target, grad_loss, grad,
                                                      grads_in_input_dtype, write_loss);
  TORCH_CHECK(tiled_applies(logits, means, log_scales, target, false),
              "cuda_sim: a sample does not fit in the tile (the tiled kernel is not launched)");
  cuda_sim::last_stats() = {};
  const auto launch = [&](auto kgrad) {  // the backend's launcher (kernel instance, grid, shared memory)
    launch_tiled<decltype(kgrad)::value>(logits, means, log_scales, target, defined_or_null(g), g_default,
                                         defined_or_null(loss), defined_or_null(saved), defined_or_null(gl),
                                         defined_or_null(gm), defined_or_null(gs), defined_or_null(gt));
  };
  grad ? launch(std::true_type{}) : launch(std::false_type{});
  out.check();
  const int threads = means.scalar_type() == at::kDouble ? tile_threads<double>(K, D) : tile_threads<float>(K, D);
  return py::make_tuple(loss, saved, gl, gm, gs, gt, stats_dict(cuda_sim::last_stats()), threads);
}

// The per-sample kernels of the mixture NLL (backend.cuh launch_per_sample, for inputs the lanes and tiled kernels
// do not take): warp per sample (warp = true; from kWarpMinComponents components on in backend.cuh) or thread per
// sample; any strides. Forward: loss, saved.
py::tuple sample_nll_fwd(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
                         bool warp) {
  check_inputs(logits, means, log_scales, target);
  const int64_t B = means.size(0);
  const auto dtype = means.scalar_type();
  Outputs out;
  Tensor loss = out.make({B}, means.options());
  Tensor saved = out.make({B, math::kSavedPerSample}, means.options().dtype(acc_dtype(dtype)));
  Stats stats;
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cuda_sim_sample_fwd", [&] {
      using acc_t = physmdn::acc_type<scalar_t>;
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      const auto kernel = warp ? &warp_kernel<scalar_t, acc_t, false, false> : &sample_kernel<scalar_t, acc_t, false, false>;
      stats = cuda_sim::launch(warp ? dim3(warp_blocks_for(B)) : dim3(blocks_for(B)),
                               dim3(warp ? 32 * kWarpsPerBlock : kThreads), 0, kernel, v,
                               math::PhysicsView<scalar_t>{}, B, static_cast<const scalar_t*>(nullptr), int64_t{0},
                               acc_t(1), loss.data_ptr<scalar_t>(), saved.data_ptr<acc_t>(),
                               static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
                               static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
                               static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
                               static_cast<acc_t*>(nullptr), int64_t{0}, int64_t{0});
    });
  }
  out.check();
  return py::make_tuple(loss, saved, stats_dict(stats));
}

// Backward of the per-sample kernels (recomputing the forward; no saved state): gl, gm, gs, gt (accumulation dtype).
py::tuple sample_nll_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                         const Tensor& target, bool warp) {
  check_inputs(logits, means, log_scales, target);
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  const auto dtype = means.scalar_type();
  const auto o = means.options().dtype(acc_dtype(dtype));
  Outputs out;
  Tensor gl = out.make({B, K}, o), gm = out.make({B, K, D}, o), gs = out.make({B, K, D}, o), gt = out.make({B, D}, o);
  const Tensor g = grad_loss.to(dtype);
  Stats stats;
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cuda_sim_sample_bwd", [&] {
      using acc_t = physmdn::acc_type<scalar_t>;
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      const auto kernel = warp ? &warp_kernel<scalar_t, acc_t, false, true> : &sample_kernel<scalar_t, acc_t, false, true>;
      stats = cuda_sim::launch(warp ? dim3(warp_blocks_for(B)) : dim3(blocks_for(B)),
                               dim3(warp ? 32 * kWarpsPerBlock : kThreads), 0, kernel, v,
                               math::PhysicsView<scalar_t>{}, B, g.const_data_ptr<scalar_t>(), g.stride(0), acc_t(1),
                               static_cast<scalar_t*>(nullptr), static_cast<acc_t*>(nullptr), gl.data_ptr<acc_t>(),
                               gm.data_ptr<acc_t>(), gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
                               static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
                               static_cast<acc_t*>(nullptr), int64_t{0}, int64_t{0});
    });
  }
  out.check();
  return py::make_tuple(gl, gm, gs, gt, stats_dict(stats));
}

// scale_by_kernel (backend.cuh cuda_scale_by_): the dense tensors of one dtype multiplied in place by the factor
// (a one-element tensor in the accumulation dtype), over a grid of `blocks` x len(tensors) blocks.
py::dict scale_by(std::vector<Tensor> tensors, const Tensor& factor, int64_t blocks) {
  TORCH_CHECK(!tensors.empty() && static_cast<int64_t>(tensors.size()) <= kMaxScaleTensors, "cuda_sim: 1 to ",
              kMaxScaleTensors, " tensors");
  const auto dtype = tensors[0].scalar_type();
  ScaleTargets targets{};
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == dtype && tensors[i].is_non_overlapping_and_dense(),
                "cuda_sim: dense tensors of one dtype");
    targets.data[i] = tensors[i].data_ptr();
    targets.numel[i] = tensors[i].numel();
  }
  Stats stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cuda_sim_scale_by", [&] {
    using acc_t = physmdn::acc_type<scalar_t>;
    const Tensor f = factor.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    stats = cuda_sim::launch(dim3(static_cast<unsigned int>(blocks), static_cast<unsigned int>(tensors.size())),
                             dim3(256), 0, scale_by_kernel<scalar_t, acc_t>, targets,
                             f.const_data_ptr<acc_t>());
  });
  return stats_dict(stats);
}

// tril_nll_kernel through correlated.cuh's launcher, its grid capped at max_blocks blocks (the grid-stride loop takes
// the rest): loss [B] (input dtype), z [B, K, D] and responsibilities [B, K] (accumulation dtype), stats.
py::tuple tril_nll_fwd(const Tensor& logits, const Tensor& means, const Tensor& scale_tril, const Tensor& target,
                       int64_t max_blocks) {
  check_tril_inputs(logits, means, scale_tril, target);
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  const auto acc = means.options().dtype(acc_dtype(means.scalar_type()));
  Outputs out;
  Tensor loss = out.make({B}, means.options()), z = out.make({B, K, D}, acc), r = out.make({B, K}, acc);
  cuda_sim::last_stats() = {};
  launch_tril_forward(logits.contiguous(), means.contiguous(), scale_tril.contiguous(), target.contiguous(), loss, z,
                      r, max_blocks);
  out.check();
  return py::make_tuple(loss, z, r, stats_dict(cuda_sim::last_stats()));
}

// tril_nll_backward_kernel likewise: the gradients of logits, means, scale_tril, target (input dtype), stats.
py::tuple tril_nll_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril, const Tensor& z,
                       const Tensor& responsibilities, int64_t max_blocks) {
  check_tril_backward_inputs(grad_loss, logits, scale_tril, z, responsibilities);
  const int64_t B = z.size(0), K = z.size(1), D = z.size(2);
  const auto o = scale_tril.options();
  Outputs out;
  Tensor gl = out.make({B, K}, o), gm = out.make({B, K, D}, o), gL = out.make({B, K, D, D}, o),
         gy = out.make({B, D}, o);
  cuda_sim::last_stats() = {};
  launch_tril_backward(grad_loss.to(z.scalar_type()), logits.contiguous(), scale_tril.contiguous(), z.contiguous(),
                       responsibilities.contiguous(), gl, gm, gL, gy, max_blocks);
  out.check();
  return py::make_tuple(gl, gm, gL, gy, stats_dict(cuda_sim::last_stats()));
}

// lowrank_nll_kernel likewise: loss [B] (input dtype), v [B, K, D], responsibilities [B, K], chol [B, K, R, R]
// (accumulation dtype), stats.
py::tuple lowrank_nll_fwd(const Tensor& logits, const Tensor& means, const Tensor& cov_factor, const Tensor& cov_diag,
                          const Tensor& target, int64_t max_blocks) {
  check_lowrank_inputs(logits, means, cov_factor, cov_diag, target);
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), R = cov_factor.size(3);
  const auto acc = means.options().dtype(acc_dtype(means.scalar_type()));
  Outputs out;
  Tensor loss = out.make({B}, means.options()), v = out.make({B, K, D}, acc), r = out.make({B, K}, acc),
         chol = out.make({B, K, R, R}, acc);
  cuda_sim::last_stats() = {};
  launch_lowrank_forward(logits.contiguous(), means.contiguous(), cov_factor.contiguous(), cov_diag.contiguous(),
                         target.contiguous(), loss, v, r, chol, max_blocks);
  out.check();
  return py::make_tuple(loss, v, r, chol, stats_dict(cuda_sim::last_stats()));
}

// lowrank_nll_backward_kernel likewise: the gradients of logits, means, cov_factor, cov_diag, target (input dtype),
// stats.
py::tuple lowrank_nll_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor,
                          const Tensor& cov_diag, const Tensor& v, const Tensor& responsibilities, const Tensor& chol,
                          int64_t max_blocks) {
  check_lowrank_backward_inputs(grad_loss, logits, cov_factor, cov_diag, v, responsibilities, chol);
  const int64_t B = v.size(0), K = v.size(1), D = v.size(2), R = cov_factor.size(3);
  const auto o = cov_factor.options();
  Outputs out;
  Tensor gl = out.make({B, K}, o), gm = out.make({B, K, D}, o), gW = out.make({B, K, D, R}, o),
         gd = out.make({B, K, D}, o), gy = out.make({B, D}, o);
  cuda_sim::last_stats() = {};
  launch_lowrank_backward(grad_loss.to(v.scalar_type()), logits.contiguous(), cov_factor.contiguous(),
                          cov_diag.contiguous(), v.contiguous(), responsibilities.contiguous(), chol.contiguous(), gl,
                          gm, gW, gd, gy, max_blocks);
  out.check();
  return py::make_tuple(gl, gm, gW, gd, gy, stats_dict(cuda_sim::last_stats()));
}

// correlated_penalty_kernel through correlated.cuh's launcher, its grid capped at max_blocks: P [B, K] (input
// dtype), stats. The arguments as in the schema of torch.ops.physmdn.correlated_penalty.
py::tuple correlated_penalty_fwd(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,
                                 const Tensor& p0, const Tensor& p1, int64_t family, int64_t moment, double spacing,
                                 int64_t boundary, double noise_scale, int64_t max_blocks) {
  check_correlated_penalty_inputs(means, factor, diag);
  const PhysicsArgs args = penalty_args(family, moment, spacing, boundary, noise_scale);
  const auto [order, rows] = check_physics_args(means, p0, p1, std::nullopt, args);
  Outputs out;
  Tensor P = out.make({means.size(0), means.size(1)}, means.options());
  cuda_sim::last_stats() = {};
  launch_correlated_penalty_forward(means.contiguous(), factor.contiguous(), contiguous_or_none(diag), p0, p1, args,
                                    order, rows, P, max_blocks);
  out.check();
  return py::make_tuple(P, stats_dict(cuda_sim::last_stats()));
}

// correlated_penalty_backward_kernel likewise: the gradients of means, factor and diag (accumulation dtype; diag's
// [0] without diag) for the upstream grad [B, K], stats.
py::tuple correlated_penalty_bwd(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                 const OptionalTensor& diag, const Tensor& p0, const Tensor& p1, int64_t family,
                                 int64_t moment, double spacing, int64_t boundary, double noise_scale,
                                 int64_t max_blocks) {
  check_correlated_penalty_inputs(means, factor, diag);
  check_correlated_penalty_grad(grad, means);
  const PhysicsArgs args = penalty_args(family, moment, spacing, boundary, noise_scale);
  const auto [order, rows] = check_physics_args(means, p0, p1, std::nullopt, args);
  const auto acc = means.options().dtype(acc_dtype(means.scalar_type()));
  Outputs out;
  Tensor gm = out.make(means.sizes().vec(), acc), gF = out.make(factor.sizes().vec(), acc);
  Tensor gc = diag.has_value() ? out.make(means.sizes().vec(), acc) : at::empty({0}, acc);
  cuda_sim::last_stats() = {};
  launch_correlated_penalty_backward(grad.to(acc.dtype()).contiguous(), means.contiguous(), factor.contiguous(),
                                     contiguous_or_none(diag), p0, p1, args, order, rows, gm, gF, gc, max_blocks);
  out.check();
  return py::make_tuple(gm, gF, gc, stats_dict(cuda_sim::last_stats()));
}

// A kernel that breaks the rules the simulator enforces (for the simulator's own tests): mode 0 a shuffle after
// half the warp returned, 1 lanes at different warp operations, 2 half a warp at __syncthreads and the other half at a
// shuffle (a deadlock on a GPU), 3 a clean shuffle (lane i gets lane i ^ 1's value), 4 __syncthreads after one warp
// returned (valid: returned threads do not hold a barrier up).
__global__ void misbehave_kernel(int mode, float* out) {
  const int t = threadIdx.x;
  if (mode == 0) {
    if (t % 32 >= 16) return;
    out[t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
  } else if (mode == 1) {
    if (t % 2) __syncwarp();
    else out[t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
  } else if (mode == 2) {
    if (t < 48) __syncthreads();
    else out[t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
  } else if (mode == 4) {
    if (t >= 32) return;
    out[t] = 1.0f;
    __syncthreads();
    out[32 + t] = out[t] + out[31 - t];
  } else {
    out[t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
  }
}

// Writes one element past the end of a guarded output (for the guard's own test).
__global__ void write_one_past_kernel(float* out, int n) {
  if (static_cast<int>(threadIdx.x) <= n) out[threadIdx.x] = 1.0f;
}
void write_one_past() {
  Outputs out;
  Tensor t = out.make({32}, at::TensorOptions().dtype(at::kFloat));
  cuda_sim::launch(dim3(1), dim3(64), 0, write_one_past_kernel, t.data_ptr<float>(), 32);
  out.check();
}

py::dict misbehave(int64_t mode, Tensor out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() >= 64 && out.is_contiguous());
  return stats_dict(cuda_sim::launch(dim3(1), dim3(64), 0, misbehave_kernel,
                                     static_cast<int>(mode), out.data_ptr<float>()));
}

}  // namespace
}  // namespace physmdn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace physmdn;
  // the ops as the CUDA build registers them (op_impl.h over CudaBackend, its schedules and launchers), on CPU
  // tensors; the arguments as in the schemas of torch.ops.physmdn.*
  m.def("mixture_nll_fwd", &mixture_nll_fwd_impl<CudaBackend>);
  m.def("mixture_nll_bwd", &mixture_nll_bwd_impl<CudaBackend>);
  m.def("mdn_loss_fwd", &mdn_loss_fwd_impl<CudaBackend>);
  m.def("mdn_loss_bwd", &mdn_loss_bwd_impl<CudaBackend>);
  m.def("scale_by_", [](std::vector<at::Tensor> tensors, const at::Tensor& upstream, double scale) {
    cuda_scale_by_(tensors, upstream, scale);
    return stats_dict(cuda_sim::last_stats());
  });
  m.def("set_lanes_schedule", [](bool on) { return cuda_lanes_schedule_enabled().exchange(on); });
  m.def("last_launch", [] { return stats_dict(cuda_sim::last_stats()); });
  m.def("reset_last_launch", [] { cuda_sim::last_stats() = {}; });
  m.def("lanes_nll", &lanes_nll, py::arg("logits"), py::arg("means"), py::arg("log_scales"), py::arg("target"),
        py::arg("grad_loss") = py::none(), py::arg("g_default") = 1.0, py::arg("grad") = true,
        py::arg("grads_in_input_dtype") = false, py::arg("write_loss") = true);
  m.def("tiled_nll", &tiled_nll, py::arg("logits"), py::arg("means"), py::arg("log_scales"), py::arg("target"),
        py::arg("grad_loss") = py::none(), py::arg("g_default") = 1.0, py::arg("grad") = true,
        py::arg("grads_in_input_dtype") = false, py::arg("write_loss") = true);
  m.def("sample_nll_fwd", &sample_nll_fwd);
  m.def("sample_nll_bwd", &sample_nll_bwd);
  m.def("scale_by", &scale_by);
  // the correlated-component ops as the CUDA build registers them (csrc/cuda/correlated.cuh), and their kernels with
  // a given grid cap
  m.def("mixture_nll_tril", &cuda_mixture_nll_tril);
  m.def("mixture_nll_tril_backward", &cuda_mixture_nll_tril_backward);
  m.def("tril_nll_fwd", &tril_nll_fwd);
  m.def("tril_nll_bwd", &tril_nll_bwd);
  m.def("mixture_nll_lowrank", &cuda_mixture_nll_lowrank);
  m.def("mixture_nll_lowrank_backward", &cuda_mixture_nll_lowrank_backward);
  m.def("lowrank_nll_fwd", &lowrank_nll_fwd);
  m.def("lowrank_nll_bwd", &lowrank_nll_bwd);
  m.def("correlated_penalty", &correlated_penalty_impl<CudaBackend>);
  m.def("correlated_penalty_backward", &correlated_penalty_backward_impl<CudaBackend>);
  m.def("correlated_penalty_fwd", &correlated_penalty_fwd);
  m.def("correlated_penalty_bwd", &correlated_penalty_bwd);
  m.def("misbehave", &misbehave);
  m.def("write_one_past", &write_one_past);
  m.attr("lanes_threads") = kLanesThreads;
  m.attr("lanes_max_elements") = kLanesMaxElements;
  m.attr("warp_min_components") = kWarpMinComponents;
  m.attr("correlated_threads") = kCorrelatedThreads;
  m.attr("correlated_max_blocks") = multiprocessor_count(0) * kCorrelatedBlocksPerSM;
}
