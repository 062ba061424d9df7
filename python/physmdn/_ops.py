"""What the custom ops' Python sides share: input checks and casts, the flattening of leading batch dimensions,
the dispatch of a call (:func:`call_op`: eager, traced, or functorch), the forward-with-gradients
hand-over of the autograd, and the fake kernel of ``_scale_by_``.

Each op lives in a module of its own with its fake kernels, autograd, batching rules and functorch Function:
``_mixture_nll.py`` (``mixture_nll_fwd`` / ``_bwd``) and ``_fused.py`` (``mdn_loss_fwd`` / ``_bwd``). The compiled
kernels live in ``torch.ops.physmdn.*`` (registered when ``physmdn._C`` loads).
"""

from __future__ import annotations

import math
import struct

import torch
import torch.autograd.forward_ad as _fwad

_FLOATING = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float32 for half types, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, bfloat16 or float16), got {t.dtype}")


def check_mixture_params(logits, means, log_scales) -> None:
    """Validate mixture parameters ``logits [B, K]``, ``means / log_scales [B, K, D]``: types, shapes, dtypes and
    devices, each error naming the argument, the expected and the actual value."""
    for t, name in ((logits, "logits"), (means, "means"), (log_scales, "log_scales")):
        _check_tensor(t, name)
    if means.dim() != 3:
        raise ValueError(f"means must be [B, K, D], got shape {tuple(means.shape)}")
    B, K, D = means.shape
    if K < 1:
        raise ValueError(f"means must have K >= 1 components, got shape {tuple(means.shape)}")
    if D < 1:
        raise ValueError(f"means must have D >= 1 output dimensions, got shape {tuple(means.shape)}")
    if logits.dim() != 2 or tuple(logits.shape) != (B, K):
        raise ValueError(f"logits must be [B, K] = {(B, K)} to match means, got shape {tuple(logits.shape)}")
    if tuple(log_scales.shape) != (B, K, D):
        raise ValueError(f"log_scales must be [B, K, D] = {(B, K, D)} to match means, got shape {tuple(log_scales.shape)}")
    for t, name in ((logits, "logits"), (log_scales, "log_scales")):
        _check_like_means(t, name, means)


def _check_like_means(t, name: str, means) -> None:
    if t.dtype != means.dtype:
        raise TypeError(f"{name} must have the dtype of means ({means.dtype}), got {t.dtype}")
    if t.device != means.device:
        raise ValueError(f"{name} must be on the device of means ({means.device}), got {t.device}")


