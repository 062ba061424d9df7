// CUDA kernels of the mixture NLL with correlated components (the per-sample math of csrc/mvn_math.h, shared with
// the CPU drivers), their launchers and the op entry points kernels.cu registers: mixture_nll_tril,
// mixture_nll_lowrank and their backwards; and the physics penalty of correlated components (csrc/mvn_physics_math.h,
// a thread per (sample, component) pair; op_impl.h's correlated_penalty over CudaBackend's two launchers defined
// here).
//
// A thread per sample in a grid-stride loop over the batch: each thread runs the per-sample functions on its
// sample's contiguous rows (the entry points make the inputs contiguous), reading its factor rows in order (L1 keeps
// each warp's lines between the loads). Accumulation in float32 (float64 for double inputs); the saved state (z or v,
// the responsibilities, the capacitance factors) is written in the accumulation dtype, the loss and the gradients in
// the input dtype, as on the CPU (csrc/ops.cpp).
//
// Like backend.cuh, a header that also compiles as host C++ under the simulator of tests/cuda/cuda_sim/host_sim.h
// (tests/cuda/test_cuda_sim.py), with the same launch hooks defined by the includer first.
#pragma once
#if !defined(PHYSMDN_LAUNCH) || !defined(PHYSMDN_LAUNCH_CHECK) || !defined(PHYSMDN_DEVICE_GUARD) || \
    !defined(PHYSMDN_ON_DEVICE)
#error "csrc/cuda/correlated.cuh: define the launch hooks first (see csrc/cuda/backend.cuh's header comment)"
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "mvn_math.h"
#include "mvn_physics_math.h"
#include "op_impl.h"

namespace physmdn {
namespace {

constexpr int kCorrelatedThreads = 128;
// Resident blocks per SM the grid-stride kernels are launched with (at most 2048 threads per SM: 16 of 128)
constexpr int kCorrelatedBlocksPerSM = 16;

// Blocks of kCorrelatedThreads for B samples, at most max_blocks (the grid-stride loop takes the rest).
unsigned int correlated_blocks(int64_t B, int64_t max_blocks) {
  const int64_t needed = (B + kCorrelatedThreads - 1) / kCorrelatedThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, max_blocks)));
}

// ----- kernels ----------------------------------------------------------------------------------------------------
// Forward: loss [B] (input dtype), z [B, K, D] and responsibilities r [B, K] (acc_t). Each sample's row of r is also
// tril_nll_sample's scratch for the log mixture weights (it reads lw[k] before it writes r[k]): no per-thread array
// of K elements, so K is unbounded.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads)
    tril_nll_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                    const scalar_t* __restrict__ scale_tril, const scalar_t* __restrict__ target, int64_t B, int K,
                    int D, scalar_t* __restrict__ loss, acc_t* __restrict__ z, acc_t* __restrict__ r) {
  const int64_t KD = static_cast<int64_t>(K) * D, KDD = KD * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    acc_t* const rb = r + b * K;
    loss[b] = static_cast<scalar_t>(math::tril_nll_sample<scalar_t, acc_t>(
        logits + b * K, means + b * KD, scale_tril + b * KDD, target + b * D, K, D, z + b * KD, rb, rb));
  }
}

// Backward: the gradients (input dtype) of logits [B, K], means [B, K, D], scale_tril [B, K, D, D] (zero above the
// diagonal) and target [B, D] for the upstream gradient grad_loss[b * grad_stride] (acc_t), from the forward's z and
// responsibilities.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads)
    tril_nll_backward_kernel(const acc_t* __restrict__ grad_loss, int64_t grad_stride,
                             const scalar_t* __restrict__ logits, const scalar_t* __restrict__ scale_tril,
                             const acc_t* __restrict__ z, const acc_t* __restrict__ r, int64_t B, int K, int D,
                             scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_means,
                             scalar_t* __restrict__ grad_tril, scalar_t* __restrict__ grad_target) {
  const int64_t KD = static_cast<int64_t>(K) * D, KDD = KD * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride)
    math::tril_nll_backward_sample<scalar_t, acc_t>(grad_loss[b * grad_stride], logits + b * K, scale_tril + b * KDD,
                                                    z + b * KD, r + b * K, K, D, grad_logits + b * K,
                                                    grad_means + b * KD, grad_tril + b * KDD, grad_target + b * D);
}

