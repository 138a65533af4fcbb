"""Where a profiled program's time goes: a JSON summary of a `jax.profiler.trace` (perfetto) capture.

`summarize(trace_dir)` reads the newest `perfetto_trace.json.gz` under `trace_dir` (written by
`jax.profiler.trace(dir, create_perfetto_trace=True)`) and sums the complete events ("ph": "X") of the device
threads (GPU streams, TPU cores; on CPU the XLA worker threads) by name and by category, so a reader sees at a
glance whether convolutions, matrix products, elementwise fusions, reductions or copies dominate, and how busy
the device was over the captured wall time.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

# First matching pattern wins; names are cuDNN/cuBLAS/XLA kernel or HLO op names, lower-cased.
CATEGORIES = (
    ("convolution", r"conv|cudnn|xmma|implicit_gemm|winograd|dgrad|wgrad|fprop"),
    # XLA:CPU hands convolutions and dots (with what fuses around them) to XNNPACK/YNNPACK or oneDNN
    ("XNNPACK/oneDNN fusion (conv, dot)", r"^[xy]nn_fusion|onednn"),
    ("matmul", r"gemm|cublas|matmul|dot|sm\d+_xmma|cutlass"),
    ("reduction", r"reduce|reduction"),
    ("copy/transpose", r"copy|memcpy|memset|transpose|dynamic.update|dynamic_update|slice"),
    ("sort/gather/scatter", r"gather|scatter|sort|take"),
    ("elementwise fusion", r"fusion|loop_|input_|elementwise|add|multiply|convert"),
)
_HOST_ONLY = re.compile(r"^(python|.*pjrt.*client.*|.*threadpool.*)$", re.IGNORECASE)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def _trace_file(trace_dir: str | pathlib.Path) -> pathlib.Path:
    files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True")
    return files[-1]


def summarize(trace_dir: str | pathlib.Path, top: int = 15) -> dict:
    """{device_threads, busy_s, wall_s, busy_fraction, by_category, top_ops} of the newest trace."""
    events = json.loads(gzip.decompress(_trace_file(trace_dir).read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    device_pids = {pid for pid, name in process.items() if name.startswith("/device:")}

    def on_device(e) -> bool:
        if device_pids:
            return e["pid"] in device_pids
        return not _HOST_ONLY.match(thread.get((e["pid"], e.get("tid")), "python"))

    spans = [e for e in events if e.get("ph") == "X" and "dur" in e and on_device(e)]
    spans = [e for e in spans if not e["name"].startswith(("end:", "ThunkExecutor", "$"))]
    if not spans:
        return {"device_threads": [], "busy_s": 0.0, "wall_s": 0.0, "by_category": {}, "top_ops": []}
    by_name: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in spans:
        by_name[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    by_category: collections.Counter = collections.Counter()
    for name, dur in by_name.items():
        by_category[category(name)] += dur
    busy = sum(by_name.values())
    wall = max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)
    threads = sorted({thread.get((e["pid"], e.get("tid")), str(e.get("tid"))) for e in spans})
    return {
        "trace": str(_trace_file(trace_dir)),
        "device_threads": threads,
        "busy_s": busy / 1e6,
        "wall_s": wall / 1e6,
        "busy_fraction": busy / wall / max(len(threads), 1) if wall else None,
        "by_category": {k: {"s": v / 1e6, "fraction": v / busy} for k, v in by_category.most_common()},
        "top_ops": [
            {"name": n[:160], "s": d / 1e6, "fraction": d / busy, "calls": calls[n], "category": category(n)}
            for n, d in by_name.most_common(top)
        ],
    }


def format_summary(summary: dict) -> str:
    """A few lines for a log: the categories, then the top operations."""
    lines = [
        f"profile: {summary['busy_s'] * 1e3:.1f} ms busy on {len(summary['device_threads'])} device thread(s) "
        f"over {summary['wall_s'] * 1e3:.1f} ms wall"
    ]
    lines += [f"  {k:<22} {v['fraction'] * 100:5.1f}%" for k, v in summary["by_category"].items()]
    lines += [f"  {op['fraction'] * 100:5.1f}%  x{op['calls']:<5} {op['name'][:90]}" for op in summary["top_ops"][:8]]
    return "\n".join(lines)
