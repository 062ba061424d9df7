// The mixture NLL's CPU drivers: each entry point takes the first path of paths.h that applies (lanes, blocked
// float, blocked double, per-sample) and runs it over the batch. The per-sample math is mixture_math.h's.
// Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace).
#include "cpu/vec.h"

#include <algorithm>
#include <cmath>

#include "cpu/blocked.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/paths.h"
#include "mixture_math.h"
#include "views.h"

#ifdef PHYSMDN_LANES_PATH
#include "cpu/avx2/lanes.h"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {
namespace {

// Forward; with kGrad also the gradients (grad_* outputs) in the same pass, for an upstream gradient of grad_scale,
// or of grad_loss per sample when given (then it serves as the backward: a recompute with the same arithmetic as
// the forward's gradients). One exp per element and two per component, the exponentials of the log-sum-exps reused
// as pi and gamma. loss / saved: null tensors are not written.
template <bool kGrad, int kD, typename scalar_t, typename acc_t = block_acc_t<scalar_t>>
void mixture_nll_forward_blocked(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                 const Tensor& target, std::type_identity_t<acc_t> grad_scale, Tensor* loss,
                                 Tensor* saved, std::type_identity_t<acc_t>* gl, std::type_identity_t<acc_t>* gm,
                                 std::type_identity_t<acc_t>* gs, std::type_identity_t<acc_t>* gt,
                                 const Tensor* grad_loss = nullptr) {
  const int64_t B = means.size(0), K = means.size(1), D = PHYSMDN_DIM(means.size(2)), KD = K * D;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  scalar_t* out = loss ? loss->mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* sv = saved ? saved->mutable_data_ptr<acc_t>() : nullptr;
  const scalar_t* g_ptr = grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad_loss ? grad_loss->stride(0) : 0;
  torch::stable::parallel_for(0, (B + kBlockSamples - 1) / kBlockSamples, 1, [&](int64_t blk_begin, int64_t blk_end) {
    BlockBuffers<acc_t> w(K, D);
    BlockInput<scalar_t> in(K, D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t b0 = blk * kBlockSamples, nb = std::min(kBlockSamples, B - b0);
      in.load_block(mu_all, ls_all, lg_all, y_all, b0, nb, K, D);
      fill_target_block<kD>(in.y, nb, K, D, w.ybuf.data());
      gaussian_terms<kGrad>(in.mu, in.ls, w.ybuf.data(), nb * KD, w.q.data(), kGrad ? gm + b0 * KD : nullptr,
                            kGrad ? gs + b0 * KD : nullptr);
      component_log_densities<kD>(w.q.data(), nb * K, D, w.joint.data());
      // log pi = (logit - max) - log sum exp(logit - max)
      block_lse(in.lg, nb, K, w.shift.data(), w.sum.data(), w.lse.data(), w.prior.data());
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t shift = w.shift[i], log_sum = w.lse[i];
        if (sv) sv[math::kSavedPerSample * (b0 + i)] = shift, sv[math::kSavedPerSample * (b0 + i) + 1] = log_sum;
        const acc_t inv_sum = acc_t(1) / w.sum[i];
        for (int64_t k = 0; k < K; ++k) {
          w.joint[i * K + k] += (in.lg[i * K + k] - shift) - log_sum;
          if (kGrad) w.prior[i * K + k] *= inv_sum;  // pi
        }
      }
      block_lse(w.joint.data(), nb, K, w.shift.data(), w.sum.data(), w.lse.data(), w.tmp.data());
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        const acc_t lse = w.shift[i] + w.lse[i];
        if (sv) sv[math::kSavedPerSample * b + 2] = lse;
        if (out) out[b] = static_cast<scalar_t>(-lse);
        if constexpr (kGrad) {
          const acc_t inv_sum = acc_t(1) / w.sum[i];
          for (int64_t k = 0; k < K; ++k) w.tmp[i * K + k] *= inv_sum;  // gamma
          const acc_t g = g_ptr ? static_cast<acc_t>(g_ptr[b * g_stride]) : grad_scale;
          finish_sample_grads<kD>(K, D, g, w.tmp.data() + i * K, w.prior.data() + i * K, gl + b * K, gm + b * KD,
                                  gs + b * KD, gt + b * D);
        }
      }
    }
  });
}

