"""Shared benchmark helpers: timing (median, p20/p80; several implementations interleaved), peak memory, the
copy-bandwidth roofline, machine facts, result tables (markdown + CSV under bench/out/, ignored by git).

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
import subprocess
import tempfile
import time

# Kineto (the profiler behind CPU peak memory) logs every start/stop at its USDT level (5); read when torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str = "cpu", warmup: int = 3, repeat: int = 20, min_time: float = 0.0,
           max_time: float | None = None, min_repeat: int = 5, setup=None) -> dict:
    """Median and p20/p80 of timed calls (after ``warmup``), in milliseconds.

    At least ``repeat`` calls (and ``min_time`` seconds), unless ``max_time`` seconds of timed calls pass first,
    then at least ``min_repeat``; never more than ``10 * repeat``. With ``setup``, each call is
    ``fn(setup())`` and only ``fn`` is timed (e.g. a forward pass outside the timed backward).
    """
    for _ in range(warmup):
        fn(setup()) if setup is not None else fn()
    sync(device)
    times = []
    while True:
        times.append(_time_once(fn, device, setup))
        spent = sum(times) / 1e3
        if len(times) >= 10 * repeat:
            break
        if len(times) >= repeat and spent >= min_time:
            break
        if max_time is not None and spent >= max_time and len(times) >= min_repeat:
            break
    return _stats(times)


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "n": len(times)}


def _time_once(fn, device: str, setup=None) -> float:
    """Milliseconds of one call of ``fn`` (``fn(setup())``, ``setup`` untimed)."""
    run = (lambda arg=setup(): fn(arg)) if setup is not None else fn
    sync(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def timeit_interleaved(calls: dict, device: str = "cpu", warmup: int = 2, repeat: int = 20,
                       max_time: float | None = None, min_repeat: int = 5) -> dict:
    """Time several implementations in rounds, one call of each per round (order rotating), so that a change in
    background load (a shared machine) hits all of them alike and their ratios stay meaningful.

    ``calls``: ``{name: fn}`` or ``{name: (fn, setup)}``. Runs ``repeat`` rounds, or fewer (at least
    ``min_repeat``) once the rounds took ``max_time * len(calls)`` seconds. Returns ``{name: stats}`` as
    :func:`timeit`; an implementation that raises gets ``{"error": ...}`` and leaves the rounds.
    """
    calls = {k: (v if isinstance(v, tuple) else (v, None)) for k, v in calls.items()}
    errors = {}
    for name, (fn, setup) in list(calls.items()):
        try:
            for _ in range(warmup):
                fn(setup()) if setup is not None else fn()
            sync(device)
        except Exception as exc:  # reported by the caller, not hidden
            errors[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
            del calls[name]
    times = {name: [] for name in calls}
    names, spent, rounds = list(calls), 0.0, 0
    while names and rounds < repeat:
        if max_time is not None and rounds >= min_repeat and spent >= max_time * len(names):
            break
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            fn, setup = calls[name]
            try:
                t = _time_once(fn, device, setup)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
                continue
            times[name].append(t)
            spent += t / 1e3
        names = [n for n in names if n not in errors]
        rounds += 1
    out = {name: _stats(ts) for name, ts in times.items() if ts and name not in errors}
    out.update({name: {"error": err} for name, err in errors.items()})
    return out


def peak_memory_bytes(fn, device: str = "cpu", setup=None, warm: bool = True) -> int:
    """Peak bytes allocated by one call of ``fn`` (``fn(setup())`` with ``setup``) beyond what was allocated
    before it (``setup``'s allocations, e.g. a retained forward graph, excluded)."""
    if warm:  # compilation, lazy init
        fn(setup()) if setup is not None else fn()
    run = (lambda arg=setup(): fn(arg)) if setup is not None else fn
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        if os.path.exists(path):
            os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events if e["args"].get("Device Type", 0) == 0]
    return int(max(totals)) if totals else 0


