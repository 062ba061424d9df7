// The CUDA backend: the launchers, the schedule chosen from K and K * D, and CudaBackend (the op_impl.h backend the
// CUDA ops run through; kernels.cu registers it). For the mixture NLL with contiguous inputs and fewer than 16
// components, a tiled thread per sample (coalesced vector loads through shared memory, one pass for loss and
// gradients) while a sample fits in shared memory; a warp per sample from 16 components on; otherwise (strided
// inputs, the fused physics loss) a plain thread per sample reading its parameters in place. With
// physmdn._C.set_cuda_lanes_schedule(True), the lane-per-element kernel first where it applies (compiled only with the
// CMake option PHYSMDN_CUDA_LANES, which defines PHYSMDN_WITH_CUDA_LANES). Accumulation in
// float32 (float64 for double inputs). The kernels themselves are in device_kernels.cuh.
//
// A header so that the same code also runs on the CPU under the simulator of tests/cuda/cuda_sim/host_sim.h
// (tests/cuda/test_cuda_sim.py). The includer provides, before including it:
//   PHYSMDN_LAUNCH(grid, block, shared_bytes, kernel)(args...)  launches kernel on the current stream
//   PHYSMDN_LAUNCH_CHECK()                                      checks the last launch
//   PHYSMDN_DEVICE_GUARD(device)                                a statement: makes device current for the scope
//   PHYSMDN_ON_DEVICE(tensor)                                   whether the tensor lives on the device
//   int physmdn::multiprocessor_count(int device_index)
#pragma once
#if !defined(PHYSMDN_LAUNCH) || !defined(PHYSMDN_LAUNCH_CHECK) || !defined(PHYSMDN_DEVICE_GUARD) || \
    !defined(PHYSMDN_ON_DEVICE)
#error "csrc/cuda/backend.cuh: define the launch hooks first (see its header comment)"
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda/device_kernels.cuh"
#include "mixture_math.h"
#include "op_impl.h"
#include "physics_math.h"
#include "views.h"

