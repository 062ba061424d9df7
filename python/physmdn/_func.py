"""torch.func (functorch) support shared by the custom ops: folding a vmap dimension into the batch, first-order
backward Functions, and the functorch autograd path of :func:`physmdn._ops.call_op`. Each op's own batching
rules and Function live beside it (``_mixture_nll.py``, ``_fused.py``); this module holds what they share.

The scheme:

- **vmap.** Every op is per sample along the batch dimension B, so a vmapped call folds the vmap dimension into
  the batch (``[N, B, ...] -> [N B, ...]``: one kernel call, no per-example loop) and unfolds the outputs. Inputs
  not mapped over are expanded (a view; ``reshape`` copies them only when it must).
- **grad, vjp, jacrev.** The autograd that ``torch.library.register_autograd`` installs is an ``autograd.Function``
  without a ``setup_context`` staticmethod, which functorch refuses (pytorch/pytorch#168393, #179652: "it must
  override the setup_context staticmethod"). With autograd under functorch transforms :func:`physmdn._ops.call_op`
  goes through the Functions below instead: the same setup_context and backward as the registered autograd, and
  ``generate_vmap_rule`` (so that ``vmap(grad(...))`` and ``jacrev`` work, through the batching rules). Their
  forward computes no gradients; the backward's kernel does, for the actual upstream gradient (see :func:`apply`).
- Second derivatives raise: functorch runs every backward with create_graph, so the backward op is called
  through a Function (:class:`_FirstOrder`) whose own backward raises (rather than give zero second derivatives).
- Forward-mode AD (``jvp``, ``jacfwd``) is not supported: the ops have no forward-mode formula; a dual input raises
  in :func:`physmdn._ops.call_op`.
- Under ``torch.compile`` the registered autograd stays (the Functions are for eager transforms): ``vmap`` compiles
  (through the batching rules), ``grad`` over the ops does not (torch's error above, pytorch/pytorch#170834). The
  Functions are not offered to dynamo because it differentiates an autograd.Function it inlines through the
  forward's trace: with the op called below its autograd, its gradients would be zeros.
"""

from __future__ import annotations

import torch

from . import _ops


def _per_sample(t, d, n):
    """``t`` (mapped at ``d``, or unmapped when ``d`` is None) as ``[n * B, ...]``, the vmap dimension folded into
    the batch dimension."""
    t = t.unsqueeze(0).expand(n, *t.shape) if d is None else t.movedim(d, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _one(t, d):
    """A tensor that is not per sample (an empty placeholder): one example's, mapped or not."""
    return t if d is None else t.select(d, 0)


def _fold(info, in_dims, args, per_sample):
    """The op arguments with the vmap dimension folded into the batch for ``per_sample[i]`` tensors; other tensors
    (placeholders) taken as one example's; non-tensors passed through."""
    n = info.batch_size
    out = []
    for a, d, ps in zip(args, in_dims, per_sample):
        if isinstance(a, torch.Tensor):
            a = _per_sample(a, d, n) if ps else _one(a, d)
        out.append(a)
    return out


def _unfold(outputs, n, per_sample):
    """Outputs ``[n * B, ...]`` back to ``[n, B, ...]`` (out_dim 0); placeholders unmapped (out_dim None)."""
    res, dims = [], []
    for t, ps in zip(outputs, per_sample):
        if ps:
            res.append(t.reshape(n, t.shape[0] // n if n else 0, *t.shape[1:]))
            dims.append(0)
        else:
            res.append(t)
            dims.append(None)
    return tuple(res), tuple(dims)


def _placeholder(t, d) -> bool:
    """True for the ops' empty ``(0,)`` stand-ins (family parameters of no family, absent gradients)."""
    shape = t.shape if d is None else t.shape[:d] + t.shape[d + 1:]
    return len(shape) == 1 and shape[0] == 0


class _FirstOrder(torch.autograd.Function):
    """Base of the backward ops' Functions: calling the op records it on the tape of any outer reverse level, so that
    differentiating the backward itself (``grad`` of a ``grad``, ``jacrev`` of a ``jacrev``; functorch runs every
    backward with create_graph) raises instead of giving zero second derivatives. A first-order gradient never
    calls their backward."""

    generate_vmap_rule = True
    op = ""  # the forward op's name, for the error

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @classmethod
    def backward(cls, ctx, *grads):
        raise _ops.second_order_error(cls.op)


def _with_bwd(setup_context, bwd):
    """``setup_context`` that also has the backward call the op through ``bwd`` (a :class:`_FirstOrder`)."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.bwd_op = bwd.apply

    return staticmethod(setup)


FUNCTIONS: dict = {}  # op name -> its autograd.Function for functorch transforms; each op module registers its own


def apply(name: str, args) -> torch.Tensor:
    """The loss of ``<name>_fwd(*args)`` through its Function, without gradients in the forward: under transforms
    the upstream gradient cannot be read, so forward gradients would always be rescaled (a multiplication of every
    ``[B, K, D]`` gradient: at N = 16 vmapped examples of B = 4096 it took 3.6 ms each, more than the kernel);
    the backward's kernel computes them for the actual upstream gradient in one pass instead."""
    function = FUNCTIONS[name]
    i = function.compute_grad_index
    return function.apply(*args[:i], False, *args[i + 1:])[0]


_ops.FUNCTORCH_APPLY[0] = apply
