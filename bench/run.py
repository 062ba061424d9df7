"""physmdn benchmarks, one entry point: op sweeps against a copy-bandwidth roofline, MDN training-step throughput,
and MDN vs CFM sampling throughput.

    python bench/run.py --quick            # small sweep, < 3 min on 2 CPU cores
    python bench/run.py [--full]           # the full sweep (B up to 256k on a CPU, 4M on a GPU), < 15 min on a CPU
    python bench/run.py --quick --threads 1  # steadier when other work shares the CPU
    python bench/run.py --gpu-check        # the short GPU check of bench/gpu_check.sh
    python bench/run.py --gpu-check --dry-run --device cpu   # the same plumbing with tiny sizes

Sections:

1. ops: ``mixture_nll`` and the fused physics loss (``mdn_loss`` + exact polynomial penalty, J = 3) against the
   eager reference, ``torch.compile`` of it and (NLL) ``torch.distributions``; passes ``fwd`` (no grad), ``bwd``
   (``autograd.grad`` of the summed loss; the forward runs before the timed region, every call on a fresh graph)
   and ``fwd+bwd``. Each row: median and p20/p80 ms, peak memory beyond the inputs, the bytes the op must move
   (inputs read + outputs written, see ``_impls.op_bytes``), the achieved GB/s of those bytes and their percentage
   of the ``dst.copy_(src)`` bandwidth measured in the same run, and physmdn's speedup (impl time / physmdn time).
   Every implementation's forward output is compared with physmdn's (``max_rel_diff``).
2. train: samples/s of a full MDN training step (forward, loss, backward, Adam step) with physmdn's loss, the eager
   reference loss and a ``torch.distributions.MixtureSameFamily`` loss (and the physics loss, fused vs eager).
3. sample: samples/s of ``MDN(x).sample(n)`` vs ``CFM.sample(x, n, steps=32)`` (same hidden widths, untrained:
   throughput does not depend on the weights).

Timing: the implementations compared in a table are timed in interleaved rounds (one call of each per round, order
rotating), so that a change in background load hits them alike; the first call (compilation included) is timed
apart (``first_call_s``) and followed by warm-up calls. ``torch.compile`` runs in its default mode with the batch
dimension marked dynamic, so it compiles once per (K, D, dtype, grad mode), not per batch size.

Results: printed, and appended to bench/out/<machine>.md (ignored by git; summary tables, then every op row) and .csv (every
row, with a ``section`` column), with machine, versions, git revision, load average (at start and end) and date.
Timings compare implementations within one run; on a shared CPU, read the ratios, not the absolute times (the run
warns when the load average says other work shares the cores; ``--threads 1`` then gives steadier numbers). The CPU
presets carry a soft time budget (``--budget-s``): op points that would overrun it are skipped and listed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS_DIR, append_csv, append_markdown, copy_bandwidth, format_table, info_header,  # noqa: E402
                     machine_info, peak_memory_bytes, sync, timeit_interleaved)  # first: sets the profiler's log level

import torch  # noqa: E402
from _impls import OP_LABELS, implementations, make_inputs, op_bytes, requires_grad_copy  # noqa: E402

import physmdn  # noqa: E402
from physmdn import physics as P  # noqa: E402
from physmdn import reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}
PASSES = ("fwd", "bwd", "fwd+bwd")


# ----- presets ---------------------------------------------------------------------------------------
# A point is (B, K, D, dtype, passes). Points run in list order: the most informative first, so that a soft time
# budget (--budget-s, on by default for the CPU presets) drops the least informative ones. A point is skipped when
# the time so far plus its predicted time (the op's latest point, scaled by elements x passes x dtype size) would
# pass the budget.

def _sweep(b_sweep, k_sweep, d_sweep, base, kd_batch, bf16_b, passes=PASSES, kd_passes=PASSES):
    """B at the base K, D (float32 over ``b_sweep``, bfloat16 over ``bf16_b``); K and D one at a time at batch
    ``kd_batch`` (float32); float64 once at the base shape."""
    B0, K0, D0 = base
    points = [(B0, K0, D0, "float32", passes), (B0, K0, D0, "bfloat16", passes)]
    points += [(B, K0, D0, "float32", passes) for B in b_sweep]
    points += [(kd_batch, K, D0, "float32", kd_passes) for K in k_sweep]
    points += [(kd_batch, K0, D, "float32", kd_passes) for D in d_sweep]
    points += [(B, K0, D0, "bfloat16", passes) for B in bf16_b]
    points.append((B0, K0, D0, "float64", passes))
    seen, unique = set(), []
    for p in points:
        if p[:4] not in seen:
            seen.add(p[:4])
            unique.append(p)
    return unique


def preset(name: str, device: str, dry_run: bool) -> dict:
    gpu = device.startswith("cuda")
    if dry_run:  # tiny sizes: checks the plumbing (every section, every code path), not the speed
        passes = ("fwd+bwd",) if name == "gpu-check" else PASSES
        return dict(points=[(256, 4, 2, "float32", passes), (1024, 4, 2, "float32", passes),
                            (1024, 4, 2, "bfloat16", passes)],
                    repeat=3, max_time=0.2, warmup=1, min_repeat=2, copy_mib=16, budget_s=None,
                    train=[dict(B=256, K=4, D=2, C=4, hidden=(16, 16))], train_repeat=3,
                    sample=[dict(B=16, n=8, K=4, D=2, C=4, hidden=(16, 16))], sample_repeat=2)
    if name == "quick":
        scale = 16 if gpu else 1
        points = [(65536 * scale, 8, 4, "float32", PASSES), (4096 * scale, 8, 4, "float32", PASSES),
                  (65536 * scale, 8, 4, "bfloat16", ("fwd+bwd",)), (8192 * scale, 32, 8, "float32", ("fwd+bwd",))]
        return dict(points=points, repeat=10, max_time=0.25, warmup=1, min_repeat=3,
                    copy_mib=1024 if gpu else 256, budget_s=None if gpu else 150,
                    train=[dict(B=65536 if gpu else 4096, K=8, D=4, C=8, hidden=(64, 64))], train_repeat=10,
                    sample=[dict(B=1024 if gpu else 128, n=256 if gpu else 32, K=8, D=4, C=8, hidden=(128, 128, 128))],
                    sample_repeat=5)
    if name == "gpu-check":
        points = [(B, 8, 4, dt, ("fwd+bwd",)) for B in (1 << 22, 1 << 20, 65536) for dt in ("float32", "bfloat16")]
        return dict(points=points, repeat=20, max_time=1.0, warmup=2, min_repeat=5,
                    copy_mib=1024 if gpu else 256, budget_s=None,
                    train=[dict(B=(1 << 20) if gpu else 4096, K=8, D=4, C=8, hidden=(64, 64))], train_repeat=20,
                    sample=[dict(B=4096 if gpu else 128, n=256 if gpu else 32, K=8, D=4, C=8, hidden=(128, 128, 128))],
                    sample_repeat=10)
    if name == "full":
        if gpu:
            points = _sweep([65536, 262144, 1 << 22], [1, 2, 4, 16, 32, 64], [1, 2, 16, 32, 64],
                            base=(1 << 20, 8, 4), kd_batch=262144, bf16_b=[65536, 262144, 1 << 22])
            train = [dict(B=B, K=8, D=4, C=8, hidden=(64, 64)) for B in (65536, 1 << 20)]
            sample = [dict(B=B, n=256, K=8, D=4, C=8, hidden=(128, 128, 128)) for B in (1024, 16384)]
        else:
            points = _sweep([1024, 4096, 16384, 262144], [1, 4, 16, 64], [1, 16, 64], base=(65536, 8, 4),
                            kd_batch=4096, bf16_b=[4096], kd_passes=("fwd+bwd",))
            train = [dict(B=B, K=8, D=4, C=8, hidden=(64, 64)) for B in (4096, 65536)]
            sample = [dict(B=B, n=64, K=8, D=4, C=8, hidden=(128, 128, 128)) for B in (64, 256)]
        return dict(points=points, repeat=20, max_time=1.0 if gpu else 0.5, warmup=2, min_repeat=5,
                    copy_mib=2048 if gpu else 256, budget_s=None if gpu else 800,
                    train=train, train_repeat=20, sample=sample, sample_repeat=5)
    raise ValueError(f"unknown preset {name!r}")


# ----- ops --------------------------------------------------------------------------------------------

def _nan_stats(error: str) -> dict:
    nan = float("nan")
    return {"median_ms": nan, "p20_ms": nan, "p80_ms": nan, "n": 0, "peak_mb": nan, "error": error[:200]}


def _max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_op_point(op: str, B: int, K: int, D: int, dtype_name: str, passes, impls: dict, cfg: dict, device: str,
                   copy_gb_s: float, memory: bool) -> list[dict]:
    """Rows for one shape: per pass, every implementation timed in interleaved rounds (see
    ``timeit_interleaved``), then its peak memory; per implementation, its forward output against physmdn's."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(op, B, K, D, dtype, device)
    grad_inputs = requires_grad_copy(inputs)
    diff = grad_inputs[:3]
    with torch.no_grad():
        expected = impls["physmdn"](*inputs)
    rows, base = [], dict(section="ops", op=OP_LABELS[op], B=B, K=K, D=D, dtype=dtype_name)
    for pass_name in passes:
        calls = {}
        for name, fn in impls.items():
            if pass_name == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(*inputs)
                calls[name] = (call, None)
            elif pass_name == "fwd+bwd":
                calls[name] = ((lambda fn=fn: torch.autograd.grad(fn(*grad_inputs).sum(), diff)), None)
            else:  # bwd: the forward (and its graph) is built by setup, outside the timed region
                calls[name] = ((lambda loss: torch.autograd.grad(loss, diff)), (lambda fn=fn: fn(*grad_inputs).sum()))
        first, errors = {}, {}
        for name, (call, setup) in list(calls.items()):  # the first call: includes any compilation
            try:
                sync(device)
                t0 = time.perf_counter()
                call(setup()) if setup is not None else call()
                sync(device)
                first[name] = time.perf_counter() - t0
            except Exception as exc:  # an implementation that fails (or runs out of memory) is reported, not hidden
                errors[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
                del calls[name]
                _free(device)
        results = timeit_interleaved(calls, device, warmup=cfg["warmup"], repeat=cfg["repeat"],
                                     max_time=cfg["max_time"], min_repeat=cfg.get("min_repeat", 5))
        results.update({name: {"error": err} for name, err in errors.items()})
        for name in impls:
            stats = {"median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"), "n": 0,
                     "peak_mb": float("nan"), **results[name]}
            if "error" not in stats:
                call, setup = calls[name]
                try:
                    if memory:
                        stats["peak_mb"] = peak_memory_bytes(call, device, setup=setup, warm=False) / 2**20
                    if pass_name == passes[0]:
                        with torch.no_grad():
                            stats["max_rel_diff"] = _max_rel_diff(impls[name](*inputs), expected)
                except Exception as exc:
                    stats["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
                    _free(device)
            stats["first_call_s"] = first.get(name, float("nan"))
            results[name] = stats
        nbytes = op_bytes(inputs, pass_name)
        # what the call returns (the loss, or the gradients): the part of the peak no implementation can avoid
        # (not for bwd: physmdn's gradients may already exist, made by the untimed forward)
        returned = [expected] if pass_name == "fwd" else diff
        out_mb = sum(t.numel() * t.element_size() for t in returned) / 2**20
        for stats in results.values():
            stats["beyond_out_mb"] = stats["peak_mb"] - out_mb if pass_name != "bwd" else float("nan")
        ref = results["physmdn"]["median_ms"]
        for name, stats in results.items():
            t = stats["median_ms"]
            gb_s = nbytes / (t * 1e-3) / 1e9 if t == t and t > 0 else float("nan")
            rows.append({**base, "pass": pass_name, "impl": name, **stats, "bytes": nbytes, "gb_s": gb_s,
                         "pct_copy_bw": 100.0 * gb_s / copy_gb_s,
                         "physmdn_speedup": t / ref if ref == ref and ref > 0 else float("nan")})
    del inputs, grad_inputs, diff, expected
    _free(device)
    return rows


def op_summary(rows: list[dict]) -> list[dict]:
    """One row per (op, shape, dtype, pass): physmdn's numbers and its speedup over each other implementation."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["op"], r["B"], r["K"], r["D"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    for (op, B, K, D, dtype, pass_name), by_impl in groups.items():
        p = by_impl["physmdn"]
        s = {"op": op, "B": B, "K": K, "D": D, "dtype": SHORT_DTYPE[dtype], "pass": pass_name,
             "physmdn_ms": p["median_ms"], "p20-p80_ms": f"{p['p20_ms']:.3g}-{p['p80_ms']:.3g}",
             "peak_mb": p["peak_mb"], "eager_peak_mb": by_impl.get("eager", {}).get("peak_mb", float("nan")),
             "beyond_out_mb": p["beyond_out_mb"],
             "eager_beyond_out_mb": by_impl.get("eager", {}).get("beyond_out_mb", float("nan")),
             "GB/s": p["gb_s"], "%copy": p["pct_copy_bw"]}
        for name, label in (("eager", "x_eager"), ("torch.compile", "x_compile"), ("torch.distributions", "x_distr")):
            s[label] = by_impl[name]["physmdn_speedup"] if name in by_impl else ""
        errors = [f"{n}: {r['error']}" for n, r in by_impl.items() if r.get("error")]
        s["note"] = "; ".join(errors)[:120]
        out.append(s)
    return out


OP_SUMMARY_COLUMNS = ["op", "B", "K", "D", "dtype", "pass", "physmdn_ms", "p20-p80_ms", "peak_mb", "eager_peak_mb",
                      "beyond_out_mb", "eager_beyond_out_mb", "GB/s", "%copy", "x_eager", "x_compile", "x_distr", "note"]
OP_COLUMNS = ["op", "B", "K", "D", "dtype", "pass", "impl", "median_ms", "p20_ms", "p80_ms", "n", "peak_mb",
              "beyond_out_mb", "gb_s",
              "pct_copy_bw", "physmdn_speedup", "max_rel_diff", "first_call_s", "error"]


# ----- training ----------------------------------------------------------------------------------------

def training_losses() -> dict:
    """``{name: loss(mixture, y) -> scalar}`` (mean over the batch)."""
    poly = torch.tensor([0.0, 1.0, 0.0, -1.0])  # pitchfork r y - y^3, r = 1: a fixed law shared by all samples

    def physmdn_nll(mix, y):
        return physmdn.mixture_nll(mix.logits, mix.means, mix.log_scales, y, reduction="mean")

    def eager_nll(mix, y):
        return reference.mixture_nll(mix.logits, mix.means, mix.log_scales, y).mean()

    def distributions_nll(mix, y):
        return -mix.to_torch().log_prob(y).mean()

    def physmdn_poly(mix, y):
        return P.mdn_loss(mix.logits, mix.means, mix.log_scales, y, physics=P.Polynomial(poly.to(y.device)),
                          weight=0.5)

    def eager_poly(mix, y):
        penalty = P.physics_penalty(mix.logits, mix.means, mix.log_scales, P.Polynomial(poly.to(y.device)))
        return (reference.mixture_nll(mix.logits, mix.means, mix.log_scales, y) + 0.5 * penalty).mean()

    return {"physmdn": physmdn_nll, "eager": eager_nll, "torch.distributions": distributions_nll,
            "physmdn+poly": physmdn_poly, "eager+poly": eager_poly}


def bench_training(cfg: dict, device: str, repeat: int, max_time: float) -> list[dict]:
    B, K, D, C, hidden = cfg["B"], cfg["K"], cfg["D"], cfg["C"], tuple(cfg["hidden"])
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, generator=g, device=device)
    y = torch.randn(B, D, generator=g, device=device)
    steps = {}
    for name, loss_fn in training_losses().items():  # one model per loss, same initial weights
        torch.manual_seed(0)
        model = physmdn.MDN(C, D, K, hidden=hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss
        steps[name] = step
    results = timeit_interleaved(steps, device, warmup=3, repeat=repeat, max_time=max_time, min_repeat=5)
    for name, stats in results.items():
        if "error" in stats:
            results[name] = stats = {**_nan_stats(stats["error"])}
        stats["samples_per_s"] = B / (stats["median_ms"] * 1e-3)
    results = {name: results[name] for name in steps}
    del steps
    rows = []
    for name, stats in results.items():
        partner = "physmdn+poly" if name.endswith("+poly") else "physmdn"
        ref = results[partner]["samples_per_s"]
        rows.append({"section": "train", "impl": name, "B": B, "K": K, "D": D, "C": C,
                     "hidden": "x".join(map(str, hidden)),
                     "dtype": "float32", **stats, "physmdn_speedup": ref / stats["samples_per_s"]})
    _free(device)
    return rows


TRAIN_COLUMNS = ["impl", "B", "K", "D", "C", "hidden", "median_ms", "p20_ms", "p80_ms", "n", "samples_per_s",
                 "physmdn_speedup", "error"]


# ----- sampling ----------------------------------------------------------------------------------------

def bench_sampling(cfg: dict, device: str, repeat: int, max_time: float, steps: int = 32) -> list[dict]:
    B, n, K, D, C, hidden = cfg["B"], cfg["n"], cfg["K"], cfg["D"], cfg["C"], tuple(cfg["hidden"])
    torch.manual_seed(0)
    mdn = physmdn.MDN(C, D, K, hidden=hidden).to(device).eval()
    cfm = physmdn.CFM(C, D, hidden=hidden).to(device).eval()
    context = torch.randn(B, C, generator=torch.Generator(device=device).manual_seed(0), device=device)
    samplers = {
        "MDN.sample": (lambda: mdn(context).sample(n), 1),
        f"CFM.sample(steps={steps})": (lambda: cfm.sample(context, n, steps=steps, method="euler"), steps),
    }
    def checked(fn):
        def call():
            with torch.no_grad():
                out = fn()
            assert out.shape == (n, B, D), out.shape
            return out
        return call
    results = timeit_interleaved({name: checked(fn) for name, (fn, _) in samplers.items()}, device, warmup=1,
                                 repeat=repeat, max_time=max_time, min_repeat=3)
    for name, (_, evaluations) in samplers.items():
        stats = results[name]
        if "error" in stats:
            results[name] = stats = _nan_stats(stats["error"])
        stats["samples_per_s"] = n * B / (stats["median_ms"] * 1e-3)
        stats["network_evals"] = evaluations
    results = {name: results[name] for name in samplers}
    mdn_rate = results["MDN.sample"]["samples_per_s"]
    rows = [{"section": "sample", "impl": name, "B": B, "per_context": n, "K": K, "D": D, "C": C,
             "hidden": "x".join(map(str, hidden)), "dtype": "float32", **stats,
             "mdn_speedup": mdn_rate / stats["samples_per_s"]} for name, stats in results.items()]
    del mdn, cfm
    _free(device)
    return rows


SAMPLE_COLUMNS = ["impl", "B", "per_context", "K", "D", "C", "hidden", "network_evals", "median_ms", "p20_ms", "p80_ms",
                  "n", "samples_per_s", "mdn_speedup", "error"]


# ----- key numbers for bench/gpu_check.sh ----------------------------------------------------------------

def key_numbers(op_rows, sample_rows) -> list[str]:
    lines = []
    for s in op_summary(op_rows):
        if s["pass"] != "fwd+bwd":
            continue
        x = lambda v: f"{v:.2f}x" if isinstance(v, float) and v == v else "n/a"  # noqa: E731
        lines.append(f"{s['op']} {s['dtype']} B={s['B']} K={s['K']} D={s['D']}: fwd+bwd {s['physmdn_ms']:.3g} ms, "
                     f"{s['%copy']:.0f}% of copy bw, vs eager {x(s['x_eager'])}, vs compile {x(s['x_compile'])}"
                     + (f" [{s['note']}]" if s["note"] else ""))
    by_batch = {}
    for r in sample_rows:
        by_batch.setdefault((r["B"], r["per_context"]), {})[r["impl"]] = r
    for (B, n), rs in by_batch.items():
        parts = [f"{name} {r['samples_per_s']:.3g}/s" for name, r in rs.items()]
        cfm = [r for name, r in rs.items() if name.startswith("CFM")]
        ratio = f"{cfm[0]['mdn_speedup']:.1f}x" if cfm and cfm[0]["mdn_speedup"] == cfm[0]["mdn_speedup"] else "n/a"
        lines.append(f"sampling B={B} n={n}: " + ", ".join(parts) + f"; MDN/CFM {ratio}")
    return lines


class _Interrupted(BaseException):  # not an Exception: the per-implementation error handlers must not catch it
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(f"signal {signum}")


# ----- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the full sweep (the default; < 15 min on 2 CPU cores)")
    group.add_argument("--quick", action="store_true", help="small sweep (< 3 min on 2 CPU cores)")
    group.add_argument("--gpu-check", action="store_true", help="B in {64k, 1M, 4M}, K=8, D=4, fp32+bf16, fwd+bwd")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: check the plumbing of the chosen preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="ops,sample,train", help="comma-separated subset of ops,sample,train")
    p.add_argument("--ops", default="nll,physics", help="comma-separated subset of nll,physics")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time limit in seconds: once passed, the remaining op points are skipped and listed "
                        "(default: the preset's, 150 for --quick and 800 for the full sweep on a CPU, none otherwise; "
                        "0 turns it off)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--key-numbers", default=None, help="also write one line per key result to this file")
    args = p.parse_args(argv)

    name = "gpu-check" if args.gpu_check else "quick" if args.quick else "full"
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(name, device, args.dry_run)
    budget = cfg["budget_s"] if args.budget_s is None else (args.budget_s or None)
    sections = [s for s in args.sections.split(",") if s]
    ops = [o for o in args.ops.split(",") if o]
    try:
        load = os.getloadavg()
        load_start = "%.2f %.2f %.2f" % load
    except OSError:
        load, load_start = None, "unknown"
    contended = None
    cpus, threads = os.cpu_count() or 1, torch.get_num_threads()
    if device == "cpu" and load is not None and load[0] + min(threads, cpus) > cpus + 0.5:
        # other work + our threads > cores: a parallel region waits for a descheduled thread, often whole time slices
        contended = (f"load average {load[0]:.1f} on {cpus} CPUs before the start: other work shares the cores; "
                     f"timings with {threads} thread{'s' if threads > 1 else ''} may be inflated and noisy (compare "
                     f"ratios{', or rerun with --threads 1' if threads > 1 else ''})")
        print("warning: " + contended, flush=True)
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    skipped = []

    copy = copy_bandwidth(device, cfg["copy_mib"] << 20)
    print(f"copy bandwidth ({device}, {copy['buffer_mib']:.0f} MiB float32, read + write): {copy['gb_s']:.1f} GB/s "
          f"(median {copy['median_ms']:.3g} ms, p20-p80 {copy['p20_ms']:.3g}-{copy['p80_ms']:.3g})", flush=True)

    # Sampling and training first: short, one point each; the op sweep then runs against the budget.
    op_rows, train_rows, sample_rows = [], [], []
    interrupted = None
    signal.signal(signal.SIGTERM, _raise_interrupted)  # `timeout` sends TERM: save what was measured, then exit
    try:
        if "sample" in sections:
            for c in cfg["sample"]:
                sample_rows += bench_sampling(c, device, cfg["sample_repeat"], cfg["max_time"] * 3)
                print(f"[{elapsed():6.1f}s] sampling B={c['B']} n={c['n']}: "
                      + ", ".join(f"{r['impl']} {r['samples_per_s']:.3g}/s" for r in sample_rows[-2:]), flush=True)
        if "train" in sections:
            for c in cfg["train"]:
                train_rows += bench_training(c, device, cfg["train_repeat"], cfg["max_time"] * 2)
                print(f"[{elapsed():6.1f}s] training B={c['B']}: "
                      + ", ".join(f"{r['impl']} {r['samples_per_s']:.3g}/s" for r in train_rows[-5:]), flush=True)
        if "ops" in sections:
            impls = {op: implementations(op) for op in ops}
            seconds_per_unit = {}  # op -> seconds per (element * pass * dtype byte) of its latest point
            for B, K, D, dtype_name, passes in cfg["points"]:
                units = B * K * D * len(passes) * DTYPES[dtype_name].itemsize
                for op in ops:
                    predicted = seconds_per_unit.get(op, 0.0) * units
                    if budget is not None and elapsed() + predicted > budget:
                        skipped.append(f"{OP_LABELS[op]} B={B} K={K} D={D} {dtype_name}")
                        continue
                    t0 = time.perf_counter()
                    rows = bench_op_point(op, B, K, D, dtype_name, passes, impls[op], cfg, device, copy["gb_s"],
                                          memory=not args.no_memory)
                    seconds_per_unit[op] = (time.perf_counter() - t0) / units
                    op_rows += rows
                    last = [r for r in rows if r["pass"] == passes[-1]]
                    print(f"[{elapsed():6.1f}s] {OP_LABELS[op]} B={B} K={K} D={D} {dtype_name} "
                          f"({time.perf_counter() - t0:.1f}s): {passes[-1]} "
                          + ", ".join(f"{r['impl']} {r['median_ms']:.3g} ms" for r in last), flush=True)
    except _Interrupted as exc:
        interrupted = str(exc)
        print(f"interrupted ({interrupted}) after {elapsed():.0f} s: saving the rows measured so far", flush=True)

    # the same probe again: on a shared host the memory system's speed drifts within a run (measured here: the
    # same kernel 1x or 3x slower for seconds at a time); a large change says the run's absolute times are suspect
    copy_end = copy_bandwidth(device, cfg["copy_mib"] << 20) if not interrupted else None
    info = machine_info(device)  # after the run: the load average it ran under
    info["load_average_at_start"] = load_start
    if contended:
        info["warning"] = contended
    info["preset"] = name + (" (dry run: tiny sizes)" if args.dry_run else "")
    info["copy_bandwidth"] = (f"{copy['gb_s']:.1f} GB/s (dst.copy_(src), {copy['buffer_mib']:.0f} MiB float32, "
                              f"read + write counted; p20-p80 {copy['p20_ms']:.3g}-{copy['p80_ms']:.3g} ms)")
    if copy_end is not None:
        info["copy_bandwidth_end"] = f"{copy_end['gb_s']:.1f} GB/s (the same probe after the run)"
    info["torch.compile"] = "default mode, batch dimension marked dynamic (one compile per K, D, dtype, grad mode)"
    info["wall_s"] = f"{elapsed():.0f}"
    title = f"bench/run.py --{name}" + (" --dry-run" if args.dry_run else "")
    notes = ("physmdn_speedup / x_eager / x_compile / x_distr: that implementation's median time divided by "
             "physmdn's (> 1: physmdn faster). %copy: (inputs read + outputs written) / median time, as a percentage "
             "of the copy bandwidth above; above 100% means the data sat in cache. bwd: autograd.grad on a graph whose "
             "forward ran outside the timed region; physmdn's ops compute their gradients inside a grad-enabled forward "
             "(the fused loss: when the law's coefficients need no gradient), so their bwd only hands them over "
             "(loss.sum(): upstream gradient 1) and the fwd+bwd column is the one to compare. peak_mb: allocations "
             "during the call beyond its inputs. beyond_out_mb: peak_mb less what the call returns (the loss for fwd, "
             "the gradients for fwd+bwd), i.e. the intermediates and workspace (not given for bwd).")
    text = info_header(title, info)
    if op_rows:
        text += ("### Ops (physmdn per shape and pass)\n\n" + format_table(op_summary(op_rows), OP_SUMMARY_COLUMNS)
                 + "\n\n")
    if train_rows:
        text += ("### MDN training step (forward + loss + backward + Adam)\n\n"
                 + format_table(train_rows, TRAIN_COLUMNS) + "\n\n")
    if sample_rows:
        text += "### Sampling\n\n" + format_table(sample_rows, SAMPLE_COLUMNS) + "\n\n"
    text += notes + "\n\n"
    if skipped:
        text += f"Skipped (over the {budget:.0f} s budget): " + "; ".join(skipped) + "\n\n"
    if interrupted:
        text += f"INTERRUPTED ({interrupted}) after {elapsed():.0f} s: the tables hold what was measured before.\n\n"
    print("\n" + text, flush=True)
    if op_rows:
        text += "### Ops, every implementation\n\n" + format_table(op_rows, OP_COLUMNS) + "\n\n"
    if not args.no_save:
        meta = {"benchmark": title, "date": info["date"], "torch": info["torch"], "device": device,
                "load_average": info.get("load_average", ""), "threads": torch.get_num_threads(), "git": info["git"],
                "copy_gb_s": copy["gb_s"]}
        md = append_markdown(text, device, args.results_dir)
        csv_path = append_csv([{**meta, **r} for r in op_rows + train_rows + sample_rows], device, args.results_dir)
        print(f"appended to {md} and {csv_path}")
    if args.key_numbers:
        lines = [f"copy bandwidth {copy['gb_s']:.1f} GB/s"] + key_numbers(op_rows, sample_rows)
        if skipped:
            lines.append("skipped over budget: " + "; ".join(skipped))
        if interrupted:
            lines.append(f"interrupted ({interrupted}) after {elapsed():.0f} s")
        with open(args.key_numbers, "w") as f:
            f.write("\n".join(lines) + "\n")
    failed = [r for r in op_rows + train_rows + sample_rows
              if r.get("error") and r.get("impl", "").startswith(("physmdn", "MDN"))]
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