// Low rank plus diagonal, forward: loss [B] (input dtype), v [B, K, D], responsibilities r [B, K] and the capacitance
// factors chol [B, K, R, R] (acc_t); r's row is the scratch of the log mixture weights as in tril_nll_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads)
    lowrank_nll_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                       const scalar_t* __restrict__ cov_factor, const scalar_t* __restrict__ cov_diag,
                       const scalar_t* __restrict__ target, int64_t B, int K, int D, int R,
                       scalar_t* __restrict__ loss, acc_t* __restrict__ v, acc_t* __restrict__ r,
                       acc_t* __restrict__ chol) {
  const int64_t KD = static_cast<int64_t>(K) * D, KRR = static_cast<int64_t>(K) * R * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    acc_t* const rb = r + b * K;
    loss[b] = static_cast<scalar_t>(math::lowrank_nll_sample<scalar_t, acc_t>(
        logits + b * K, means + b * KD, cov_factor + b * KD * R, cov_diag + b * KD, target + b * D, K, D, R,
        v + b * KD, rb, chol + b * KRR, rb));
  }
}

// Low rank plus diagonal, backward: the gradients (input dtype) of logits [B, K], means [B, K, D], cov_factor
// [B, K, D, R], cov_diag [B, K, D] and target [B, D] from the forward's v, responsibilities and chol.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads)
    lowrank_nll_backward_kernel(const acc_t* __restrict__ grad_loss, int64_t grad_stride,
                                const scalar_t* __restrict__ logits, const scalar_t* __restrict__ cov_factor,
                                const scalar_t* __restrict__ cov_diag, const acc_t* __restrict__ v,
                                const acc_t* __restrict__ r, const acc_t* __restrict__ chol, int64_t B, int K, int D,
                                int R, scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_means,
                                scalar_t* __restrict__ grad_factor, scalar_t* __restrict__ grad_diag,
                                scalar_t* __restrict__ grad_target) {
  const int64_t KD = static_cast<int64_t>(K) * D, KRR = static_cast<int64_t>(K) * R * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride)
    math::lowrank_nll_backward_sample<scalar_t, acc_t>(
        grad_loss[b * grad_stride], logits + b * K, cov_factor + b * KD * R, cov_diag + b * KD, v + b * KD, r + b * K,
        chol + b * KRR, K, D, R, grad_logits + b * K, grad_means + b * KD, grad_factor + b * KD * R,
        grad_diag + b * KD, grad_target + b * D);
}

// Physics penalty, forward: P [B * K] (input dtype) of each (sample, component) pair n = b K + k from its contiguous
// rows of means [D], factor [D, Q] and diag [D] (null without), for one family. N < 2^31 (the launcher checks): the
// pair's (b, k) by a 32-bit division (a 64-bit one is a call, whose saved registers spill). At least
// kPenaltyBlocksPerSM resident blocks: ptxas's own register budget for the stencil's backward spills.
constexpr int kPenaltyBlocksPerSM = 4;

template <int kFamily, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads, kPenaltyBlocksPerSM)
    correlated_penalty_kernel(const scalar_t* __restrict__ means, const scalar_t* __restrict__ factor,
                              const scalar_t* __restrict__ diag, math::PhysicsView<scalar_t> p, int64_t N, int64_t K,
                              int64_t D, int64_t Q, scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const math::CorrelatedGrads<acc_t> none{nullptr, nullptr, nullptr};
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    const int64_t b = static_cast<uint32_t>(n) / static_cast<uint32_t>(K);
    const math::CorrelatedComponent<scalar_t> x{means + n * D, factor + n * D * Q, diag ? diag + n * D : nullptr, D, Q};
    out[n] = static_cast<scalar_t>(
        math::correlated_family_penalty<kFamily, acc_t, false>(x, p, b, n - b * K, acc_t(0), none));
  }
}