namespace physmdn {
namespace {

// Whether each sample's row of t (its dimensions after the batch one) is contiguous, at any batch stride: contiguous
// tensors, row-strided views (a torch.split of one head's output), a row broadcast over the batch (stride 0).
bool rows_contiguous(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The batch strides the tiled kernels read their inputs at.
RowStrides row_strides(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                       const Tensor& target) {
  return {logits.stride(0), means.stride(0), log_scales.stride(0), target.stride(0)};
}

// Whether some input's batch stride is not its row size: the kernels' kStrided instantiation.
bool strided(const RowStrides& sb, int64_t K, int64_t D) {
  return sb.logits != K || sb.means != K * D || sb.log_scales != K * D || sb.target != D;
}

bool tiled_inputs(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                  const Tensor& target) {
  return means.size(1) < kWarpMinComponentsTiled && rows_contiguous(logits) && rows_contiguous(means) &&
         rows_contiguous(log_scales) && rows_contiguous(target) && means.numel() < (int64_t(1) << 31);
}

// Whether the tiled kernels run for these inputs: per-sample rows contiguous, K < kWarpMinComponentsTiled, and a
// sample fits in shared memory (separate_grads: the fused loss with gradients, see tile_bytes_per_sample).
bool tiled_applies(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                   const Tensor& target, bool separate_grads) {
  if (!tiled_inputs(logits, means, log_scales, target)) return false;
  const int64_t K = means.size(1), D = means.size(2);
  return means.scalar_type() == kDouble ? tile_threads<double>(K, D, separate_grads) > 0
                                            : tile_threads<float>(K, D, separate_grads) > 0;
}

// f(std::type_identity<grad_t>{}) with grad_t the input dtype when the gradient outputs have it (gm), else the
// accumulation dtype: for the kernels that can write reduced-precision gradients directly.
template <typename scalar_t, typename F>
void with_grad_type(const Tensor* gm, F&& f) {
  using acc_t = acc_type<scalar_t>;
  if (std::is_same<acc_t, scalar_t>::value ||
      (gm != nullptr && gm->scalar_type() == scalar_type_of<scalar_t>()))
    f(std::type_identity<scalar_t>{});
  else
    f(std::type_identity<acc_t>{});
}

// f(grad_tag, strided_tag) for the tiled kernels: the gradients' type as with_grad_type, and std::true_type /
// std::false_type for their kStrided instantiation.
template <typename scalar_t, typename F>
void with_tiled_types(const Tensor* gm, bool is_strided, F&& f) {
  with_grad_type<scalar_t>(gm, [&](auto grad_tag) {
    if (is_strided)
      f(grad_tag, std::true_type{});
    else
      f(grad_tag, std::false_type{});
  });
}

// Launches the tiled kernel; false when it does not apply (tiled_applies; the caller falls back). The gradients
// in the input dtype when gm has it (mixture_grads_in_input_dtype: no float32 [B, K, D] copies for bfloat16 /
// float16 inputs), else in the accumulation dtype.
template <bool kGrad>
bool launch_tiled(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                  const Tensor& target, const Tensor* grad_loss, double g_default, Tensor* loss,
                  Tensor* saved, Tensor* gl, Tensor* gm, Tensor* gs, Tensor* gt) {
  if (!tiled_applies(logits, means, log_scales, target, false)) return false;
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_tiled_nll", [&] {
    using acc_t = acc_type<scalar_t>;
    const int threads = tile_threads<acc_t>(K, D);
    const auto blocks = static_cast<unsigned int>((B + threads - 1) / threads);
    const size_t smem = static_cast<size_t>(threads) * tile_bytes_per_sample<acc_t>(K, D);
    const RowStrides sb = row_strides(logits, means, log_scales, target);
    const auto launch = [&](auto grad_tag, auto strided_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      PHYSMDN_LAUNCH(blocks, threads, smem, tiled_nll_kernel<scalar_t, acc_t, grad_t, kGrad, strided_tag()>)(
          logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), log_scales.const_data_ptr<scalar_t>(),
          target.const_data_ptr<scalar_t>(), sb, B, static_cast<int>(K), static_cast<int>(D),
          grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr, grad_loss ? grad_loss->stride(0) : 0,
          static_cast<acc_t>(g_default), loss ? loss->mutable_data_ptr<scalar_t>() : nullptr,
          saved ? saved->mutable_data_ptr<acc_t>() : nullptr, gl ? gl->mutable_data_ptr<grad_t>() : nullptr,
          gm ? gm->mutable_data_ptr<grad_t>() : nullptr, gs ? gs->mutable_data_ptr<grad_t>() : nullptr,
          gt ? gt->mutable_data_ptr<grad_t>() : nullptr);
      PHYSMDN_LAUNCH_CHECK();
    };
    with_tiled_types<scalar_t>(gm, strided(sb, K, D), launch);
  });
  return true;
}

// Launches the fused loss's tiled kernel (contiguous inputs, K < kWarpMinComponentsTiled); false when it does not
// apply or a sample does not fit in shared memory (the caller takes the per-sample kernels). The gradients of
// logits, means, log-scales, target and extra in the input dtype when gm has it (loss_grads_in_input_dtype), else in
// the accumulation dtype; the parameters' gradients in the accumulation dtype.
template <bool kGrad, typename scalar_t>
bool launch_tiled_loss(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                       const Tensor& target, const math::PhysicsView<scalar_t>& p, const Tensor* grad_loss,
                       double g_default, Tensor* loss, Tensor* saved, Tensor* gl, Tensor* gm,
                       Tensor* gs, Tensor* gt, Tensor* gp0, Tensor* gp1, Tensor* ge, int64_t n0,
                       int64_t n1) {
  using acc_t = acc_type<scalar_t>;
  if (!tiled_applies(logits, means, log_scales, target, kGrad)) return false;
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  const int threads = tile_threads<acc_t>(K, D, kGrad);
  const auto blocks = static_cast<unsigned int>((B + threads - 1) / threads);
  const size_t smem = static_cast<size_t>(threads) * tile_bytes_per_sample<acc_t>(K, D, kGrad);
  const RowStrides sb = row_strides(logits, means, log_scales, target);
  const auto launch = [&](auto grad_tag, auto strided_tag) {
    using grad_t = typename decltype(grad_tag)::type;
    const auto out = [](Tensor* t) { return t != nullptr && t->numel() ? t->mutable_data_ptr<grad_t>() : nullptr; };
    const auto acc = [](Tensor* t) { return t != nullptr && t->numel() ? t->mutable_data_ptr<acc_t>() : nullptr; };
    PHYSMDN_LAUNCH(blocks, threads, smem, tiled_loss_kernel<scalar_t, acc_t, grad_t, kGrad, strided_tag()>)(
        logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), log_scales.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(), sb, p, B, static_cast<int>(K), static_cast<int>(D),
        grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr, grad_loss ? grad_loss->stride(0) : 0,
        static_cast<acc_t>(g_default), loss ? loss->mutable_data_ptr<scalar_t>() : nullptr, acc(saved), out(gl), out(gm),
        out(gs), out(gt), acc(gp0), acc(gp1), out(ge), n0, n1);
    PHYSMDN_LAUNCH_CHECK();
  };
  with_tiled_types<scalar_t>(gm, strided(sb, K, D), launch);
  return true;
}

