"""Which Allen–Cahn prior costs energy at n = 256: ``mdn-physics`` with the stability prior alone and with the
noise-normalized steady penalty alone, at the ``physmdn compare`` defaults (weight 0.1, early stopping, no oracle
inputs), 5 paired seeds on the compare run's held-out contexts and truth. Prints one line per run; pair them with
the plain MDN rows of ``runs/honest-allen_cahn/results.csv`` (same seeds, same data).

    OMP_NUM_THREADS=1 python bench/allen_cahn_split.py
"""

import torch

from physmdn import experiments as E
from physmdn import problems as P


def main() -> None:
    torch.set_num_threads(1)
    base = P.get("allen_cahn")
    contexts = base.sample_contexts(32, seed=30_000)
    truth = (contexts, base.sample_truth(contexts, 400, seed=40_000))
    for label, weights in (("stability only", {"steady": 0.0}), ("steady only", {"stability": 0.0})):
        problem = P.get("allen_cahn", physics_weights=weights)
        for seed in range(5):
            m = E.run_experiment(problem, "mdn-physics", n_train=256, epochs=500, seed=seed, truth=truth)["metrics"]
            print(f"{label} seed {seed}: energy {m['energy']:.4g} mode_weight_error {m['mode_weight_error']:.3g} "
                  f"residual {m['residual_model']:.4g}", flush=True)


if __name__ == "__main__":
    main()