template <int kD, typename scalar_t, typename acc_t = block_acc_t<scalar_t>>
void mixture_nll_backward_blocked(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                                  const Tensor& log_scales, const Tensor& target, const Tensor& saved,
                                  Tensor& grad_logits, Tensor& grad_means, Tensor& grad_log_scales,
                                  Tensor& grad_target) {
  const int64_t B = means.size(0), K = means.size(1), D = PHYSMDN_DIM(means.size(2)), KD = K * D;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
  const int64_t g_stride = grad_loss.stride(0);
  const acc_t* sv = saved.const_data_ptr<acc_t>();
  acc_t *gl = grad_logits.mutable_data_ptr<acc_t>(), *gm = grad_means.mutable_data_ptr<acc_t>();
  acc_t *gs = grad_log_scales.mutable_data_ptr<acc_t>(), *gt = grad_target.mutable_data_ptr<acc_t>();
  torch::stable::parallel_for(0, (B + kBlockSamples - 1) / kBlockSamples, 1, [&](int64_t blk_begin, int64_t blk_end) {
    BlockBuffers<acc_t> w(K, D);
    BlockInput<scalar_t> in(K, D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t b0 = blk * kBlockSamples, nb = std::min(kBlockSamples, B - b0);
      in.load_block(mu_all, ls_all, lg_all, y_all, b0, nb, K, D);
      fill_target_block<kD>(in.y, nb, K, D, w.ybuf.data());
      // z / s and z^2 - 1 go straight into the gradient outputs, scaled per component below
      gaussian_terms<true>(in.mu, in.ls, w.ybuf.data(), nb * KD, w.q.data(), gm + b0 * KD, gs + b0 * KD);
      component_log_densities<kD>(w.q.data(), nb * K, D, w.joint.data());
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t* s = sv + math::kSavedPerSample * (b0 + i);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t log_pi = (in.lg[i * K + k] - s[0]) - s[1];
          w.log_pi[i * K + k] = log_pi;
          w.joint[i * K + k] += log_pi - s[2];
        }
      }
      vec_exp(w.joint.data(), w.joint.data(), nb * K);    // gamma
      vec_exp(w.log_pi.data(), w.log_pi.data(), nb * K);  // pi
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        finish_sample_grads<kD>(K, D, static_cast<acc_t>(g_ptr[b * g_stride]), w.joint.data() + i * K,
                                w.log_pi.data() + i * K, gl + b * K, gm + b * KD, gs + b * KD, gt + b * D);
      }
    }
  });
}

}  // namespace

void vector_exp_log(const Tensor& x, int64_t variant, Tensor& exp_out, Tensor& log_out) {
  const float* in = x.const_data_ptr<float>();
  float *e = exp_out.mutable_data_ptr<float>(), *l = log_out.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  int64_t i = 0;
#ifdef PHYSMDN_LANES_PATH
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(in + i);
    _mm256_storeu_ps(e + i, variant == 1 ? soa::exp_neg8(v) : variant == 2 ? soa::exp_nonpos8(v) : soa::exp8(v));
    _mm256_storeu_ps(l + i, soa::log8(v));
  }
#else
  using Vec = Vec<float>;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (variant == 1 ? Vec::loadu(in + i).neg() : Vec::loadu(in + i)).exp().store(e + i);
    Vec::loadu(in + i).log().store(l + i);
  }
#endif
  for (; i < n; ++i) e[i] = std::exp(variant == 1 ? -in[i] : in[i]), l[i] = std::log(in[i]);
}

void mixture_nll_forward(const Tensor& logits_in, const Tensor& means_in, const Tensor& log_scales_in,
                         const Tensor& target_in, Tensor& loss, Tensor& saved) {
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in);
  const Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_LANES_PATH
  if (lanes_path_applies(means))
    return dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      soa::mixture_nll<false, scalar_t>(logits, means, log_scales, target, nullptr, 1.0f, loss.mutable_data_ptr<scalar_t>(),
                                        saved.mutable_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr);
    });
#endif
  if (blocked_float_path_applies(logits, means, log_scales, target))
    return dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      dispatch_dim(means.size(2), [&]<int kD>() {
        mixture_nll_forward_blocked<false, kD, scalar_t>(logits, means, log_scales, target, 1.0f, &loss, &saved,
                                                         nullptr, nullptr, nullptr, nullptr);
      });
    });
  if (blocked_double_path_applies(logits, means, log_scales, target))
    return dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_blocked<false, kD, double>(logits, means, log_scales, target, 1.0, &loss, &saved, nullptr,
                                                     nullptr, nullptr, nullptr);
    });
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    scalar_t* loss_ptr = loss.mutable_data_ptr<scalar_t>();
    acc_t* saved_ptr = saved.mutable_data_ptr<acc_t>();
    torch::stable::parallel_for(0, means.size(0), grain_size(v.K, v.D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        loss_ptr[b] = static_cast<scalar_t>(math::mixture_nll_sample<acc_t>(v, b, saved_ptr + math::kSavedPerSample * b));
      }
    });
  });
}