def with_cuda_lanes(on: bool, fn):
    """``fn`` wrapped to run with the CUDA lane-per-element schedule of the mixture NLL on / off
    (``physmdn._C.set_cuda_lanes_schedule``), the previous setting restored after each call. In a build without the
    schedule (CMake option ``PHYSMDN_CUDA_LANES``) ``fn`` runs as it is: only CPU dry runs reach that (the GPU check
    installs a build with it), where the switch changes nothing."""
    import physmdn

    if on and not physmdn.build_info()["cuda_lanes_schedule"]:
        return fn

    def run(*args):
        prev = physmdn._C.set_cuda_lanes_schedule(on)
        try:
            return fn(*args)
        finally:
            physmdn._C.set_cuda_lanes_schedule(prev)
    return run


def copy_bandwidth(device: str, nbytes: int, repeat: int = 20, max_time: float = 2.0) -> dict:
    """The roofline: achieved bandwidth of ``dst.copy_(src)`` on ``device`` for ``nbytes``-byte float32 buffers,
    counting read + write (``2 * nbytes`` per call). Returns bytes, median/p20/p80 ms and ``gb_s`` (1e9 B/s)."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = timeit(lambda: dst.copy_(src), device, warmup=3, repeat=repeat, max_time=max_time)
    moved = 2 * n * 4
    stats.update(bytes=moved, gb_s=moved / (stats["median_ms"] * 1e-3) / 1e9, buffer_mib=n * 4 / 2**20)
    del src, dst
    return stats


def cpu_model() -> str:
    """The model name, with the x86 family / model numbers (a VM's "AMD EPYC" alone does not tell Zen 3 from
    Zen 4: family 25, models 0-15 and 16-31 on AMD)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def git_revision() -> str:
    """``<short sha>[+dirty]`` of the checkout the benchmark runs from, or ``unknown`` (no git, no .git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str) -> dict:
    import physmdn

    build = physmdn.build_info()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "physmdn": physmdn.__version__,
        "git": git_revision(),
        "cpu_isa": build["cpu_isa"],
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["physmdn_cuda_arch"] = build.get("cuda_arch_list", "")
        if hasattr(physmdn._C, "cuda_lanes_schedule"):
            info["cuda_lanes_schedule"] = physmdn._C.cuda_lanes_schedule()
    try:
        info["load_average"] = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        pass
    # transparent huge pages: the kernel's mode and torch's opt-in for its CPU allocations (inputs of the ops);
    # physmdn's buffer pool asks for them on its own large outputs (measured: 5-10 % per op on a VM)
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["thp"] = f.read().strip()
    except OSError:
        pass
    info["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
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
            if v != v:
                return "nan"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


# Runs write here (ignored by git), never to tracked files; curated baselines live in bench/baselines/.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def append_markdown(text: str, device: str, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{machine_tag(device)}.md")
    with open(path, "a") as f:
        f.write(text)
    return path


def append_csv(rows: list[dict], device: str, out_dir: str = RESULTS_DIR) -> str:
    """Append ``rows`` to ``<machine>.csv``. Columns are the union of the file's and the rows' keys, in order
    of first appearance; when new columns appear, the file is rewritten with the wider header (old rows
    get empty cells), so one CSV per machine stays readable by any CSV reader."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{machine_tag(device)}.csv")
    old_rows, keys = [], []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            old_rows = list(reader)
    n_old_keys = len(keys)
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    if len(keys) != n_old_keys or not old_rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(old_rows)
            w.writerows(rows)
    else:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=keys, extrasaction="ignore").writerows(rows)
    return path


def info_header(name: str, info: dict) -> str:
    return f"## {name} ({info['date']})\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n"


def write_results(name: str, device: str, info: dict, rows: list[dict], columns: list[str], notes: str = "",
                  out_dir: str = RESULTS_DIR) -> str:
    """Print the table and append it (markdown) and the rows (CSV) to ``out_dir`` (default bench/out/)."""
    table = format_table(rows, columns)
    text = info_header(name, info) + table + ("\n\n" + notes if notes else "") + "\n\n"
    append_markdown(text, device, out_dir)
    append_csv([{"benchmark": name, "date": info["date"], "torch": info["torch"], "device": device, **r} for r in rows],
               device, out_dir)
    print(text)
    return text


