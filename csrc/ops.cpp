// Schemas of every physmdn op and their CPU implementations. CUDA implementations: csrc/cuda/backend.cuh (registered in csrc/cuda/kernels.cu).
// Autograd and fake (meta) implementations are attached in Python (python/physmdn/_ops.py).
#include <torch/csrc/stable/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/buffer_pool.h"
#include "cpu/kernels.h"
#include "mvn_math.h"
#include "op_impl.h"

namespace physmdn {

// ----- CPU instruction-set selection ---------------------------------------------------------------
namespace {
bool cpu_has_avx2() {
#if defined(PHYSMDN_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}
std::atomic<int>& cpu_isa_state() {
  // 0 = baseline, 1 = avx2. PHYSMDN_CPU_ISA=default forces the baseline build.
  static std::atomic<int> state{[] {
    const char* env = std::getenv("PHYSMDN_CPU_ISA");
    if (env && std::strcmp(env, "default") == 0) return 0;
    return cpu_has_avx2() ? 1 : 0;
  }()};
  return state;
}
}  // namespace

std::atomic<bool>& cpu::rows_path_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}
bool set_cpu_rows_path(bool enabled) { return cpu::rows_path_enabled().exchange(enabled); }

std::atomic<bool>& cuda_lanes_schedule_enabled() {
  // off by default; PHYSMDN_CUDA_LANES=1 turns it on from the start (bench/gpu_check.sh's benchmarks once it passed)
  // in a build that has it (CMake option PHYSMDN_CUDA_LANES); ignored in one without
  static std::atomic<bool> enabled{[] {
#ifdef PHYSMDN_WITH_CUDA_LANES
    const char* env = std::getenv("PHYSMDN_CUDA_LANES");
    return env != nullptr && std::strcmp(env, "1") == 0;
#else
    return false;
#endif
  }()};
  return enabled;
}
bool cuda_lanes_schedule() { return cuda_lanes_schedule_enabled().load(); }
bool set_cuda_lanes_schedule(bool enabled) { return cuda_lanes_schedule_enabled().exchange(enabled); }

std::string cpu_isa() { return cpu_isa_state().load() == 1 ? "avx2" : "default"; }
std::string set_cpu_isa(const std::string& isa) {
  std::string previous = cpu_isa();
  if (isa == "default") {
    cpu_isa_state().store(0);
  } else if (isa == "avx2") {
    PHYSMDN_CHECK(cpu_has_avx2(), "set_cpu_isa: this CPU (or this build) has no AVX2+FMA kernels");
    cpu_isa_state().store(1);
  } else {
    fail("set_cpu_isa: isa must be 'default' or 'avx2', got '", isa, "'");
  }
  return previous;
}

#define PHYSMDN_CPU_CALL(fn, ...)                         \
  do {                                                    \
    if (cpu_isa_state().load() == 1) {                    \
      cpu::avx2::fn(__VA_ARGS__);                         \
    } else {                                              \
      cpu::default_isa::fn(__VA_ARGS__);                  \
    }                                                     \
  } while (0)

// The CPU kernels' vector exp and log (selected ISA) on a contiguous float32 tensor: (exp(x), log(x)). variant 1:
// the kernels' e^-x routine (exp = exp(-x)); 2: their e^x routine for arguments <= 0 (or NaN; x must be).
std::tuple<Tensor, Tensor> cpu_vector_exp_log(const Tensor& x, int64_t variant) {
  PHYSMDN_CHECK(x.is_cpu() && x.scalar_type() == kFloat, "x must be a float32 CPU tensor, got ", x.scalar_type(), " on ",
                x.device());
  PHYSMDN_CHECK(variant >= 0 && variant <= 2, "variant must be 0, 1 or 2, got ", variant);
  const auto xc = as_contiguous(x);
  auto e = empty(xc.sizes(), kFloat, xc.device()), l = empty(xc.sizes(), kFloat, xc.device());
  PHYSMDN_CPU_CALL(vector_exp_log, xc, variant, e, l);
  return {e, l};
}

namespace {
double value_of(const Tensor& t) {  // one element of a CPU tensor, as double
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case kDouble: return *static_cast<const double*>(p);
    case kFloat: return *static_cast<const float*>(p);
    case kBFloat16: return static_cast<float>(*static_cast<const BFloat16*>(p));
    case kHalf: return static_cast<float>(*static_cast<const Half*>(p));
    default: fail("_scale_by_: upstream must be a floating-point tensor, got ", t.scalar_type());
  }
}

// t *= factor elementwise in t's dtype (the product rounded to it, as torch's mul_), any strides.
template <typename T>
void multiply_in_place(Tensor& t, T factor) {
  T* base = t.mutable_data_ptr<T>();
  const int64_t dims = t.dim(), n = t.numel();
  std::vector<int64_t> index(dims, 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t offset = 0;
    for (int64_t d = 0; d < dims; ++d) offset += index[d] * t.stride(d);
    base[offset] = static_cast<T>(static_cast<acc_type<T>>(base[offset]) * static_cast<acc_type<T>>(factor));
    for (int64_t d = dims - 1; d >= 0; --d) {
      if (++index[d] < t.size(d)) break;
      index[d] = 0;
    }
  }
}
}  // namespace