// Physics penalty, backward: grad[n] dP/d(means, factor, diag) (acc_t) into the pair's rows.
template <int kFamily, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCorrelatedThreads, kPenaltyBlocksPerSM)
    correlated_penalty_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ means,
                                       const scalar_t* __restrict__ factor, const scalar_t* __restrict__ diag,
                                       math::PhysicsView<scalar_t> p, int64_t N, int64_t K, int64_t D, int64_t Q,
                                       acc_t* __restrict__ grad_means, acc_t* __restrict__ grad_factor,
                                       acc_t* __restrict__ grad_diag) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    const int64_t b = static_cast<uint32_t>(n) / static_cast<uint32_t>(K);
    const math::CorrelatedComponent<scalar_t> x{means + n * D, factor + n * D * Q, diag ? diag + n * D : nullptr, D, Q};
    const math::CorrelatedGrads<acc_t> gr{grad_means + n * D, grad_factor + n * D * Q,
                                          diag ? grad_diag + n * D : nullptr};
    math::correlated_family_penalty<kFamily, acc_t, true>(x, p, b, n - b * K, grad[n], gr);
  }
}

// The kernel template of a family: launch(std::integral_constant<int, kFamily>{}).
template <typename Launch>
void for_family(int64_t family, Launch&& launch) {
  switch (family) {
    case math::kPolynomial: launch(std::integral_constant<int, math::kPolynomial>{}); break;
    case math::kLinear: launch(std::integral_constant<int, math::kLinear>{}); break;
    default: launch(std::integral_constant<int, math::kStencil>{});  // (op_impl.h checked the family)
  }
}

// ----- launchers (contiguous inputs, outputs allocated by the caller; max_blocks caps the grid) --------------------
void launch_tril_forward(const Tensor& logits, const Tensor& means, const Tensor& scale_tril, const Tensor& target,
                         Tensor& loss, Tensor& z, Tensor& r, int64_t max_blocks) {
  const int64_t B = means.size(0);
  if (B == 0) return;
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_tril", [&] {
    using acc_t = acc_type<scalar_t>;
    PHYSMDN_LAUNCH(correlated_blocks(B, max_blocks), kCorrelatedThreads, 0, tril_nll_kernel<scalar_t, acc_t>)(
        logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), scale_tril.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(), B, static_cast<int>(means.size(1)), static_cast<int>(means.size(2)),
        loss.mutable_data_ptr<scalar_t>(), z.mutable_data_ptr<acc_t>(), r.mutable_data_ptr<acc_t>());
    PHYSMDN_LAUNCH_CHECK();
  });
}

// grad_loss in the accumulation dtype, any stride
void launch_tril_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril, const Tensor& z,
                          const Tensor& r, Tensor& grad_logits, Tensor& grad_means, Tensor& grad_tril,
                          Tensor& grad_target, int64_t max_blocks) {
  const int64_t B = z.size(0);
  if (B == 0) return;
  PHYSMDN_DISPATCH_FLOATING(scale_tril.scalar_type(), "physmdn_mixture_nll_tril_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    PHYSMDN_LAUNCH(correlated_blocks(B, max_blocks), kCorrelatedThreads, 0,
                   tril_nll_backward_kernel<scalar_t, acc_t>)(
        grad_loss.const_data_ptr<acc_t>(), grad_loss.stride(0), logits.const_data_ptr<scalar_t>(),
        scale_tril.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(), B,
        static_cast<int>(z.size(1)), static_cast<int>(z.size(2)), grad_logits.mutable_data_ptr<scalar_t>(),
        grad_means.mutable_data_ptr<scalar_t>(), grad_tril.mutable_data_ptr<scalar_t>(),
        grad_target.mutable_data_ptr<scalar_t>());
    PHYSMDN_LAUNCH_CHECK();
  });
}