COLUMNS = ["shape", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mb", "physmdn_speedup"]


def compare_impls(impls: dict, make_inputs, device: str, shape: str, passes=("fwd", "fwd+bwd"), repeat: int = 20,
                  memory: bool = True) -> list[dict]:
    """Time each implementation ``impls[name](*inputs) -> loss [B]`` forward and forward+backward, in interleaved
    rounds (:func:`timeit_interleaved`).

    ``physmdn_speedup`` of a row = its median / physmdn's median for the same pass (> 1: physmdn is faster).
    """
    nan = float("nan")
    rows = []
    for pass_name in passes:
        calls = {}
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
            calls[name] = call
        results = timeit_interleaved(calls, device, warmup=3, repeat=repeat)
        for name, stats in results.items():
            if "error" in stats:  # an implementation that fails is reported, not hidden
                results[name] = {"median_ms": nan, "p20_ms": nan, "p80_ms": nan, "peak_mb": nan, **stats}
                continue
            try:
                stats["peak_mb"] = peak_memory_bytes(calls[name], device, warm=False) / 2**20 if memory else nan
            except Exception as exc:
                stats.update(peak_mb=nan, error=f"{type(exc).__name__}: {exc}"[:120])
        ref = results.get("physmdn", {}).get("median_ms", nan)
        for name in impls:
            stats = results[name]
            rows.append({"shape": shape, "impl": name, "pass": pass_name, **stats,
                         "physmdn_speedup": stats["median_ms"] / ref if ref == ref and ref > 0 else nan})
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


def report_with_copy(name: str, device: str, rows: list[dict], copy_gb_s: float, pass_bytes, notes: str,
                     args) -> None:
    """Add ``GB/s`` and ``%copy`` to the rows of a benchmark (``pass_bytes(row)``: the bytes the row's pass moves at
    least; ``copy_gb_s``: the copy bandwidth measured in the same run), round them, print or save their table with
    the standard notes and ``notes`` (``args.no_save``, ``args.results_dir``), and print one ``key:`` line per physmdn
    row with its speedups."""
    for r in rows:
        gb_s = pass_bytes(r) / (r["median_ms"] * 1e-3) / 1e9
        r.update({"GB/s": gb_s, "%copy": 100.0 * gb_s / copy_gb_s})
    notes = (f"copy bandwidth {copy_gb_s:.1f} GB/s (dst.copy_(src), read + write). physmdn_speedup: the row's median "
             "over physmdn's in the same pass and run (> 1: physmdn is faster). GB/s: the bytes the pass moves at least "
             "over the row's median; %copy: as a percentage of the copy bandwidth. physmdn's CPU peak memory misses "
             "its buffer pool (invisible to the profiler). " + notes).strip()
    for r in rows:
        for k in ("median_ms", "p20_ms", "p80_ms", "peak_mb", "physmdn_speedup", "GB/s", "%copy"):
            if isinstance(r.get(k), float) and r[k] == r[k]:
                r[k] = round(r[k], 3 if k == "physmdn_speedup" else 1)
    columns = COLUMNS + ["GB/s", "%copy"]
    if args.no_save:
        print(format_table(rows, columns))
        print(notes)
    else:
        write_results(name, device, machine_info(device), rows, columns, notes, args.results_dir)
    for r in rows:
        if r["impl"] == "physmdn":
            others = ", ".join(f"x{o['physmdn_speedup']} vs {o['impl']}" for o in rows
                               if o["shape"] == r["shape"] and o["pass"] == r["pass"] and o["impl"] != "physmdn")
            print(f"key: {r['shape']} {r['pass']}: physmdn {r['median_ms']} ms, {r['GB/s']} GB/s = {r['%copy']}% of "
                  f"copy ({others})", flush=True)


def announced_copy_bandwidth(device: str) -> float:
    """The copy bandwidth (GB/s) of ``device`` over a 1 GiB (GPU) or 64 MiB (CPU) buffer, printed."""
    gb_s = copy_bandwidth(device, (1024 if device.startswith("cuda") else 64) << 20)["gb_s"]
    print(f"copy bandwidth ({device}): {gb_s:.1f} GB/s", flush=True)
    return gb_s
