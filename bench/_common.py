"""Shared benchmark helpers: timing (median, p20/p80), peak memory, machine facts, result tables.

Timings compare implementations in one run, as ratios. CPU peak memory is the high-water mark of bytes
allocated through torch's CPU allocator during one call (torch.profiler memory events); CUDA peak memory is
``torch.cuda.max_memory_allocated`` over the call. Both exclude the inputs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str = "cpu", warmup: int = 3, repeat: int = 20, min_time: float = 0.0) -> dict:
    """Median and p20/p80 of ``repeat`` timed calls (after ``warmup``), in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeat:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "n": len(times)}


def peak_memory_bytes(fn, device: str = "cpu") -> int:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it."""
    fn()  # warm (compilation, lazy init)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tempfile.mktemp(suffix=".json")
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        if os.path.exists(path):
            os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events if e["args"].get("Device Type", 0) == 0]
    return int(max(totals)) if totals else 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    import physmdn

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "physmdn": physmdn.__version__,
        "cpu_isa": physmdn.build_info()["cpu_isa"],
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["load_average"] = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        pass
    return info


def machine_tag(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name().replace(" ", "-")
    else:
        name = f"cpu{os.cpu_count()}"
    return "".join(c for c in name if c.isalnum() or c in "-_").lower()


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, device: str, info: dict, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Print the table and append it (markdown) and the rows (CSV) under bench/results/."""
    import csv

    table = format_table(rows, columns)
    header = f"## {name} ({info['date']})\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n"
    text = header + table + ("\n\n" + notes if notes else "") + "\n\n"
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = machine_tag(device)
    with open(os.path.join(out_dir, f"{tag}.md"), "a") as f:
        f.write(text)
    csv_path = os.path.join(out_dir, f"{tag}.csv")
    new = not os.path.exists(csv_path)
    keys = ["benchmark", "date", "torch", "device"] + columns
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"benchmark": name, "date": info["date"], "torch": info["torch"], "device": device, **r})
    print(text)
    return text


COLUMNS = ["shape", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mb", "physmdn_speedup"]


def compare_impls(impls: dict, make_inputs, device: str, shape: str, passes=("fwd", "fwd+bwd"), repeat: int = 20,
                  memory: bool = True) -> list[dict]:
    """Time each implementation ``impls[name](*inputs) -> loss [B]`` forward and forward+backward.

    ``physmdn_speedup`` of a row = its median / physmdn's median for the same pass (> 1: physmdn is faster).
    """
    rows = []
    for pass_name in passes:
        results = {}
        for name, fn in impls.items():
            inputs = make_inputs(requires_grad=(pass_name != "fwd"))
            diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            if pass_name == "fwd":
                def call(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        return fn(*inputs)
            else:
                def call(fn=fn, inputs=inputs, diff=diff):
                    loss = fn(*inputs).sum()
                    return torch.autograd.grad(loss, diff)
            try:
                stats = timeit(call, device, repeat=repeat)
                stats["peak_mb"] = peak_memory_bytes(call, device) / 2**20 if memory else float("nan")
            except Exception as exc:  # an implementation that fails is reported, not hidden
                stats = {"median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"),
                         "peak_mb": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:120]}
            results[name] = stats
        ref = results.get("physmdn", {}).get("median_ms", float("nan"))
        for name, stats in results.items():
            rows.append({"shape": shape, "impl": name, "pass": pass_name, **stats,
                         "physmdn_speedup": stats["median_ms"] / ref if ref == ref and ref > 0 else float("nan")})
    return rows


def base_parser(description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=65536)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--D", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--sweep", default="", help="comma-separated batch sizes for a sweep over B")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-save", action="store_true")
    return p