bool mixture_nll_forward_grad(const Tensor& logits_in, const Tensor& means_in,
                              const Tensor& log_scales_in, const Tensor& target_in, Tensor& loss,
                              Tensor& saved, Tensor& grad_logits, Tensor& grad_means,
                              Tensor& grad_log_scales, Tensor& grad_target, double grad_scale) {
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in);
  const Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
  if (blocked_double_path_applies(logits, means, log_scales, target)) {
    dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_blocked<true, kD, double>(logits, means, log_scales, target, grad_scale, &loss, &saved,
                                                    grad_logits.mutable_data_ptr<double>(), grad_means.mutable_data_ptr<double>(),
                                                    grad_log_scales.mutable_data_ptr<double>(), grad_target.mutable_data_ptr<double>());
    });
    return true;
  }
#ifdef PHYSMDN_LANES_PATH
  if (lanes_path_applies(means)) {
    dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      const auto run = [&]<typename grad_t>() {
        soa::mixture_nll<true, scalar_t, grad_t>(logits, means, log_scales, target, nullptr,
                                                 static_cast<float>(grad_scale), loss.mutable_data_ptr<scalar_t>(),
                                                 saved.mutable_data_ptr<float>(), grad_logits.mutable_data_ptr<grad_t>(),
                                                 grad_means.mutable_data_ptr<grad_t>(), grad_log_scales.mutable_data_ptr<grad_t>(),
                                                 grad_target.mutable_data_ptr<grad_t>());
      };
      if (grad_means.scalar_type() == kFloat)
        run.template operator()<float>();
      else
        run.template operator()<scalar_t>();  // written in the input dtype, no float32 copy
    });
    return true;
  }
#endif
  if (!blocked_float_path_applies(logits, means, log_scales, target)) return false;
  return with_float_grads({&grad_logits, &grad_means, &grad_log_scales, &grad_target}, [&] {
    dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      dispatch_dim(means.size(2), [&]<int kD>() {
        mixture_nll_forward_blocked<true, kD, scalar_t>(
            logits, means, log_scales, target, static_cast<float>(grad_scale), &loss, &saved,
            grad_logits.mutable_data_ptr<float>(), grad_means.mutable_data_ptr<float>(), grad_log_scales.mutable_data_ptr<float>(),
            grad_target.mutable_data_ptr<float>());
      });
    });
  return true;
  });
}

void mixture_nll_backward(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& means_in,
                          const Tensor& log_scales_in, const Tensor& target_in, const Tensor& saved,
                          Tensor& grad_logits, Tensor& grad_means, Tensor& grad_log_scales,
                          Tensor& grad_target) {
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in);
  const Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_LANES_PATH
  // recomputes the forward (the saved state is not needed by the lanes path)
  if (lanes_path_applies(means))
    return dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      soa::mixture_nll<true, scalar_t>(logits, means, log_scales, target, &grad_loss, 1.0f, nullptr, nullptr,
                                       grad_logits.mutable_data_ptr<float>(), grad_means.mutable_data_ptr<float>(),
                                       grad_log_scales.mutable_data_ptr<float>(), grad_target.mutable_data_ptr<float>());
    });
#endif
  if (blocked_float_path_applies(logits, means, log_scales, target))
    return dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
      dispatch_dim(means.size(2), [&]<int kD>() {
        mixture_nll_backward_blocked<kD, scalar_t>(grad_loss, logits, means, log_scales, target, saved, grad_logits,
                                                   grad_means, grad_log_scales, grad_target);
      });
    });
  // float64: recomputes with the forward's arithmetic, so that a retained graph's second backward gives the
  // gradients the forward gave (bit for bit: gradcheck's reentrancy check)
  if (blocked_double_path_applies(logits, means, log_scales, target))
    return dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_blocked<true, kD, double>(logits, means, log_scales, target, 1.0, nullptr, nullptr,
                                                    grad_logits.mutable_data_ptr<double>(), grad_means.mutable_data_ptr<double>(),
                                                    grad_log_scales.mutable_data_ptr<double>(), grad_target.mutable_data_ptr<double>(),
                                                    &grad_loss);
    });
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
    const int64_t g_stride = grad_loss.stride(0);
    const acc_t* saved_ptr = saved.const_data_ptr<acc_t>();
    acc_t* gl = grad_logits.mutable_data_ptr<acc_t>();
    acc_t* gm = grad_means.mutable_data_ptr<acc_t>();
    acc_t* gs = grad_log_scales.mutable_data_ptr<acc_t>();
    acc_t* gt = grad_target.mutable_data_ptr<acc_t>();
    const int64_t K = v.K, D = v.D;
    torch::stable::parallel_for(0, means.size(0), grain_size(K, D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::mixture_nll_sample_backward<acc_t>(v, b, static_cast<acc_t>(g_ptr[b * g_stride]),
                                                 saved_ptr + math::kSavedPerSample * b, gl + b * K, gm + b * K * D,
                                                 gs + b * K * D, gt + b * D);
      }
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA
