"""Reference models from other libraries, for ``physmdn compare``: :class:`TorchCFM`, conditional flow matching as
the ``torchcfm`` package does it (optional dependency; :func:`torchcfm_status` says whether it imports).

Layering: imports :mod:`physmdn.models` (the standardization buffers) and, when installed, ``torchcfm``.
"""

from __future__ import annotations

import torch

from . import _validation as check
from .models import _ConditionalModel

try:  # optional: the peer column of ``physmdn compare`` is skipped without it
    import torchcfm
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models import MLP as TorchCFMMLP
    _IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the environment
    torchcfm = ConditionalFlowMatcher = TorchCFMMLP = None
    _IMPORT_ERROR = error

__all__ = ["TorchCFM", "torchcfm_status"]


def torchcfm_status() -> tuple[bool, str]:
    """``(available, message)``: whether ``import torchcfm`` works, and its version or the reason it does not."""
    if _IMPORT_ERROR is None:
        return True, f"torchcfm {getattr(torchcfm, '__version__', '?')}"
    return False, (f"torchcfm is not importable ({_IMPORT_ERROR}); install it (pip install torchcfm) for the peer "
                   f"CFM column")


class TorchCFM(_ConditionalModel):
    """Conditional flow matching with torchcfm's own pieces: its :class:`ConditionalFlowMatcher` (I-CFM,
    ``x_t = t x1 + (1 - t) x0 + sigma eps``, target ``x1 - x0``) draws the times, states and target velocities, and
    its ``MLP`` (three hidden layers of ``width``, SELU, time as the last input) takes ``[x_t, context, t]``, so the
    context enters as torchcfm's examples feed extra inputs. Trained by :func:`physmdn.fit` like :class:`CFM`
    (``loss``), in standardized units; sampled by fixed-step Euler in :meth:`sample`, as :class:`CFM`.

    Raises ``ImportError`` when ``torchcfm`` is not installed.
    """

    def __init__(self, in_features: int, out_features: int, width: int = 128, sigma: float = 0.0):
        available, message = torchcfm_status()
        if not available:
            raise ImportError(message)
        super().__init__()
        self.in_features = check.count(in_features, "in_features")
        self.out_features = check.count(out_features, "out_features")
        width = check.count(width, "width")
        sigma = check.nonnegative(sigma, "sigma")
        self.config = dict(in_features=self.in_features, out_features=self.out_features, width=width, sigma=sigma)
        self._init_normalization(self.in_features, self.out_features)
        self.net = TorchCFMMLP(dim=self.out_features + self.in_features, out_dim=self.out_features, w=width,
                               time_varying=True)
        self.matcher = ConditionalFlowMatcher(sigma=sigma)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """Velocity ``[N, D]`` at ``x_t [N, D]`` (standardized), time ``t`` (``[N]`` or a number), ``context [N, C]``."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1).expand(x_t.shape[0], 1)
        c = (context - self.x_loc) / self.x_scale
        return self.net(torch.cat([x_t, c, t], dim=-1))

    def loss(self, context: torch.Tensor, target: torch.Tensor, *, residual=None, physics_weight: float = 0.0,
             time_weighting: str = "none", generator: torch.Generator | None = None, autocast_dtype=None,
             return_terms: bool = False):
        """torchcfm's regression loss ``mean ||v(x_t, t, c) - u_t||^2`` on a batch ``context [B, C]``, ``target
        [B, D]``; ``residual`` must be None (no physics for the reference model). ``generator`` is not used:
        torchcfm draws from torch's global generator."""
        if residual is not None and physics_weight != 0.0:
            raise ValueError("TorchCFM is the reference model without physics: pass physics=None")
        context = self._check_context(context, "context")
        target = self._check_outcome(target, context.shape[0], "target")
        x1 = (target - self.y_loc) / self.y_scale
        x0 = torch.randn_like(x1)
        t, x_t, u_t = self.matcher.sample_location_and_conditional_flow(x0, x1)
        total = (self(x_t, t, context) - u_t).square().mean()
        zero = total.new_zeros(())
        return (total, total, zero) if return_terms else total

    @torch.no_grad()
    def sample(self, context: torch.Tensor, n: int = 1, steps: int = 32) -> torch.Tensor:
        """``n`` samples per context ``[B, C]``: ``[n, B, D]`` (physical units), Euler with ``steps`` steps."""
        context = self._check_context(context, "context")
        n, steps = check.count(n, "n"), check.count(steps, "steps")
        B, D = context.shape[0], self.out_features
        ctx = context.repeat(n, 1)
        x = torch.randn((n * B, D), dtype=context.dtype, device=context.device)
        for i in range(steps):
            x = x + self(x, i / steps, ctx) / steps
        return (x * self.y_scale + self.y_loc).reshape(n, B, D)
