"""Sampling speed of MDN vs CFM per problem: time to draw 10,000 samples (100 contexts x 100), median of
``--reps`` repetitions after a warm-up, with the CLI's default architectures (sampling cost does not depend on the
trained weights) and CFM at 32 ODE steps (the CLI default).

    python bench/sampling_speed.py --threads 1 --reps 15
"""
import argparse
import statistics
import time

import torch

from physmdn import experiments as E
from physmdn import problems as P

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=15)
ap.add_argument("--cfm-steps", default="32")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
print(f"threads={args.threads}, reps={args.reps}\n")
print("| problem | MDN 10k samples (s, median) | CFM steps | CFM 10k samples (s, median) | CFM / MDN |")
print("|---|---|---|---|---|")
for name in ["pitchfork", "hugoniot", "allen_cahn", "reaction_diffusion"]:
    p = P.get(name)
    ctx = p.sample_contexts(100, seed=12345)
    mdn = E._sampler(E._build_model(p, "mdn", None, None), "mdn", 32)
    t_mdn = statistics.median(E._time_sampling(mdn, p, torch.device("cpu")) for _ in range(args.reps))
    for steps in [int(s) for s in args.cfm_steps.split(",")]:
        cfm = E._sampler(E._build_model(p, "cfm", None, None), "cfm", steps)
        t_cfm = statistics.median(E._time_sampling(cfm, p, torch.device("cpu")) for _ in range(max(3, args.reps // 3)))
        print(f"| {name} | {t_mdn:.3g} | {steps} | {t_cfm:.3g} | {t_cfm / t_mdn:.0f}x |")
