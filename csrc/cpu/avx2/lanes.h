// AVX2+FMA mixture NLL (forward, forward with gradients, backward) for float32 / bfloat16 / float16 inputs of any
// layout (rows contiguous per sample are read in place at any batch stride, other layouts gathered per group of 8
// samples), vectorized across samples: a group of 8 samples is transposed in registers (8x8 tiles) so that lane i
// holds sample i. Every per-element and per-component step then runs on full vectors with no
// horizontal reduction (the log-sum-exps over K are vertical max / exp / add), and the gradients are
// transposed back on the way out. Inputs are read once and the outputs written once per call.
//
// run() is the driver over the batch, group8 the work on one group (the row-wise path, rows.h, where it applies);
// the fused loss passes a physics policy (families.h), the mixture NLL NoPhysics. Included by the CPU drivers in
// their AVX2 build only. The math is mixture_math.h's: the same shift-by-max
// log-sum-exps (shift 0 for all -inf rows, NaN ignored by the max and propagated by the sums), gamma = 0 gives
// zero component gradients, gradients in float32.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/lanes.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cpu/avx2/group.h"
#include "cpu/avx2/rows.h"
#include "cpu/avx2/transpose.h"
#include "cpu/avx2/vec_math.h"
#include "mixture_math.h"

namespace physmdn::cpu::soa {

// One group of 8 samples; g: upstream gradient per lane.
// With an active Phys, the loss is the fused one: NLL + sum_k pi_k Q_k (saved[3] = sum_k pi_k Q_k).
template <bool kGrad, typename Phys, typename grad_t>
void group8(const GroupIn& in, __m256 g, Scratch& w, Phys& phys, const GroupOut<grad_t>& out) {
  if constexpr (!Phys::kActive && !Phys::kRowHook) {
    if (w.rows_path) {
      if (w.D == 8) return group8_rows<kGrad, 8>(in, g, w, out);
      if (w.D % 8 == 0) return group8_rows<kGrad, 0>(in, g, w, out);  // D / 8 vectors per component
      if (w.D == 4) return group8_rows<kGrad, 4>(in, g, w, out);
      if (w.D == 2) return group8_rows<kGrad, 2>(in, g, w, out);
      return group8_rows<kGrad, 1>(in, g, w, out);
    }
  }
  const int64_t K = w.K, D = w.D, KD = K * D;
  to_lanes(in.mu, KD, w.mu.data(), in.mu_rs);
  to_lanes(in.ls, KD, w.ls.data(), in.ls_rs);
  to_lanes(in.y, D, w.y.data(), in.y_rs);
  to_lanes(in.lg, K, w.lg.data(), in.lg_rs);
  const __m256 sign = _mm256_set1_ps(-0.0f), nhalf = _mm256_set1_ps(-0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 offset = _mm256_set1_ps(static_cast<float>(D) * static_cast<float>(math::kHalfLog2Pi));
  const __m256* const y = w.y.data();  // (as in mixture_lse: no reload after every store)
  // log N_k = sum_d (-z^2 / 2 - log_scale) - D log(2 pi) / 2 (and the physics terms, before the rows are reused)
  for (int64_t k = 0; k < K; ++k) {
    __m256 acc = zero;
    __m256 *mu = w.mu.data() + k * D, *ls = w.ls.data() + k * D;
    if constexpr (Phys::kActive) phys.begin_component(k);
    if constexpr (Phys::kRowHook) phys.template component_rows<kGrad>(k, mu, ls);
    // (the hot loops over a runtime D or K unrolled by 4: their control was ~10 % of the body's instructions)
#pragma GCC unroll 4
    for (int64_t d = 0; d < D; ++d) {
      const __m256 l = ls[d];
      if constexpr (Phys::kActive) phys.template element<kGrad>(k * D + d, mu[d], l);
      const __m256 inv = exp_neg8(l);
      const __m256 z = _mm256_mul_ps(_mm256_sub_ps(y[d], mu[d]), inv);
      const __m256 zz = _mm256_mul_ps(z, z);
      acc = _mm256_add_ps(acc, _mm256_fmsub_ps(nhalf, zz, l));  // one add per element on the chain
      if constexpr (kGrad) {
        mu[d] = _mm256_mul_ps(z, inv);
        ls[d] = zz;  // d/dlog_scale is (z^2 - 1) c_k: one fmsub below
      }
    }
    w.joint[k] = _mm256_sub_ps(acc, offset);
    if constexpr (Phys::kActive) w.qk[k] = phys.end_component(k);
  }
  const Lse st = mixture_lse(w);
  const __m256 lse = st.lse, inv_sum = st.inv_sum, sum2 = st.sum2;
  // mixture-weighted penalty: sum over components with mass (pi > 0: no 0 * inf)
  __m256 pbar = zero;
  if constexpr (Phys::kActive) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 pi = _mm256_mul_ps(w.pi[k], inv_sum);
      pbar = _mm256_add_ps(pbar, _mm256_and_ps(_mm256_cmp_ps(pi, zero, _CMP_GT_OQ), _mm256_mul_ps(pi, w.qk[k])));
    }
  }
  const __m256 loss = Phys::kActive ? _mm256_sub_ps(pbar, lse) : _mm256_xor_ps(lse, sign);
  store_loss_saved<Phys::kSaved>(out.loss, out.saved, loss, st, pbar);
  if constexpr (kGrad) {
    const __m256 inv_sum2 = _mm256_div_ps(one, sum2);
    // no responsibility, no gradient (gamma_k = 0 masks the component's terms: avoids 0 * inf for far-away
    // targets); groups where every lane's every gamma is positive skip the masks
    bool masked = false;
    for (int64_t k = 0; k < K; ++k) {
      w.joint[k] = _mm256_mul_ps(w.joint[k], inv_sum2);  // gamma_k
      const __m256 none = _mm256_cmp_ps(w.joint[k], zero, _CMP_EQ_OQ);
      masked |= !_mm256_testz_ps(none, none);
    }
    __m256* const gt = w.gt.data();
    for (int64_t d = 0; d < D; ++d) gt[d] = zero;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 pi = _mm256_mul_ps(w.pi[k], inv_sum), gamma = w.joint[k];
      w.gl[k] = _mm256_mul_ps(g, _mm256_sub_ps(pi, gamma));
      const __m256 c = _mm256_xor_ps(_mm256_mul_ps(g, gamma), sign);
      __m256 *gm = w.mu.data() + k * D, *gs = w.ls.data() + k * D;
      if (masked) {
        const __m256 none = _mm256_cmp_ps(gamma, zero, _CMP_EQ_OQ);
        for (int64_t d = 0; d < D; ++d) {
          const __m256 m = _mm256_andnot_ps(none, _mm256_mul_ps(gm[d], c));
          gm[d] = m;
          gs[d] = _mm256_andnot_ps(none, _mm256_fmsub_ps(gs[d], c, c));
          gt[d] = _mm256_sub_ps(gt[d], m);
        }
      } else {
#pragma GCC unroll 4
        for (int64_t d = 0; d < D; ++d) {
          const __m256 m = _mm256_mul_ps(gm[d], c);
          gm[d] = m;
          gs[d] = _mm256_fmsub_ps(gs[d], c, c);
          gt[d] = _mm256_sub_ps(gt[d], m);
        }
      }
      if constexpr (Phys::kActive) {
        // penalty part (not through the target): d/dlogit_k = g pi_k (Q_k - pbar), d/dmu = g w pi_k dE/dmu, ...
        const __m256 mass = _mm256_cmp_ps(pi, zero, _CMP_GT_OQ);
        const __m256 gpi = _mm256_mul_ps(g, pi);
        w.ge[k] = gpi;
        if (phys.couple_weights)
          w.gl[k] = _mm256_add_ps(w.gl[k], _mm256_and_ps(mass, _mm256_mul_ps(gpi, _mm256_sub_ps(w.qk[k], pbar))));
        const __m256 scale = _mm256_and_ps(mass, _mm256_mul_ps(_mm256_set1_ps(phys.weight), gpi));
        for (int64_t d = 0; d < D; ++d) {
          gm[d] = _mm256_fmadd_ps(scale, phys.dmu[k * D + d], gm[d]);
          gs[d] = _mm256_fmadd_ps(scale, phys.dls[k * D + d], gs[d]);
        }
        phys.scale_param_grads(k, scale, mass);
      }
    }
    from_lanes(w.mu.data(), KD, out.gm, out.stream, w.row_stage.data());
    from_lanes(w.ls.data(), KD, out.gs, out.stream, w.row_stage.data());
    from_lanes(w.gl.data(), K, out.gl);
    from_lanes(w.gt.data(), D, out.gt);
    if constexpr (Phys::kActive) {
      if (out.ge) from_lanes(w.ge.data(), K, out.ge);
      phys.store_param_grads();
    }
  }
}

// The [B, K, D] gradients are written with non-temporal stores (no read for ownership, no eviction of the inputs
// still to be read) when the call's working set, inputs and gradients, is at least 32 MiB: then it cannot stay in a
// typical last-level cache anyway. Smaller ones are stored normally and stay in cache, where the backward's
// consumers read them next; streamed rows are written whole (from_lanes' row order), since partial lines written
// tile by tile overflow the write-combining buffers. The measurements behind the 32 MiB threshold:
// docs/performance.md ("Streamed gradient stores"). (A fixed size: the last-level cache a VM reports can be the
// host's, e.g. 256 MiB for a 32 MiB slice.)
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;

// Driver over the batch. loss_all [B] and saved_all [B, Phys::kSaved] may be null (not written); the gradients
// (written with kGrad; ge_all only with physics, may be null) are for the upstream gradient grad_loss ([B], any
// stride), or g_default when it is null. They are float32 (grad_t = float) or the input's reduced dtype (grad_t =
// scalar_t: converted in registers on the way out, so that no float32 [B, K, D] buffer is ever made for them).
template <bool kGrad, typename scalar_t, typename grad_t = float, typename Phys>
void run(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
         const Phys& phys_proto, const Tensor* grad_loss, float g_default, scalar_t* loss_all, float* saved_all,
         std::type_identity_t<grad_t>* gl_all, std::type_identity_t<grad_t>* gm_all, std::type_identity_t<grad_t>* gs_all,
         std::type_identity_t<grad_t>* gt_all, std::type_identity_t<grad_t>* ge_all) {
  static_assert(std::is_same_v<grad_t, float> || std::is_same_v<grad_t, scalar_t>);
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  constexpr int kSaved = Phys::kSaved;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  const InLayout lg_in(logits), mu_in(means), ls_in(log_scales), y_in(target);
  const scalar_t* g_ptr = grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad_loss ? grad_loss->stride(0) : 0;
  const int64_t groups = (B + kLanes - 1) / kLanes;
  const int64_t values = B * (2 * KD + K + D);  // input values (and as many gradient values)
  const int64_t working_set = values * static_cast<int64_t>(sizeof(scalar_t) + sizeof(grad_t));
  const bool stream = working_set >= kStreamMinBytes;
  // inputs of 4 MiB and more are prefetched (smaller ones stay in the caches: the prefetches only cost); gradients
  // stored normally (not streamed) from a 16 MiB working set on are prefetched for writing (their read for ownership
  // one group early: 1.03-1.09x at B = 32768 and 49152, K = 8, D = 4)
  const bool prefetch = values * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefetchMinBytes;
  const bool prefetch_out = prefetch && !stream && working_set >= kStreamMinBytes / 2;
  // Dynamic schedule: threads take chunks of groups from a shared counter, so a thread that is preempted (shared
  // or virtual CPUs) does not leave the others waiting at the end; each chunk is a contiguous stretch of memory.
  // Chunks of about 8K floats of input, and at least 4 per thread (mid-size batches stay balanced).
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(8192 / (KD + K + D), (groups + 4 * threads - 1) / (4 * threads)));
  const int64_t chunks = (groups + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, std::min<int64_t>(chunks, threads), 1, [&](int64_t, int64_t) {
    Scratch w(K, D);
    Phys phys = phys_proto;
    if constexpr (Phys::kActive) {
      if constexpr (kGrad) phys.dmu.resize(KD), phys.dls.resize(KD);
      w.qk.resize(K), w.ge.resize(K);
    }
    alignas(32) float loss8[8], saved8[8 * kSaved], g8[8];
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
    for (int64_t grp = c * chunk, grp_end = std::min(groups, grp + chunk); grp < grp_end; ++grp) {
      const int64_t b0 = grp * kLanes, nb = std::min(kLanes, B - b0);
      if (prefetch && grp + 1 < grp_end) {  // the next group's rows, one group ahead (prefetch_rows)
        const int64_t b1 = b0 + kLanes, nb1 = std::min(kLanes, B - b1);
        prefetch_rows(lg_all, lg_in, b1, nb1), prefetch_rows(mu_all, mu_in, b1, nb1);
        prefetch_rows(ls_all, ls_in, b1, nb1), prefetch_rows(y_all, y_in, b1, nb1);
        if constexpr (kGrad) {
          if (prefetch_out && nb1 == kLanes) {
            prefetch_lines<true>(gm_all + b1 * KD, kLanes * KD * static_cast<int64_t>(sizeof(grad_t)));
            prefetch_lines<true>(gs_all + b1 * KD, kLanes * KD * static_cast<int64_t>(sizeof(grad_t)));
            prefetch_lines<true>(gl_all + b1 * K, kLanes * K * static_cast<int64_t>(sizeof(grad_t)));
          }
        }
      }
      GroupIn in;
      in.lg = group_rows(lg_all, lg_in, b0, nb, w.in_lg.data(), in.lg_rs);
      in.mu = group_rows(mu_all, mu_in, b0, nb, w.in_mu.data(), in.mu_rs);
      in.ls = group_rows(ls_all, ls_in, b0, nb, w.in_ls.data(), in.ls_rs);
      in.y = group_rows(y_all, y_in, b0, nb, w.in_y.data(), in.y_rs);
      __m256 g;
      if (!g_ptr && nb == kLanes) {
        g = _mm256_set1_ps(g_default);
      } else {
        for (int64_t i = 0; i < kLanes; ++i)
          g8[i] = i >= nb ? 0.0f : g_ptr ? static_cast<float>(g_ptr[(b0 + i) * g_stride]) : g_default;
        g = _mm256_load_ps(g8);
      }
      // full groups write their outputs in place (gradients in grad_t; the loss too when float32); the last,
      // partial one goes through the float32 staging rows
      const bool direct_out = nb == kLanes;
      float* loss_out = loss8;
      if constexpr (std::is_same_v<scalar_t, float>)
        if (direct_out && loss_all) loss_out = loss_all + b0;
      phys.begin_group(b0, nb);
      if (direct_out) {
        GroupOut<grad_t> out{loss_out, saved_all ? saved_all + kSaved * b0 : saved8, nullptr, nullptr, nullptr,
                             nullptr, nullptr};
        if constexpr (kGrad) {
          out.gl = gl_all + b0 * K, out.gm = gm_all + b0 * KD, out.gs = gs_all + b0 * KD, out.gt = gt_all + b0 * D;
          out.ge = ge_all ? ge_all + b0 * K : nullptr;
          out.stream = stream;
        }
        group8<kGrad>(in, g, w, phys, out);
      } else {
        GroupOut<float> out{loss8, saved8, nullptr, nullptr, nullptr, nullptr, nullptr};
        if constexpr (kGrad) {
          out.gl = w.out_gl.data(), out.gm = w.out_gm.data(), out.gs = w.out_gs.data(), out.gt = w.out_gt.data();
          out.ge = ge_all ? w.out_ge.data() : nullptr;
        }
        group8<kGrad>(in, g, w, phys, out);
        if (saved_all) std::copy(saved8, saved8 + kSaved * nb, saved_all + kSaved * b0);
        if constexpr (kGrad) {
          store_rows(w.out_gl.data(), nb * K, gl_all + b0 * K);
          store_rows(w.out_gm.data(), nb * KD, gm_all + b0 * KD);
          store_rows(w.out_gs.data(), nb * KD, gs_all + b0 * KD);
          store_rows(w.out_gt.data(), nb * D, gt_all + b0 * D);
          if (ge_all) store_rows(w.out_ge.data(), nb * K, ge_all + b0 * K);
        }
      }
      if (loss_all && loss_out == loss8)
        for (int64_t i = 0; i < nb; ++i) loss_all[b0 + i] = static_cast<scalar_t>(loss8[i]);
    }
    _mm_sfence();  // order the non-temporal stores before the results are read
  });
}

template <bool kGrad, typename scalar_t, typename grad_t = float>
void mixture_nll(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                 const Tensor& target, const Tensor* grad_loss, float g_default, scalar_t* loss_all,
                 float* saved_all, std::type_identity_t<grad_t>* gl_all, std::type_identity_t<grad_t>* gm_all,
                 std::type_identity_t<grad_t>* gs_all, std::type_identity_t<grad_t>* gt_all) {
  run<kGrad, scalar_t, grad_t>(logits, means, log_scales, target, NoPhysics{}, grad_loss, g_default, loss_all,
                               saved_all, gl_all, gm_all, gs_all, gt_all, nullptr);
}

}  // namespace physmdn::cpu::soa
