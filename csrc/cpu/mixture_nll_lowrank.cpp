// CPU driver of the low-rank-plus-diagonal mixture NLL (csrc/mvn_math.h): one sample per iteration over torch's
// thread pool, contiguous inputs (csrc/ops.cpp makes them so), outputs allocated by ops.cpp. Compiled once per
// instruction set like the other drivers.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "mvn_math.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

namespace {
// samples per parallel task: about 16k multiply-adds of the O(K D R^2) work per sample
int64_t lowrank_grain(int64_t K, int64_t D, int64_t R) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D * R * (R + 1)));
}
}  // namespace

void mixture_nll_lowrank_forward(const Tensor& logits, const Tensor& means, const Tensor& cov_factor,
                                 const Tensor& cov_diag, const Tensor& target, Tensor& loss, Tensor& v,
                                 Tensor& responsibilities, Tensor& chol) {
  const int64_t B = means.size(0);
  const int K = static_cast<int>(means.size(1)), D = static_cast<int>(means.size(2));
  const int R = static_cast<int>(cov_factor.size(3));
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_lowrank", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *m = means.const_data_ptr<scalar_t>();
    const scalar_t *W = cov_factor.const_data_ptr<scalar_t>(), *d = cov_diag.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    acc_t *vo = v.mutable_data_ptr<acc_t>(), *ro = responsibilities.mutable_data_ptr<acc_t>();
    acc_t* co = chol.mutable_data_ptr<acc_t>();
    const int64_t KD = int64_t(K) * D, KR2 = int64_t(K) * R * R;
    torch::stable::parallel_for(0, B, lowrank_grain(K, D, R), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> lw(K);
      for (int64_t b = begin; b < end; ++b)
        out[b] = static_cast<scalar_t>(math::lowrank_nll_sample<scalar_t, acc_t>(
            l + b * K, m + b * KD, W + b * KD * R, d + b * KD, y + b * D, K, D, R, vo + b * KD, ro + b * K,
            co + b * KR2, lw.data()));
    });
  });
}

void mixture_nll_lowrank_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor,
                                  const Tensor& cov_diag, const Tensor& v, const Tensor& responsibilities,
                                  const Tensor& chol, Tensor& grad_logits, Tensor& grad_means, Tensor& grad_factor,
                                  Tensor& grad_diag, Tensor& grad_target) {
  const int64_t B = v.size(0);
  const int K = static_cast<int>(v.size(1)), D = static_cast<int>(v.size(2));
  const int R = static_cast<int>(cov_factor.size(3));
  PHYSMDN_DISPATCH_FLOATING(cov_factor.scalar_type(), "physmdn_mixture_nll_lowrank_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *W = cov_factor.const_data_ptr<scalar_t>();
    const scalar_t* d = cov_diag.const_data_ptr<scalar_t>();
    const acc_t *vi = v.const_data_ptr<acc_t>(), *ri = responsibilities.const_data_ptr<acc_t>();
    const acc_t *ci = chol.const_data_ptr<acc_t>(), *g = grad_loss.const_data_ptr<acc_t>();
    const int64_t g_stride = grad_loss.stride(0);
    scalar_t *gl = grad_logits.mutable_data_ptr<scalar_t>(), *gm = grad_means.mutable_data_ptr<scalar_t>();
    scalar_t *gW = grad_factor.mutable_data_ptr<scalar_t>(), *gd = grad_diag.mutable_data_ptr<scalar_t>();
    scalar_t* gy = grad_target.mutable_data_ptr<scalar_t>();
    const int64_t KD = int64_t(K) * D, KR2 = int64_t(K) * R * R;
    torch::stable::parallel_for(0, B, lowrank_grain(K, D, R), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        math::lowrank_nll_backward_sample<scalar_t, acc_t>(g[b * g_stride], l + b * K, W + b * KD * R, d + b * KD,
                                                           vi + b * KD, ri + b * K, ci + b * KR2, K, D, R, gl + b * K,
                                                           gm + b * KD, gW + b * KD * R, gd + b * KD, gy + b * D);
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA
