// CPU driver of the full-covariance mixture NLL (csrc/mvn_math.h): one sample per iteration over torch's thread
// pool, contiguous inputs (csrc/ops.cpp makes them so), outputs allocated by ops.cpp. Compiled once per instruction
// set like the other drivers (the AVX2 build lets the compiler vectorize the per-component loops).
#include <algorithm>
#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "mvn_math.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

void mixture_nll_tril_forward(const Tensor& logits, const Tensor& means, const Tensor& scale_tril,
                              const Tensor& target, Tensor& loss, Tensor& z, Tensor& responsibilities) {
  const int64_t B = means.size(0);
  const int K = static_cast<int>(means.size(1)), D = static_cast<int>(means.size(2));
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_tril", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *m = means.const_data_ptr<scalar_t>();
    const scalar_t *L = scale_tril.const_data_ptr<scalar_t>(), *y = target.const_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    acc_t *zo = z.mutable_data_ptr<acc_t>(), *ro = responsibilities.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, int64_t(K) * D * D));
    torch::stable::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> lw(K);
      for (int64_t b = begin; b < end; ++b)
        out[b] = static_cast<scalar_t>(math::tril_nll_sample<scalar_t, acc_t>(
            l + b * K, m + b * K * D, L + b * K * D * D, y + b * D, K, D, zo + b * K * D, ro + b * K, lw.data()));
    });
  });
}

void mixture_nll_tril_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril,
                               const Tensor& z, const Tensor& responsibilities, Tensor& grad_logits,
                               Tensor& grad_means, Tensor& grad_tril, Tensor& grad_target) {
  const int64_t B = z.size(0);
  const int K = static_cast<int>(z.size(1)), D = static_cast<int>(z.size(2));
  PHYSMDN_DISPATCH_FLOATING(scale_tril.scalar_type(), "physmdn_mixture_nll_tril_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *L = scale_tril.const_data_ptr<scalar_t>();
    const acc_t *zi = z.const_data_ptr<acc_t>(), *ri = responsibilities.const_data_ptr<acc_t>();
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    const int64_t g_stride = grad_loss.stride(0);
    scalar_t *gl = grad_logits.mutable_data_ptr<scalar_t>(), *gm = grad_means.mutable_data_ptr<scalar_t>();
    scalar_t *gL = grad_tril.mutable_data_ptr<scalar_t>(), *gy = grad_target.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, int64_t(K) * D * D));
    torch::stable::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        math::tril_nll_backward_sample<scalar_t, acc_t>(g[b * g_stride], l + b * K, L + b * K * D * D, zi + b * K * D,
                                                        ri + b * K, K, D, gl + b * K, gm + b * K * D,
                                                        gL + b * K * D * D, gy + b * D);
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA
