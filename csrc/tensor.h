// physmdn's torch vocabulary: the LibTorch stable ABI (torch/csrc/stable, torch/headeronly), built for the oldest
// torch physmdn supports (TORCH_TARGET_VERSION, set by CMakeLists.txt), so that one build loads under every newer
// torch. Only this header names the torch namespaces; the rest of csrc/ says Tensor, ScalarType, PHYSMDN_CHECK.
#pragma once
#ifdef PHYSMDN_ATEN_TENSORS
// The same vocabulary over ATen's tensors, for code built against torch's full C++ API: the CUDA simulator of
// tests/cuda/cuda_sim, which runs csrc/cuda/backend.cuh on the CPU inside a torch.utils.cpp_extension module.
#include <ATen/ATen.h>
#else
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#endif

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace physmdn {

#ifdef PHYSMDN_ATEN_TENSORS
using Tensor = at::Tensor;
using ScalarType = at::ScalarType;
using Device = at::Device;
using IntArrayRef = at::IntArrayRef;
#else
using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
#endif
using OptionalTensor = std::optional<Tensor>;
using BFloat16 = c10::BFloat16;
using Half = c10::Half;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;

// The accumulation type of a kernel's element type: float for the 16-bit types, else the type itself.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, BFloat16> || std::is_same_v<T, Half>, float, T>;

template <typename T>
constexpr ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<T, double>) return kDouble;
  else if constexpr (std::is_same_v<T, float>) return kFloat;
  else if constexpr (std::is_same_v<T, BFloat16>) return kBFloat16;
  else return kHalf;
}

inline bool is_floating(ScalarType t) { return t == kFloat || t == kDouble || t == kHalf || t == kBFloat16; }

// Message formatting for PHYSMDN_CHECK: streams every argument; shapes and devices print as torch prints them.
struct Shape {
  IntArrayRef sizes;
};
inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << '[';
  for (size_t i = 0; i < s.sizes.size(); ++i) os << (i ? ", " : "") << s.sizes[i];
  return os << ']';
}
inline Shape shape(const Tensor& t) { return {t.sizes()}; }
#ifndef PHYSMDN_ATEN_TENSORS  // (ATen prints its devices itself)
inline std::ostream& operator<<(std::ostream& os, const Device& d) {
  os << (d.is_cpu() ? "cpu" : d.is_cuda() ? "cuda" : "device");
  if (d.has_index() && !d.is_cpu()) os << ':' << static_cast<int>(d.index());
  return os;
}
#endif

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  ((os << args), ...);
  throw std::runtime_error(os.str());
}

}  // namespace physmdn

// A failed check raises RuntimeError in Python with the message alone (the argument, what was expected, what came).
#define PHYSMDN_CHECK(cond, ...)          \
  do {                                    \
    if (!(cond)) ::physmdn::fail(__VA_ARGS__); \
  } while (0)

// Runs the body with scalar_t bound to the C++ type of a floating dtype (float64, float32, bfloat16, float16).
#define PHYSMDN_DISPATCH_FLOATING(dtype, what, ...)                                                 \
  [&] {                                                                                              \
    switch (dtype) {                                                                                 \
      case ::physmdn::kDouble: { using scalar_t = double; return __VA_ARGS__(); }                    \
      case ::physmdn::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                      \
      case ::physmdn::kBFloat16: { using scalar_t = ::physmdn::BFloat16; return __VA_ARGS__(); }     \
      case ::physmdn::kHalf: { using scalar_t = ::physmdn::Half; return __VA_ARGS__(); }             \
      default: ::physmdn::fail(what, ": expected a floating-point dtype, got ", dtype);            \
    }                                                                                                \
  }()

namespace physmdn {

// Tensor operations the drivers use.
#ifdef PHYSMDN_ATEN_TENSORS
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const Device& device) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).device(device));
}
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) { return t.to(dtype); }
inline Tensor as_contiguous(const Tensor& t) { return t.contiguous(); }
inline void copy_into(Tensor& dst, const Tensor& src) { dst.copy_(src); }
inline Tensor make_full(IntArrayRef sizes, double value, ScalarType dtype, const Device& device) {
  return at::full(sizes, value, at::TensorOptions().dtype(dtype).device(device));
}
inline void mul_in_place(Tensor& t, const Tensor& factor) { t.mul_(factor); }
#else
// (the shim's aoti_torch_empty_strided: a direct call, where torch::stable::empty goes through the dispatcher by name,
// a few microseconds more per output; docs/performance.md)
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const Device& device) {
  std::array<int64_t, 8> strides{};
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  STD_TORCH_CHECK(ndim <= 8, "physmdn: empty() takes at most 8 dimensions, got ", ndim);
  int64_t stride = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  const auto shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const auto shim_device = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device.type()));
  AtenTensorHandle handle = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(ndim, sizes.data(), strides.data(), shim_dtype, shim_device, device.index(),
                                           &handle) == AOTI_TORCH_SUCCESS,
                  "physmdn: allocating a tensor failed");
  return Tensor(handle);
}
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline void copy_into(Tensor& dst, const Tensor& src) { torch::stable::copy_(dst, src); }
inline Tensor make_full(IntArrayRef sizes, double value, ScalarType dtype, const Device& device) {
  return torch::stable::full(sizes, value, dtype, std::nullopt, device);
}
// t *= factor (torch's mul_, broadcasting), through the shim's dispatcher call
inline void mul_in_place(Tensor& t, const Tensor& factor) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(t), torch::stable::detail::from(factor)};
  STD_TORCH_CHECK(torch_call_dispatcher("aten::mul_", "Tensor", stack.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
                  "aten::mul_ failed");
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}
#endif
}  // namespace physmdn