#ifdef PHYSMDN_WITH_CUDA_LANES
bool lanes_inputs(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                  const Tensor& target) {
  const int64_t K = means.size(1), D = means.size(2);
  return cuda_lanes_schedule_enabled().load(std::memory_order_relaxed) && D <= 32 &&
         K * pow2_at_least(D) <= kLanesMaxElements && logits.is_contiguous() && means.is_contiguous() &&
         log_scales.is_contiguous() && target.is_contiguous() && means.numel() < (int64_t(1) << 31);
}

template <bool kGrad, typename scalar_t, typename acc_t, typename grad_t>
void launch_lanes_typed(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                        const Tensor& target, const Tensor* grad_loss, double g_default, Tensor* loss,
                        Tensor* saved, Tensor* gl, Tensor* gm, Tensor* gs, Tensor* gt, int64_t B,
                        int64_t K, int64_t D) {
  const LanesLaunch c = lanes_launch(B, K, D);
  const auto kernel = lanes_kernel_for<kGrad, scalar_t, acc_t, grad_t>(c.J);
  PHYSMDN_LAUNCH(static_cast<unsigned int>(c.blocks), kLanesThreads, 0, kernel)(
      logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), log_scales.const_data_ptr<scalar_t>(),
      target.const_data_ptr<scalar_t>(), B, static_cast<int>(K), static_cast<int>(D), c.log2_Dp, c.log2_G,
      grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr, grad_loss ? grad_loss->stride(0) : 0,
      static_cast<acc_t>(g_default), loss ? loss->mutable_data_ptr<scalar_t>() : nullptr,
      saved ? saved->mutable_data_ptr<acc_t>() : nullptr, gl ? gl->mutable_data_ptr<grad_t>() : nullptr,
      gm ? gm->mutable_data_ptr<grad_t>() : nullptr, gs ? gs->mutable_data_ptr<grad_t>() : nullptr,
      gt ? gt->mutable_data_ptr<grad_t>() : nullptr);
  PHYSMDN_LAUNCH_CHECK();
}

// Launches the lane-per-element kernel; false when it does not apply (the caller takes another schedule).
template <bool kGrad>
bool launch_lanes(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                  const Tensor& target, const Tensor* grad_loss, double g_default, Tensor* loss,
                  Tensor* saved, Tensor* gl, Tensor* gm, Tensor* gs, Tensor* gt) {
  if (!lanes_inputs(logits, means, log_scales, target)) return false;
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  if (B == 0) return true;
  // the gradients in the input dtype (mixture_grads_in_input_dtype: no float32 [B, K, D] copies for bfloat16 /
  // float16 inputs) or in the accumulation dtype
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_lanes_nll", [&] {
    using acc_t = acc_type<scalar_t>;
    with_grad_type<scalar_t>(gm, [&](auto grad_tag) {
      launch_lanes_typed<kGrad, scalar_t, acc_t, typename decltype(grad_tag)::type>(
          logits, means, log_scales, target, grad_loss, g_default, loss, saved, gl, gm, gs, gt, B, K, D);
    });
  });
  return true;
}
#else
// The build lacks the lane-per-element schedule (CMake option PHYSMDN_CUDA_LANES=OFF): it never applies.
bool lanes_inputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&) { return false; }
template <bool kGrad, typename... Args>
bool launch_lanes(const Args&...) {
  return false;
}
#endif  // PHYSMDN_WITH_CUDA_LANES