void launch_lowrank_forward(const Tensor& logits, const Tensor& means, const Tensor& cov_factor,
                            const Tensor& cov_diag, const Tensor& target, Tensor& loss, Tensor& v, Tensor& r,
                            Tensor& chol, int64_t max_blocks) {
  const int64_t B = means.size(0);
  if (B == 0) return;
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_lowrank", [&] {
    using acc_t = acc_type<scalar_t>;
    PHYSMDN_LAUNCH(correlated_blocks(B, max_blocks), kCorrelatedThreads, 0, lowrank_nll_kernel<scalar_t, acc_t>)(
        logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), cov_factor.const_data_ptr<scalar_t>(),
        cov_diag.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), B, static_cast<int>(means.size(1)),
        static_cast<int>(means.size(2)), static_cast<int>(cov_factor.size(3)), loss.mutable_data_ptr<scalar_t>(),
        v.mutable_data_ptr<acc_t>(), r.mutable_data_ptr<acc_t>(), chol.mutable_data_ptr<acc_t>());
    PHYSMDN_LAUNCH_CHECK();
  });
}

// grad_loss in the accumulation dtype, any stride
void launch_lowrank_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor,
                             const Tensor& cov_diag, const Tensor& v, const Tensor& r, const Tensor& chol,
                             Tensor& grad_logits, Tensor& grad_means, Tensor& grad_factor, Tensor& grad_diag,
                             Tensor& grad_target, int64_t max_blocks) {
  const int64_t B = v.size(0);
  if (B == 0) return;
  PHYSMDN_DISPATCH_FLOATING(cov_factor.scalar_type(), "physmdn_mixture_nll_lowrank_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    PHYSMDN_LAUNCH(correlated_blocks(B, max_blocks), kCorrelatedThreads, 0,
                   lowrank_nll_backward_kernel<scalar_t, acc_t>)(
        grad_loss.const_data_ptr<acc_t>(), grad_loss.stride(0), logits.const_data_ptr<scalar_t>(),
        cov_factor.const_data_ptr<scalar_t>(), cov_diag.const_data_ptr<scalar_t>(), v.const_data_ptr<acc_t>(),
        r.const_data_ptr<acc_t>(), chol.const_data_ptr<acc_t>(), B, static_cast<int>(v.size(1)),
        static_cast<int>(v.size(2)), static_cast<int>(cov_factor.size(3)), grad_logits.mutable_data_ptr<scalar_t>(),
        grad_means.mutable_data_ptr<scalar_t>(), grad_factor.mutable_data_ptr<scalar_t>(),
        grad_diag.mutable_data_ptr<scalar_t>(), grad_target.mutable_data_ptr<scalar_t>());
    PHYSMDN_LAUNCH_CHECK();
  });
}

void check_penalty_pairs(int64_t N) {
  PHYSMDN_CHECK(N < (int64_t(1) << 31), "correlated_penalty on CUDA takes B * K < 2^31 (sample, component) pairs, got ",
                N);
}

void launch_correlated_penalty_forward(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,
                                       const Tensor& p0, const Tensor& p1, const PhysicsArgs& args, int order,
                                       int64_t rows, Tensor& out, int64_t max_blocks) {
  const int64_t B = means.size(0), K = means.size(1), N = B * K;
  if (N == 0) return;
  check_penalty_pairs(N);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_correlated_penalty", [&] {
    using acc_t = acc_type<scalar_t>;
    for_family(args.family, [&](auto family) {
      PHYSMDN_LAUNCH(correlated_blocks(N, max_blocks), kCorrelatedThreads, 0,
                     correlated_penalty_kernel<decltype(family)::value, scalar_t, acc_t>)(
          means.const_data_ptr<scalar_t>(), factor.const_data_ptr<scalar_t>(),
          diag.has_value() ? diag->const_data_ptr<scalar_t>() : nullptr,
          make_physics_view<scalar_t>(p0, p1, std::nullopt, args, order, rows), N, K, means.size(2), factor.size(3),
          out.mutable_data_ptr<scalar_t>());
      PHYSMDN_LAUNCH_CHECK();
    });
  });
}