// The eager backward's in-place rescaling of the forward's gradients (python/physmdn/_ops.py): tensors, gradients
// computed for an upstream gradient of scale per sample, become those for upstream (one value for every sample):
// multiplied in place by upstream / scale (upstream converted to each tensor's dtype, divided by scale in it, as torch
// computes upstream.to(dtype) / scale), untouched when upstream equals scale (in upstream's dtype, or exactly). On
// CUDA the comparison runs on the device, inside the kernel (csrc/cuda/backend.cuh): no synchronization, and for the
// usual unit upstream gradient of loss.sum() / the op's own mean no pass over the [B, K, D] gradients at all.
void scale_by_on_host(const std::vector<Tensor>& tensors, const Tensor& upstream, double scale) {
  const double v = value_of(upstream);
  if (v == scale || v == rounded(scale, upstream.scalar_type())) return;
  for (Tensor t : tensors) {
    if (!t.defined() || !t.numel()) continue;
    PHYSMDN_DISPATCH_FLOATING(t.scalar_type(), "_scale_by_", [&] {
      using acc_t = acc_type<scalar_t>;
      const auto in_dtype = static_cast<acc_t>(static_cast<scalar_t>(v));
      const auto factor = static_cast<scalar_t>(scale != 1.0 ? in_dtype / static_cast<acc_t>(scale) : in_dtype);
      multiply_in_place<scalar_t>(t, factor);
    });
  }
}

void cpu_scale_by_(std::vector<Tensor> tensors, const Tensor& upstream, double scale) {
  check_scale_by_args(tensors, upstream);
  scale_by_on_host(tensors, upstream, scale);
}

// ----- CPU backend ---------------------------------------------------------------------------------
struct CpuBackend {
  // outputs come from the buffer pool (csrc/cpu/buffer_pool.h): no page faults for a loop's recurring sizes
  static Tensor empty(IntArrayRef sizes, const Spec& spec) { return cpu::pooled_empty(sizes, spec.dtype); }
  // forward-with-gradients writes bfloat16 / float16 gradients directly (cpu/mixture_nll.cpp)
  static constexpr bool kForwardGradInInputDtype = true;
  // the fused loss: the forward with gradients as above
  static bool loss_grads_in_input_dtype(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
    return kForwardGradInInputDtype;
  }
  // the mixture NLL: the forward with gradients as above, the backward op float32
  static bool mixture_grads_in_input_dtype(bool backward, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&) {
    return !backward && kForwardGradInInputDtype;
  }
  static void check_device(const Tensor& means) {
    PHYSMDN_CHECK(means.is_cpu(), "means must be a CPU tensor for the CPU kernel, got ", means.device());
  }
  template <typename... Args>
  static void mixture_nll_forward(Args&&... args) { PHYSMDN_CPU_CALL(mixture_nll_forward, args...); }
  template <typename... Args>
  static bool mixture_nll_forward_grad(Args&&... args) {
    return cpu_isa_state().load() == 1 ? cpu::avx2::mixture_nll_forward_grad(args...)
                                       : cpu::default_isa::mixture_nll_forward_grad(args...);
  }
  template <typename... Args>
  static void mixture_nll_backward(Args&&... args) { PHYSMDN_CPU_CALL(mixture_nll_backward, args...); }
  template <typename... Args>
  static void correlated_penalty_forward(Args&&... args) { PHYSMDN_CPU_CALL(correlated_penalty_forward, args...); }
  template <typename... Args>
  static void correlated_penalty_backward(Args&&... args) { PHYSMDN_CPU_CALL(correlated_penalty_backward, args...); }
  template <typename... Args>
  static void mdn_loss_forward(Args&&... args) { PHYSMDN_CPU_CALL(mdn_loss_forward, args...); }
  template <typename... Args>
  static void mdn_loss_backward(Args&&... args) { PHYSMDN_CPU_CALL(mdn_loss_backward, args...); }
  template <typename... Args>
  static bool mdn_loss_forward_grad(Args&&... args) {
    return cpu_isa_state().load() == 1 ? cpu::avx2::mdn_loss_forward_grad(args...)
                                       : cpu::default_isa::mdn_loss_forward_grad(args...);
  }
};