void cuda_scale_by_(std::vector<Tensor> tensors, const Tensor& upstream, double scale) {
  check_scale_by_args(tensors, upstream);
  if (!PHYSMDN_ON_DEVICE(upstream)) return scale_by_on_host(tensors, upstream, scale);  // a host value: no sync
  PHYSMDN_DEVICE_GUARD(upstream.device());
  // upstream as a double on the device (exact); scale_factor_kernel compares it with scale in upstream's dtype
  const auto u = to_dtype(upstream, kDouble);
  const double scale_in_upstream_dtype = rounded(scale, upstream.scalar_type());
  // the factor for tensors of scalar_t on the device, a [1] tensor in the accumulation dtype
  const auto factor_for = [&](ScalarType dtype) {
    return PHYSMDN_DISPATCH_FLOATING(dtype, "physmdn_scale_by_", [&] {
      using acc_t = acc_type<scalar_t>;
      // (stream-ordered: freeing the factor after the launches that read it is safe)
      auto f = empty({1}, scalar_type_of<acc_t>(), upstream.device());
      PHYSMDN_LAUNCH(1, 1, 0, scale_factor_kernel<scalar_t, acc_t>)(u.const_data_ptr<double>(), scale_in_upstream_dtype,
                                                                    scale, f.mutable_data_ptr<acc_t>());
      PHYSMDN_LAUNCH_CHECK();
      return f;
    });
  };
  // batches of up to kMaxScaleTensors contiguous tensors of one dtype, one launch each (blockIdx.y: the tensor); other
  // layouts are multiplied by torch (the same values)
  std::vector<Tensor> pending;
  for (auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    if (t.is_contiguous()) {
      pending.push_back(t);
    } else {
      mul_in_place(t, factor_for(t.scalar_type()));
    }
  }
  const int sms = multiprocessor_count(upstream.device().index());
  while (!pending.empty()) {
    const auto dtype = pending.front().scalar_type();
    ScaleTargets targets{};
    int count = 0;
    int64_t most = 0;
    std::vector<Tensor> rest;
    for (auto& t : pending) {
      if (t.scalar_type() == dtype && count < kMaxScaleTensors) {
        targets.data[count] = t.mutable_data_ptr();
        targets.numel[count] = t.numel();
        most = std::max(most, t.numel());
        ++count;
      } else {
        rest.push_back(t);
      }
    }
    const auto f = factor_for(dtype);
    PHYSMDN_DISPATCH_FLOATING(dtype, "physmdn_scale_by_", [&] {
      using acc_t = acc_type<scalar_t>;
      const int64_t blocks = std::min<int64_t>((most + 255) / 256, 8 * static_cast<int64_t>(sms));
      const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(count));
      PHYSMDN_LAUNCH(grid, 256, 0, scale_by_kernel<scalar_t, acc_t>)(targets, f.const_data_ptr<acc_t>());
      PHYSMDN_LAUNCH_CHECK();
    });
    pending = std::move(rest);
  }
}

// The per-sample kernels (any strides, any K; the fused loss always): warp per sample from kWarpMinComponents
// components on, else thread per sample. Null outputs are not written; grad_loss null: every sample's upstream
// gradient is g_default. The gradients in acc_t.
template <typename scalar_t, bool kPhysics, bool kGrad>
void launch_per_sample(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                       const Tensor& target, const math::PhysicsView<scalar_t>& p, const Tensor* grad_loss,
                       double g_default, Tensor* loss, Tensor* saved, Tensor* gl, Tensor* gm,
                       Tensor* gs, Tensor* gt, Tensor* gp0, Tensor* gp1, Tensor* ge, int64_t n0,
                       int64_t n1) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = means.size(0);
  const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
  const auto out = [](Tensor* t) { return t != nullptr && t->numel() ? t->mutable_data_ptr<acc_t>() : nullptr; };
  for (Tensor* t : {gl, gm, gs, gt, gp0, gp1, ge})
    PHYSMDN_CHECK(t == nullptr || t->numel() == 0 || t->scalar_type() == scalar_type_of<acc_t>(),
                  "internal: a per-sample kernel's gradient output must be in the accumulation dtype");
  const scalar_t* g = grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad_loss ? grad_loss->stride(0) : 0;
  scalar_t* loss_ptr = loss ? loss->mutable_data_ptr<scalar_t>() : nullptr;
  if (v.K >= kWarpMinComponents) {
    PHYSMDN_LAUNCH(warp_blocks_for(B), 32 * kWarpsPerBlock, 0, warp_kernel<scalar_t, acc_t, kPhysics, kGrad>)(
        v, p, B, g, g_stride, static_cast<acc_t>(g_default), loss_ptr, out(saved), out(gl), out(gm), out(gs), out(gt),
        out(gp0), out(gp1), out(ge), n0, n1);
  } else {
    PHYSMDN_LAUNCH(blocks_for(B), kThreads, 0, sample_kernel<scalar_t, acc_t, kPhysics, kGrad>)(
        v, p, B, g, g_stride, static_cast<acc_t>(g_default), loss_ptr, out(saved), out(gl), out(gm), out(gs), out(gt),
        out(gp0), out(gp1), out(ge), n0, n1);
  }
  PHYSMDN_LAUNCH_CHECK();
}

