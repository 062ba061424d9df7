// Schemas of every physmdn op and their CPU implementations. CUDA implementations: csrc/cuda/kernels.cu.
// Autograd and fake (meta) implementations are attached in Python (python/physmdn/_ops.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "checks.h"
#include "cpu/kernels.h"
#include "mixture_math.h"

namespace physmdn {

// ----- CPU instruction-set selection ---------------------------------------------------------------
namespace {
bool cpu_has_avx2() {
#if defined(PHYSMDN_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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

std::string cpu_isa() { return cpu_isa_state().load() == 1 ? "avx2" : "default"; }
std::string set_cpu_isa(const std::string& isa) {
  std::string previous = cpu_isa();
  if (isa == "default") {
    cpu_isa_state().store(0);
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "set_cpu_isa: this CPU (or this build) has no AVX2+FMA kernels");
    cpu_isa_state().store(1);
  } else {
    TORCH_CHECK(false, "set_cpu_isa: isa must be 'default' or 'avx2', got '", isa, "'");
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

// ----- mixture NLL ----------------------------------------------------------------------------------
at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

std::tuple<at::Tensor, at::Tensor> mixture_nll_fwd_cpu(const at::Tensor& logits, const at::Tensor& means,
                                                       const at::Tensor& log_scales, const at::Tensor& target) {
  check_mixture_inputs(logits, means, log_scales, target);
  TORCH_CHECK(means.device().is_cpu(), "means must be a CPU tensor for the CPU kernel, got ", means.device());
  const auto B = means.size(0);
  auto loss = at::empty({B}, means.options());
  auto lse = at::empty({B, math::kSavedPerSample}, means.options().dtype(acc_dtype(means.scalar_type())));
  if (B > 0) PHYSMDN_CPU_CALL(mixture_nll_forward, logits, means, log_scales, target, loss, lse);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_nll_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
    const at::Tensor& target, const at::Tensor& lse) {
  check_mixture_inputs(logits, means, log_scales, target);
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B, "grad_loss must be [B] = [", B, "], got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == means.scalar_type(), "grad_loss must have dtype ", means.scalar_type(),
              ", got ", grad_loss.scalar_type());
  const auto acc = acc_dtype(means.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == math::kSavedPerSample && lse.scalar_type() == acc && lse.is_contiguous(),
              "lse must be a contiguous [B, 3] ", acc, " tensor from mixture_nll_fwd, got ", lse.sizes(), " ",
              lse.scalar_type());
  auto opts = means.options().dtype(acc);
  auto grad_logits = at::empty({B, K}, opts);
  auto grad_means = at::empty({B, K, D}, opts);
  auto grad_log_scales = at::empty({B, K, D}, opts);
  auto grad_target = at::empty({B, D}, opts);
  if (B > 0)
    PHYSMDN_CPU_CALL(mixture_nll_backward, grad_loss, logits, means, log_scales, target, lse, grad_logits, grad_means,
                     grad_log_scales, grad_target);
  const auto dt = means.scalar_type();
  return {grad_logits.to(dt), grad_means.to(dt), grad_log_scales.to(dt), grad_target.to(dt)};
}

TORCH_LIBRARY(physmdn, m) {
  m.def("mixture_nll_fwd(Tensor logits, Tensor means, Tensor log_scales, Tensor target) -> (Tensor loss, Tensor lse)");
  m.def(
      "mixture_nll_bwd(Tensor grad_loss, Tensor logits, Tensor means, Tensor log_scales, Tensor target, Tensor lse) "
      "-> (Tensor grad_logits, Tensor grad_means, Tensor grad_log_scales, Tensor grad_target)");
}

TORCH_LIBRARY_IMPL(physmdn, CPU, m) {
  m.impl("mixture_nll_fwd", &mixture_nll_fwd_cpu);
  m.impl("mixture_nll_bwd", &mixture_nll_bwd_cpu);
}

}  // namespace physmdn