// grad [B, K] contiguous in the accumulation dtype; the gradients in the accumulation dtype
void launch_correlated_penalty_backward(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                        const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,
                                        const PhysicsArgs& args, int order, int64_t rows, Tensor& grad_means,
                                        Tensor& grad_factor, Tensor& grad_diag, int64_t max_blocks) {
  const int64_t B = means.size(0), K = means.size(1), N = B * K;
  if (N == 0) return;
  check_penalty_pairs(N);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_correlated_penalty_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    for_family(args.family, [&](auto family) {
      PHYSMDN_LAUNCH(correlated_blocks(N, max_blocks), kCorrelatedThreads, 0,
                     correlated_penalty_backward_kernel<decltype(family)::value, scalar_t, acc_t>)(
          grad.const_data_ptr<acc_t>(), means.const_data_ptr<scalar_t>(), factor.const_data_ptr<scalar_t>(),
          diag.has_value() ? diag->const_data_ptr<scalar_t>() : nullptr,
          make_physics_view<scalar_t>(p0, p1, std::nullopt, args, order, rows), N, K, means.size(2), factor.size(3),
          grad_means.mutable_data_ptr<acc_t>(), grad_factor.mutable_data_ptr<acc_t>(),
          diag.has_value() ? grad_diag.mutable_data_ptr<acc_t>() : nullptr);
      PHYSMDN_LAUNCH_CHECK();
    });
  });
}

int64_t correlated_max_blocks(const Device& device) {
  return static_cast<int64_t>(multiprocessor_count(device.index())) * kCorrelatedBlocksPerSM;
}