// The op_impl.h backend of the CUDA build. Every mode runs one kernel: the forward, the forward with gradients and
// the backward (which recomputes the per-sample forward instead of reading the saved state: the backward of a
// retained graph then runs the same kernel as the forward with gradients and gives the same bits).
struct CudaBackend {
  static void check_device(const Tensor& means) {
    PHYSMDN_CHECK(PHYSMDN_ON_DEVICE(means), "means must be a CUDA tensor for the CUDA kernel, got ", means.device());
  }

  static Tensor empty(IntArrayRef sizes, const Spec& spec) { return physmdn::empty(sizes, spec.dtype, spec.device); }
  // the physics penalty of correlated components: defined in csrc/cuda/correlated.cuh
  static void correlated_penalty_forward(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,
                                         const Tensor& p0, const Tensor& p1, const PhysicsArgs& args, int order,
                                         int64_t rows, Tensor& out);
  static void correlated_penalty_backward(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                          const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,
                                          const PhysicsArgs& args, int order, int64_t rows, Tensor& grad_means,
                                          Tensor& grad_factor, Tensor& grad_diag);
  // the fused loss's forward with gradients: the tiled kernel writes the input dtype directly; the per-sample kernels
  // float32 (converted on return)
  static bool loss_grads_in_input_dtype(const Tensor& logits, const Tensor& means,
                                        const Tensor& log_scales, const Tensor& target) {
    return tiled_applies(logits, means, log_scales, target, true);
  }
  // the mixture NLL's lane-per-element and tiled kernels write the input dtype directly (forward and backward op);
  // the per-sample kernels float32 (converted on return)
  static bool mixture_grads_in_input_dtype(bool, const Tensor& logits, const Tensor& means,
                                           const Tensor& log_scales, const Tensor& target) {
    return lanes_inputs(logits, means, log_scales, target) || tiled_applies(logits, means, log_scales, target, false);
  }

