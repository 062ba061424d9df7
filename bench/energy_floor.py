"""Finite-sample floor of the compare/ablation energy distance: two independent ground-truth sample sets
(400 vs 400 per context, the 32 held-out contexts the CLI uses) scored like a model.

    python bench/energy_floor.py
"""
import torch

from physmdn import metrics as M
from physmdn import problems as P

torch.set_num_threads(1)
print("| problem | truth-vs-truth energy, seeds 1, 2, 3 |")
print("|---|---|")
for name in ["pitchfork", "hugoniot", "allen_cahn", "reaction_diffusion"]:
    p = P.get(name)
    c = p.sample_contexts(32, seed=30000)
    t = p.sample_truth(c, 400, seed=40000)
    vals = [float(M.conditional(M.energy_distance, p.sample_truth(c, 400, seed=s), t)) for s in (1, 2, 3)]
    print(f"| {name} | " + ", ".join(f"{v:.4g}" for v in vals) + " |")