// ----- the ops (schemas in csrc/ops.cpp) ----------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> cuda_mixture_nll_tril(const Tensor& logits, const Tensor& means,
                                                         const Tensor& scale_tril, const Tensor& target) {
  check_tril_inputs(logits, means, scale_tril, target);
  PHYSMDN_CHECK(PHYSMDN_ON_DEVICE(means), "means must be a CUDA tensor for the CUDA kernel, got ", means.device());
  PHYSMDN_DEVICE_GUARD(means.device());
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  const auto dt = means.scalar_type(), acc = acc_dtype(dt);
  const Device device = means.device();
  auto loss = empty({B}, dt, device), z = empty({B, K, D}, acc, device), r = empty({B, K}, acc, device);
  launch_tril_forward(as_contiguous(logits), as_contiguous(means), as_contiguous(scale_tril), as_contiguous(target),
                      loss, z, r, correlated_max_blocks(device));
  return {loss, z, r};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_mixture_nll_tril_backward(const Tensor& grad_loss,
                                                                          const Tensor& logits,
                                                                          const Tensor& scale_tril, const Tensor& z,
                                                                          const Tensor& responsibilities) {
  check_tril_backward_inputs(grad_loss, logits, scale_tril, z, responsibilities);
  PHYSMDN_CHECK(PHYSMDN_ON_DEVICE(scale_tril), "scale_tril must be a CUDA tensor for the CUDA kernel, got ",
                scale_tril.device());
  PHYSMDN_DEVICE_GUARD(scale_tril.device());
  const auto B = z.size(0), K = z.size(1), D = z.size(2);
  const auto dt = scale_tril.scalar_type(), acc = acc_dtype(dt);
  const Device device = scale_tril.device();
  auto gl = empty({B, K}, dt, device), gm = empty({B, K, D}, dt, device), gL = empty({B, K, D, D}, dt, device),
       gy = empty({B, D}, dt, device);
  launch_tril_backward(to_dtype(grad_loss, acc), as_contiguous(logits), as_contiguous(scale_tril), as_contiguous(z),
                       as_contiguous(responsibilities), gl, gm, gL, gy, correlated_max_blocks(device));
  return {gl, gm, gL, gy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_mixture_nll_lowrank(const Tensor& logits, const Tensor& means,
                                                                    const Tensor& cov_factor, const Tensor& cov_diag,
                                                                    const Tensor& target) {
  check_lowrank_inputs(logits, means, cov_factor, cov_diag, target);
  PHYSMDN_CHECK(PHYSMDN_ON_DEVICE(means), "means must be a CUDA tensor for the CUDA kernel, got ", means.device());
  PHYSMDN_DEVICE_GUARD(means.device());
  const auto B = means.size(0), K = means.size(1), D = means.size(2), R = cov_factor.size(3);
  const auto dt = means.scalar_type(), acc = acc_dtype(dt);
  const Device device = means.device();
  auto loss = empty({B}, dt, device), v = empty({B, K, D}, acc, device), r = empty({B, K}, acc, device),
       chol = empty({B, K, R, R}, acc, device);
  launch_lowrank_forward(as_contiguous(logits), as_contiguous(means), as_contiguous(cov_factor),
                         as_contiguous(cov_diag), as_contiguous(target), loss, v, r, chol,
                         correlated_max_blocks(device));
  return {loss, v, r, chol};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_mixture_nll_lowrank_backward(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor, const Tensor& cov_diag, const Tensor& v,
    const Tensor& responsibilities, const Tensor& chol) {
  check_lowrank_backward_inputs(grad_loss, logits, cov_factor, cov_diag, v, responsibilities, chol);
  PHYSMDN_CHECK(PHYSMDN_ON_DEVICE(cov_factor), "cov_factor must be a CUDA tensor for the CUDA kernel, got ",
                cov_factor.device());
  PHYSMDN_DEVICE_GUARD(cov_factor.device());
  const auto B = v.size(0), K = v.size(1), D = v.size(2), R = cov_factor.size(3);
  const auto dt = cov_factor.scalar_type(), acc = acc_dtype(dt);
  const Device device = cov_factor.device();
  auto gl = empty({B, K}, dt, device), gm = empty({B, K, D}, dt, device), gW = empty({B, K, D, R}, dt, device),
       gd = empty({B, K, D}, dt, device), gy = empty({B, D}, dt, device);
  launch_lowrank_backward(to_dtype(grad_loss, acc), as_contiguous(logits), as_contiguous(cov_factor),
                          as_contiguous(cov_diag), as_contiguous(v), as_contiguous(responsibilities),
                          as_contiguous(chol), gl, gm, gW, gd, gy, correlated_max_blocks(device));
  return {gl, gm, gW, gd, gy};
}

void CudaBackend::correlated_penalty_forward(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,
                                             const Tensor& p0, const Tensor& p1, const PhysicsArgs& args, int order,
                                             int64_t rows, Tensor& out) {
  PHYSMDN_DEVICE_GUARD(means.device());
  launch_correlated_penalty_forward(means, factor, diag, p0, p1, args, order, rows, out,
                                    correlated_max_blocks(means.device()));
}

void CudaBackend::correlated_penalty_backward(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                              const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,
                                              const PhysicsArgs& args, int order, int64_t rows, Tensor& grad_means,
                                              Tensor& grad_factor, Tensor& grad_diag) {
  PHYSMDN_DEVICE_GUARD(means.device());
  launch_correlated_penalty_backward(grad, means, factor, diag, p0, p1, args, order, rows, grad_means, grad_factor,
                                     grad_diag, correlated_max_blocks(means.device()));
}

}  // namespace
}  // namespace physmdn