  static void mixture_nll_forward(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                  const Tensor& target, Tensor& loss, Tensor& saved) {
    PHYSMDN_DEVICE_GUARD(means.device());
    if (launch_lanes<false>(logits, means, log_scales, target, nullptr, 1.0, &loss, &saved, nullptr, nullptr, nullptr,
                            nullptr) ||
        launch_tiled<false>(logits, means, log_scales, target, nullptr, 1.0, &loss, &saved, nullptr, nullptr, nullptr,
                            nullptr))
      return;
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_fwd", [&] {
      launch_per_sample<scalar_t, false, false>(logits, means, log_scales, target, {}, nullptr, 1.0, &loss, &saved,
                                                nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0);
    });
  }

  // Loss and gradients in one launch: the lane-per-element or the tiled kernel where they apply, else the per-sample
  // kernels.
  static bool mixture_nll_forward_grad(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                       const Tensor& target, Tensor& loss, Tensor& saved, Tensor& gl,
                                       Tensor& gm, Tensor& gs, Tensor& gt, double grad_scale) {
    PHYSMDN_DEVICE_GUARD(means.device());
    if (launch_lanes<true>(logits, means, log_scales, target, nullptr, grad_scale, &loss, &saved, &gl, &gm, &gs, &gt) ||
        launch_tiled<true>(logits, means, log_scales, target, nullptr, grad_scale, &loss, &saved, &gl, &gm, &gs, &gt))
      return true;
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_fwd_grad", [&] {
      launch_per_sample<scalar_t, false, true>(logits, means, log_scales, target, {}, nullptr, grad_scale, &loss,
                                               &saved, &gl, &gm, &gs, &gt, nullptr, nullptr, nullptr, 0, 0);
    });
    return true;
  }

  // (the saved state is not read: every schedule recomputes the per-sample forward)
  static void mixture_nll_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                                   const Tensor& log_scales, const Tensor& target, const Tensor&,
                                   Tensor& gl, Tensor& gm, Tensor& gs, Tensor& gt) {
    PHYSMDN_DEVICE_GUARD(means.device());
    if (launch_lanes<true>(logits, means, log_scales, target, &grad_loss, 1.0, nullptr, nullptr, &gl, &gm, &gs, &gt) ||
        launch_tiled<true>(logits, means, log_scales, target, &grad_loss, 1.0, nullptr, nullptr, &gl, &gm, &gs, &gt))
      return;
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_bwd", [&] {
      launch_per_sample<scalar_t, false, true>(logits, means, log_scales, target, {}, &grad_loss, 1.0, nullptr,
                                               nullptr, &gl, &gm, &gs, &gt, nullptr, nullptr, nullptr, 0, 0);
    });
  }

  static void mdn_loss_forward(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                               const Tensor& target, const Tensor& p0, const Tensor& p1,
                               const OptionalTensor& extra, const PhysicsArgs& args, int order,
                               int64_t rows, Tensor& loss, Tensor& saved) {
    PHYSMDN_DEVICE_GUARD(means.device());
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mdn_loss_fwd", [&] {
      const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
      if (!launch_tiled_loss<false, scalar_t>(logits, means, log_scales, target, p, nullptr, 1.0, &loss, &saved,
                                              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0))
        launch_per_sample<scalar_t, true, false>(logits, means, log_scales, target, p, nullptr, 1.0, &loss, &saved,
                                                 nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0);
    });
  }

  // Loss and gradients in one launch (no parameter gradients: op_impl asks the backward for those).
  static bool mdn_loss_forward_grad(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                    const Tensor& target, const Tensor& p0, const Tensor& p1,
                                    const OptionalTensor& extra, const PhysicsArgs& args, int order,
                                    int64_t rows, Tensor& loss, Tensor& saved, Tensor& gl, Tensor& gm,
                                    Tensor& gs, Tensor& gt, Tensor& ge, double grad_scale) {
    PHYSMDN_DEVICE_GUARD(means.device());
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mdn_loss_fwd_grad", [&] {
      const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
      if (!launch_tiled_loss<true, scalar_t>(logits, means, log_scales, target, p, nullptr, grad_scale, &loss, &saved,
                                             &gl, &gm, &gs, &gt, nullptr, nullptr, &ge, 0, 0))
        launch_per_sample<scalar_t, true, true>(logits, means, log_scales, target, p, nullptr, grad_scale, &loss,
                                                &saved, &gl, &gm, &gs, &gt, nullptr, nullptr, &ge, 0, 0);
    });
    return true;
  }

  // (the saved state is not read: the kernels recompute the per-sample forward)
  static void mdn_loss_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                                const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                                const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                                int order, int64_t rows, const Tensor&, Tensor& gl, Tensor& gm,
                                Tensor& gs, Tensor& gt, Tensor& gp0, Tensor& gp1, Tensor& ge) {
    PHYSMDN_DEVICE_GUARD(means.device());
    PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mdn_loss_bwd", [&] {
      const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
      int64_t n0 = 0, n1 = 0;
      math::param_row_sizes(p, means.size(2), &n0, &n1);
      if (!launch_tiled_loss<true, scalar_t>(logits, means, log_scales, target, p, &grad_loss, 1.0, nullptr, nullptr,
                                             &gl, &gm, &gs, &gt, &gp0, &gp1, &ge, n0, n1))
        launch_per_sample<scalar_t, true, true>(logits, means, log_scales, target, p, &grad_loss, 1.0, nullptr,
                                                nullptr, &gl, &gm, &gs, &gt, &gp0, &gp1, &ge, n0, n1);
    });
  }
};

}  // namespace

}  // namespace physmdn
