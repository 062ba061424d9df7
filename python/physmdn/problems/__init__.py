"""Scientific benchmark problems: seedable data generators, ground truth and physics specs per problem.

Every problem maps a context ``x [C]`` to a multimodal conditional distribution ``p(y | x)`` over ``y [D]``:

============================  ===========================  =======  ======  =========================================
name                          context                      ``C``    ``D``   modes (branches)
============================  ===========================  =======  ======  =========================================
``pitchfork``                 ``r``                        1        1       single equilibrium, upper, lower
``allen_cahn``                ``eps, sigma, bias``         3        32      all +1, all -1, kink states
``hugoniot``                  ``u_p`` (km/s)               1        2       elastic, plastic, phase-transformed
``reaction_diffusion``        ``D, a``                     2        32      uniform low, uniform high, pinned fronts
``stochastic_allen_cahn``     ``eps, sigma``               2        8       all > 0, all < 0, mixed signs
============================  ===========================  =======  ======  =========================================

Common protocol (:class:`Problem`), all tensors in the problem's physical units:

* ``sample(n, seed=..., device=...) -> Sample(x [n, C], y [n, D], labels [n])``: contexts drawn by
  :meth:`~Problem.sample_contexts`, one outcome per context, and the branch (regime) index of every outcome;
* ``sample_truth(context [B, C], n) -> [n, B, D]``: ``n`` draws of the true conditional distribution per context
  (sample dimension first, like :meth:`physmdn.distributions.GaussianMixture.sample`);
* ``true_weights(context) -> [B, M]`` branch probabilities where they are known in closed form, else ``None``;
* ``classify(y [..., D], context [..., C]) -> [...]`` the branch of an outcome (used by the mode-weight metric);
* ``physics(context [B, C]) -> [(spec, weight), ...]`` the :mod:`physmdn.physics` specs of the problem's MDN
  (``components=K`` for problems whose specs are component-specific);
* ``residual(y [..., D], context [..., C]) -> [..., M]`` the physical residual of outcomes, in plain torch.

Generators are vectorized torch code and run on any device; ``seed=s`` (or a ``torch.Generator``) makes a draw
reproducible on that device. :func:`get` looks problems up by name.

Modules: :mod:`~physmdn.problems.base` (the protocol, seeding, the registry), :mod:`~physmdn.problems.numerics`
(integrators, the implicit diffusion solve, lattice residuals, the cubic's equilibria, labels) and one module per
problem. Layering: imports :mod:`physmdn.physics`, :mod:`physmdn.stationary` and :mod:`physmdn._validation`, nothing
above them.
"""

from __future__ import annotations

from .base import Defaults, Problem, Sample, get, make_generator, names, register
from .numerics import cubic_equilibria, second_difference
from .pitchfork import Pitchfork
from .allen_cahn import AllenCahn
from .hugoniot import Hugoniot
from .reaction_diffusion import ReactionDiffusion
from .stochastic_allen_cahn import StochasticAllenCahn

__all__ = [
    "Problem", "Defaults", "Sample", "Pitchfork", "AllenCahn", "Hugoniot", "ReactionDiffusion", "StochasticAllenCahn",
    "get", "names", "register", "make_generator", "second_difference", "cubic_equilibria",
]