def check_mixture_inputs(logits, means, log_scales, target) -> None:
    """Validate ``logits [B, K]``, ``means / log_scales [B, K, D]`` and ``target [B, D]``."""
    _check_tensor(target, "target")
    check_mixture_params(logits, means, log_scales)
    B, _, D = means.shape
    if target.dim() != 2 or tuple(target.shape) != (B, D):
        raise ValueError(f"target must be [B, D] = {(B, D)} to match means, got shape {tuple(target.shape)}")
    _check_like_means(target, "target", means)


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` the loss runs in float32 (like torch's own losses): floating inputs of
    mixed or reduced dtypes are cast up. Outside autocast inputs pass through unchanged."""
    device_type = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                     else t for t in tensors)
    return tensors


@torch.library.register_fake("physmdn::_scale_by_")
def _scale_by_fake(tensors, upstream, scale):
    return None


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    """True outside any tracing (dynamo, AOT autograd, fake or functional tensors): only then may the autograd
    formulas mutate the forward's outputs or read tensor values."""
    return not torch.compiler.is_compiling() and all(type(t) in _PLAIN_TYPES for t in tensors)


def _plain(tensors) -> bool:
    """True when the eager fast path of :func:`call_op` may run: no tracing, plain tensors, no functorch
    transform (vmap, grad) around the call."""
    return _eager(*(t for t in tensors if isinstance(t, torch.Tensor))) and not torch._C._are_functorch_transforms_active()




_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_FLOATING_SET = frozenset(_FLOATING)


def fast_mixture_inputs(logits, means, log_scales, target) -> bool:
    """True when ``logits, means, log_scales, target`` may skip the detailed checks, the autocast casts and
    :func:`_plain` (~30 us of Python per call on a small batch): four plain tensors of one floating dtype on one
    device, shaped ``[B, K]``, ``[B, K, D]``, ``[B, K, D]``, ``[B, D]`` with ``K, D >= 1``, outside tracing, autocast
    and functorch transforms. Anything else takes the full path, which casts, traces or raises the detailed error."""
    plain = _PLAIN_TYPES
    if type(logits) not in plain or type(means) not in plain or type(log_scales) not in plain or type(target) not in plain:
        return False
    dtype = means.dtype
    if dtype not in _FLOATING_SET or logits.dtype != dtype or log_scales.dtype != dtype or target.dtype != dtype:
        return False
    shape = means.shape
    if len(shape) != 3:
        return False
    B, K, D = shape
    if K < 1 or D < 1 or log_scales.shape != shape or logits.shape != (B, K) or target.shape != (B, D):
        return False
    device = means.device
    if logits.device != device or log_scales.device != device or target.device != device:
        return False
    if _any_autocast is None or _any_autocast():
        return False
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def mixture_event(logits, means) -> tuple[int, int]:
    """``(K, D)`` of ``means [*, K, D]``, checked with ``logits [*, K]`` (leading batch dimensions are checked when
    they are broadcast)."""
    if means.dim() < 2:
        raise ValueError(f"means must be [*, K, D], got shape {tuple(means.shape)}")
    K, D = means.shape[-2:]
    if K < 1 or D < 1:
        raise ValueError(f"means must have K >= 1 components and D >= 1 output dimensions, got shape "
                         f"{tuple(means.shape)}")
    if logits.dim() < 1 or logits.shape[-1] != K:
        raise ValueError(f"logits must be [*, K] with K = {K} (the components of means), got shape {tuple(logits.shape)}")
    return K, D


def flatten_batch(logits, means, log_scales, target):
    """Leading batch dimensions: ``logits [*, K]``, ``means / log_scales [*, K, D]`` and ``target [*, D]`` broadcast to
    one batch shape ``S`` (as torch broadcasts) and flattened to ``[prod(S), ...]``, views where the layout allows
    (a batch broadcast stays a stride-0 view, which the kernels read in place). Returns ``(S, tensors)``, ``S`` None
    when the inputs already share one batch dimension."""
    for t, name in ((logits, "logits"), (means, "means"), (log_scales, "log_scales"), (target, "target")):
        _check_tensor(t, name)
    K, D = mixture_event(logits, means)
    if log_scales.dim() < 2 or tuple(log_scales.shape[-2:]) != (K, D):
        raise ValueError(f"log_scales must be [*, K, D] with (K, D) = {(K, D)} (as means), got shape "
                         f"{tuple(log_scales.shape)}")
    if target.dim() < 1 or target.shape[-1] != D:
        raise ValueError(f"target must be [*, D] with D = {D} (the outputs of means), got shape {tuple(target.shape)}")
    shapes = (logits.shape[:-1], means.shape[:-2], log_scales.shape[:-2], target.shape[:-1])
    if len(shapes[1]) == 1 and all(s == shapes[1] for s in shapes):
        return None, (logits, means, log_scales, target)
    try:
        S = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"the batch dimensions of logits {tuple(shapes[0])}, means {tuple(shapes[1])}, log_scales "
                         f"{tuple(shapes[2])} and target {tuple(shapes[3])} must broadcast to one batch shape") from None
    n = math.prod(S)
    return tuple(S), (logits.expand(*S, K).reshape(n, K), means.expand(*S, K, D).reshape(n, K, D),
                      log_scales.expand(*S, K, D).reshape(n, K, D), target.expand(*S, D).reshape(n, D))


def prepared_inputs(logits, means, log_scales, target):
    """``(fast, batch_shape, (logits, means, log_scales, target))``: the inputs as they are when they pass
    :func:`fast_mixture_inputs` (``fast`` True), else cast for autocast, flattened to one batch dimension
    (:func:`flatten_batch`; ``batch_shape`` the shape to give a per-sample loss back, or None) and checked in
    detail."""
    if fast_mixture_inputs(logits, means, log_scales, target):
        return True, None, (logits, means, log_scales, target)
    logits, means, log_scales, target = autocast_inputs(logits, means, log_scales, target)
    batch_shape, (logits, means, log_scales, target) = flatten_batch(logits, means, log_scales, target)
    check_mixture_inputs(logits, means, log_scales, target)
    return False, batch_shape, (logits, means, log_scales, target)


def unflatten_loss(loss: torch.Tensor, batch_shape, reduction: str) -> torch.Tensor:
    """A per-sample loss ``[prod(S)]`` back to the callers' batch shape ``S`` (:func:`flatten_batch`)."""
    return loss.reshape(batch_shape) if batch_shape is not None and reduction == "none" else loss


def _refuse_forward_ad(name: str, args) -> None:
    """Forward-mode AD has no formula in the ops: a dual input (torch.autograd.forward_ad, torch.func.jvp / jacfwd)
    raises here instead of losing its tangent (the kernels run below autograd and would return none, or zeros)."""
    for t in args:
        if isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"physmdn.{name}: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not "
                f"supported: the op has no forward-mode formula; use reverse mode (backward, torch.func.grad / vjp / "
                f"jacrev)")


# The functorch path of call_op: python/physmdn/_func.py (which builds on this module and _fused.py) installs
# its ``apply(name, args)`` here on import, so that this module imports neither.
FUNCTORCH_APPLY: list = [None]


# (prepare, backward, hand_over) of each op's autograd registered with torch.library for ``<name>_fwd``:
# prepare(ctx, inputs, saved, grads) is its setup_context without marking outputs; hand_over(ctx, grads) the
# backward's return for the forward's gradients as they are. The eager path's Function below runs them (filled by
# _mixture_nll.py and _fused.py on import).
EAGER_AUTOGRAD: dict = {}
_EAGER_FUNCTIONS: dict = {}


def _eager_function(name: str, reduction: str):
    """The ``autograd.Function`` of the eager path for op ``name`` and a reduction: it calls the kernel below autograd
    and reduces inside its forward (the op's auxiliary outputs stay on ctx), and its backward
    sends the reduction's upstream gradient on as an expanded ``[B]`` tensor to the op's registered backward, which
    then reads one value to hand over the forward's gradients. It replaces the registered formula's dispatcher round
    trip (an autograd kernel in Python around the op) in eager mode; the same setup_context and backward run."""
    key = (name, reduction)
    if key not in _EAGER_FUNCTIONS:
        prepare, backward, hand_over = EAGER_AUTOGRAD[name]
        op = getattr(torch.ops.physmdn, f"{name}_fwd").default
        # the per-sample upstream scale of the reduction's unit gradient, as the forward's grad_scale holds it
        unit_scale = {"mean": lambda B: (1.0 / B, _rounded(1.0 / B, torch.float32)) if B else (),
                      "sum": lambda B: (1.0,)}.get(reduction)

        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                loss, saved, *grads = op(*args)
            prepare(ctx, args, saved, grads)
            ctx.batch = loss.shape[0]
            return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss

        def backward_(ctx, grad):
            if grad is not None and reduction != "none":
                if unit_scale is not None and ctx.unit_grads is not None and not torch.is_grad_enabled() \
                        and grad.device.type == "cpu" and _eager(grad) and not _batched(grad) \
                        and ctx.grad_scale in unit_scale(ctx.batch) and grad.item() == 1.0:
                    # the unit gradient of the reduced loss, which the forward's gradients were made for: handed
                    # over as they are (a retained graph's second backward recomputes them)
                    grads, ctx.unit_grads = ctx.unit_grads, None
                    return hand_over(ctx, grads)
                grad = (grad / ctx.batch if reduction == "mean" else grad).expand(ctx.batch)
            return backward(ctx, grad, None)

        # (the node is named physmdn_<name>_fwd_<reduction>Backward)
        _EAGER_FUNCTIONS[key] = type(f"physmdn_{name}_fwd_{reduction}", (torch.autograd.Function,),
                                     {"forward": staticmethod(forward), "backward": staticmethod(backward_)})
    return _EAGER_FUNCTIONS[key]


class _ExpandedMean(torch.autograd.Function):
    """``loss.mean()`` of an op's per-sample loss in eager mode, whose backward sends the upstream gradient on as an
    expanded ``[B]`` tensor (the values ``MeanBackward`` computes, without materializing them): the op's backward then
    reads one value to see that its forward's gradients are the answer, instead of comparing all ``B``."""

    @staticmethod
    def forward(ctx, loss):
        ctx.batch = loss.shape[0]
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):
        return (grad / ctx.batch).expand(ctx.batch)


def call_op(name: str, args, needs_autograd: bool, reduction: str = "none", plain: bool | None = None) -> torch.Tensor:
    """The loss of ``torch.ops.physmdn.<name>_fwd(*args)``, reduced (``"none"``, ``"mean"`` or ``"sum"``). In eager
    mode without autograd straight to the kernel; with autograd, traced (torch.compile) or with tensor subclasses
    through the dispatcher and the autograd registered here; with autograd under functorch transforms in eager mode through ``_func.apply`` (the same
    autograd formulas; without, ``vmap`` needs only the batching rules). ``plain``: the caller's :func:`_plain`
    (None: test it)."""
    if _fwad._current_level >= 0:  # (a dual level is open: one module attribute read otherwise)
        _refuse_forward_ad(name, args)
    is_plain = plain if plain is not None else _plain(args)
    if is_plain and not needs_autograd:
        with torch._C._AutoDispatchBelowAutograd():
            loss = getattr(torch.ops.physmdn, f"{name}_fwd").default(*args)[0]
    elif is_plain and name in EAGER_AUTOGRAD and not torch._C._are_functorch_transforms_active():
        return _eager_function(name, reduction).apply(*args)
    elif needs_autograd and torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        # (register_autograd's Function lacks setup_context, which functorch requires: _func.py's Functions)
        loss = FUNCTORCH_APPLY[0](name, args)
    else:
        loss = getattr(torch.ops.physmdn, f"{name}_fwd")(*args)[0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def keep_forward_grads(ctx, compute_grad, grad_scale, dtype, grads, to_save) -> None:
    """setup_context for ops whose forward may also compute the gradients (``compute_grad``), for an upstream
    gradient of ``grad_scale`` per sample. Eager: the gradient outputs are kept aside (not saved) so that the first
    backward hands them over (unit upstream gradient) or returns scaled copies and keeps them; a backward after the
    hand-over (retain_graph) recomputes through the op's backward. Traced (torch.compile): they are saved and the backward rescales copies.
    (Under functorch transforms the forward computes none: see ``_func.apply``.)"""
    ctx.compute_grad = bool(compute_grad)
    # the value the kernel used (it computes in the accumulation dtype), to compare the upstream gradient with
    ctx.grad_scale = _rounded(float(grad_scale), acc_dtype(dtype))
    if ctx.compute_grad and _eager(*grads):
        ctx.save_for_backward(*to_save)
        ctx.unit_grads = list(grads)
    else:
        ctx.save_for_backward(*to_save, *(grads if ctx.compute_grad else ()))
        ctx.unit_grads = None


def _per_sample(g, t):
    return g.view(-1, *([1] * (t.dim() - 1)))


def _batched(t) -> bool:
    """True for a vmap-batched tensor: legacy (``torch.autograd.grad(..., is_grads_batched=True)``) or functorch."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_batchedtensor(t)


def forward_grads(ctx, grad_loss, saved, saved_grads):
    """The gradients for ``grad_loss`` made from the forward's (see :func:`keep_forward_grads`), or None when the
    backward must recompute (no forward gradients, a second backward in eager, a batched ``grad_loss``). Empty
    outputs stay empty."""
    if not ctx.compute_grad:
        return None
    if grad_loss is not None and _batched(grad_loss):
        # a batched upstream gradient (is_grads_batched=True): its values cannot be read, nor can the unbatched
        # forward gradients be rescaled by it in place; the backward recomputes through the op
        ctx.unit_grads = None
        return None
    if ctx.unit_grads is not None:
        grads = ctx.unit_grads
        if _device_scalar(grad_loss):
            # one upstream value on a GPU (loss.sum() / .mean()): compared with grad_scale inside the kernel, no
            # synchronization, and no pass over the gradients when it is that (see _scale_by_ in csrc/ops.cpp)
            ctx.unit_grads = None
            torch.ops.physmdn._scale_by_(grads, grad_loss[0], ctx.grad_scale)
            return grads
        g = _upstream_factor(grad_loss, saved, grads[0].dtype, ctx.grad_scale)
        if g is None:  # the forward's gradients are the answer: hand them over as they are
            ctx.unit_grads = None
            return grads
        # another upstream gradient: scaled copies, the forward's gradients kept, so that a retained graph's every
        # backward gives the same bits (gradcheck's reentrancy check)
        return [t * _per_sample(g, t) if t.numel() else t for t in grads]
    if saved_grads:
        g = _upstream_factor(grad_loss, saved, saved_grads[0].dtype, ctx.grad_scale)
        if g is None:
            g = torch.ones_like(saved[:, 0], dtype=saved_grads[0].dtype)  # copies: the saved tensors stay
        return [t * _per_sample(g, t) if t.numel() else t for t in saved_grads]
    return None


def _device_scalar(grad_loss) -> bool:
    """True for a plain upstream gradient off the CPU holding one value for every sample (an expanded scalar)."""
    return (grad_loss is not None and grad_loss.device.type != "cpu" and grad_loss.numel() > 0
            and (grad_loss.stride(0) == 0 or grad_loss.numel() == 1) and _eager(grad_loss))


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (float32 without creating a tensor: this runs on every call)."""
    if dtype == torch.float64:
        return float(value)
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", value))[0]
    return float(torch.tensor(value, dtype=dtype))


def _upstream_factor(grad_loss, saved, dtype, grad_scale: float):
    """Per-sample factor ``grad_loss / grad_scale`` turning the forward's gradients (computed for an upstream
    gradient of ``grad_scale``) into the requested ones, or None when it is exactly 1: a CPU upstream gradient whose
    every element equals ``grad_scale``, as ``loss.sum()`` (scale 1, an expanded tensor) or the op's own mean
    reduction (scale 1/B) produce. The check reads B numbers, the rescaling it saves reads and writes the
    [B, K, D] gradients. (On CUDA the values are not inspected: that would synchronize.)"""
    if grad_loss is None:
        return torch.zeros_like(saved[:, 0], dtype=dtype)
    if grad_loss.device.type == "cpu" and grad_loss.numel() > 0 and _eager(grad_loss):
        first = grad_loss[0]
        value = first.item()
        # (a bfloat16 loss's 1/B differs from the float32 one only by its own rounding)
        if (value == grad_scale or value == _rounded(grad_scale, grad_loss.dtype)) and (
                grad_loss.stride(0) == 0 or bool((grad_loss == first).all())):
            return None
    g = grad_loss.to(dtype)
    return g if grad_scale == 1.0 else g / grad_scale


def second_order_error(name: str) -> NotImplementedError:
    """The error for a second derivative through an op's backward (which has no derivative of its own)."""
    return NotImplementedError(
        f"physmdn.{name}: only first-order gradients are supported; the op's backward is itself being "
        f"differentiated (create_graph=True, or a nested torch.func.grad / jacrev), which would give wrong (zero) "
        f"second derivatives")


def check_first_order(name: str, ctx, grad_loss) -> None:
    """The ops' backward has no derivative of its own: a backward whose inputs are themselves differentiated
    (``create_graph=True``) raises instead of returning zero second derivatives. Checked here for the registered
    autograd in eager mode (tracing decides nothing here); under functorch transforms see ``_func.py``."""
    if not torch.is_grad_enabled() or hasattr(ctx, "bwd_op"):
        # (a plain first-order backward runs without grad mode; functorch runs every backward with create_graph,
        # so _func's Functions call the backward op through a Function whose own backward raises if a second
        # derivative is taken)
        return
    tensors = [t for t in (grad_loss, *ctx.saved_tensors) if t is not None]
    if _eager(*tensors) and any(t.requires_grad for t in tensors):
        raise second_order_error(name)