// ----- full-covariance mixture NLL (csrc/cpu/mixture_nll_tril.cpp; CUDA: csrc/cuda/correlated.cuh; the input checks
// in checks.h; python/physmdn/_mixture_correlated.py attaches the fake kernels, the autograd and a torch
// implementation for the other devices) --------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> cpu_mixture_nll_tril(const Tensor& logits, const Tensor& means,
                                                        const Tensor& scale_tril, const Tensor& target) {
  check_tril_inputs(logits, means, scale_tril, target);
  CpuBackend::check_device(means);
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  const auto dt = means.scalar_type(), acc = acc_dtype(dt);
  const Device cpu = means.device();
  auto loss = empty({B}, dt, cpu), z = cpu::pooled_empty({B, K, D}, acc), r = empty({B, K}, acc, cpu);
  if (B > 0)
    PHYSMDN_CPU_CALL(mixture_nll_tril_forward, as_contiguous(logits), as_contiguous(means), as_contiguous(scale_tril),
                     as_contiguous(target), loss, z, r);
  return {loss, z, r};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_mixture_nll_tril_backward(const Tensor& grad_loss,
                                                                         const Tensor& logits,
                                                                         const Tensor& scale_tril, const Tensor& z,
                                                                         const Tensor& responsibilities) {
  check_tril_backward_inputs(grad_loss, logits, scale_tril, z, responsibilities);
  PHYSMDN_CHECK(scale_tril.is_cpu(), "scale_tril must be a CPU tensor for the CPU kernel, got ", scale_tril.device());
  const auto B = z.size(0), K = z.size(1), D = z.size(2);
  const auto dt = scale_tril.scalar_type(), acc = acc_dtype(dt);
  const Device cpu = scale_tril.device();
  auto gl = empty({B, K}, dt, cpu), gm = cpu::pooled_empty({B, K, D}, dt), gL = cpu::pooled_empty({B, K, D, D}, dt),
       gy = empty({B, D}, dt, cpu);
  if (B > 0)
    PHYSMDN_CPU_CALL(mixture_nll_tril_backward, to_dtype(grad_loss, acc), as_contiguous(logits),
                     as_contiguous(scale_tril), as_contiguous(z), as_contiguous(responsibilities), gl, gm, gL, gy);
  return {gl, gm, gL, gy};
}

// ----- low-rank-plus-diagonal mixture NLL (csrc/cpu/mixture_nll_lowrank.cpp; python/physmdn/_mixture_correlated.py as
// for tril) -------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_mixture_nll_lowrank(const Tensor& logits, const Tensor& means,
                                                                   const Tensor& cov_factor, const Tensor& cov_diag,
                                                                   const Tensor& target) {
  check_lowrank_inputs(logits, means, cov_factor, cov_diag, target);
  CpuBackend::check_device(means);
  const auto B = means.size(0), K = means.size(1), D = means.size(2), R = cov_factor.size(3);
  const auto dt = means.scalar_type(), acc = acc_dtype(dt);
  const Device cpu = means.device();
  auto loss = empty({B}, dt, cpu), v = cpu::pooled_empty({B, K, D}, acc), r = empty({B, K}, acc, cpu),
       chol = empty({B, K, R, R}, acc, cpu);
  if (B > 0)
    PHYSMDN_CPU_CALL(mixture_nll_lowrank_forward, as_contiguous(logits), as_contiguous(means),
                     as_contiguous(cov_factor), as_contiguous(cov_diag), as_contiguous(target), loss, v, r, chol);
  return {loss, v, r, chol};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpu_mixture_nll_lowrank_backward(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor, const Tensor& cov_diag, const Tensor& v,
    const Tensor& responsibilities, const Tensor& chol) {
  check_lowrank_backward_inputs(grad_loss, logits, cov_factor, cov_diag, v, responsibilities, chol);
  PHYSMDN_CHECK(cov_factor.is_cpu(), "cov_factor must be a CPU tensor for the CPU kernel, got ", cov_factor.device());
  const auto B = v.size(0), K = v.size(1), D = v.size(2), R = cov_factor.size(3);
  const auto dt = cov_factor.scalar_type(), acc = acc_dtype(dt);
  const Device cpu = cov_factor.device();
  auto gl = empty({B, K}, dt, cpu), gm = cpu::pooled_empty({B, K, D}, dt), gW = cpu::pooled_empty({B, K, D, R}, dt),
       gd = cpu::pooled_empty({B, K, D}, dt), gy = empty({B, D}, dt, cpu);
  if (B > 0)
    PHYSMDN_CPU_CALL(mixture_nll_lowrank_backward, to_dtype(grad_loss, acc), as_contiguous(logits),
                     as_contiguous(cov_factor), as_contiguous(cov_diag), as_contiguous(v),
                     as_contiguous(responsibilities), as_contiguous(chol), gl, gm, gW, gd, gy);
  return {gl, gm, gW, gd, gy};
}

STABLE_TORCH_LIBRARY(physmdn, m) {
  PHYSMDN_OP_SCHEMAS(m);
  // tests only: the CPU kernels' vector exp / log (selected ISA) on a float32 tensor
  m.def("_vector_exp_log(Tensor x, int variant=0) -> (Tensor exp, Tensor log)");
  // the eager backward's rescaling of the forward's gradients in place (see cpu_scale_by_)
  m.def("_scale_by_(Tensor(a!)[] tensors, Tensor upstream, float scale) -> ()");
  // full-covariance mixture NLL: (loss [B], z [B, K, D], responsibilities [B, K]) and its backward
  m.def("mixture_nll_tril(Tensor logits, Tensor means, Tensor scale_tril, Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def("mixture_nll_tril_backward(Tensor grad_loss, Tensor logits, Tensor scale_tril, Tensor z, "
        "Tensor responsibilities) -> (Tensor, Tensor, Tensor, Tensor)");
  // low-rank-plus-diagonal mixture NLL: (loss [B], v [B, K, D], responsibilities [B, K], chol [B, K, R, R]) and its
  // backward
  m.def("mixture_nll_lowrank(Tensor logits, Tensor means, Tensor cov_factor, Tensor cov_diag, Tensor target) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("mixture_nll_lowrank_backward(Tensor grad_loss, Tensor logits, Tensor cov_factor, Tensor cov_diag, Tensor v, "
        "Tensor responsibilities, Tensor chol) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(physmdn, CPU, m) {
  PHYSMDN_OP_IMPLS(m, CpuBackend);
  m.impl("_vector_exp_log", TORCH_BOX(&cpu_vector_exp_log));
  m.impl("_scale_by_", TORCH_BOX(&cpu_scale_by_));
  m.impl("mixture_nll_tril", TORCH_BOX(&cpu_mixture_nll_tril));
  m.impl("mixture_nll_tril_backward", TORCH_BOX(&cpu_mixture_nll_tril_backward));
  m.impl("mixture_nll_lowrank", TORCH_BOX(&cpu_mixture_nll_lowrank));
  m.impl("mixture_nll_lowrank_backward", TORCH_BOX(&cpu_mixture_nll_lowrank_backward));
}

}  // namespace physmdn
