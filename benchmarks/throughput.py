#!/usr/bin/env python
"""Throughput of our distillation step next to PyTorch's (eager fp32, eager AMP, torch.compile AMP), in one run.

    python benchmarks/throughput.py                    # GPU: batch 256,1024, bf16_fold and f32_nofold, scan
    python benchmarks/throughput.py --quick            # CPU: batch 8,16, 2 steps, no torch.compile
    python benchmarks/throughput.py --profile /tmp/p --breakdown   # where the time goes

Writes a JSON (default benchmarks/results/throughput_<platform>_<date>[_quick].json); benchmarks/README.md says
how to read it. What is timed: benchmarks/timing.py and benchmarks/torch_reference.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import timing  # noqa: E402
import torch_reference  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU sizes: batch 8,16, 2 steps, 1 rep, no torch.compile")
    p.add_argument("--batch-sizes", help="comma-separated (default 256,1024; --quick 8,16)")
    p.add_argument("--steps", type=int, help="steps per timed repetition (default 30; --quick 2)")
    p.add_argument("--reps", type=int, help="timed repetitions, median reported (default 3; --quick 1)")
    p.add_argument("--configs", default="bf16_fold,f32_nofold", help=f"among {','.join(timing.JAX_CONFIGS)}")
    p.add_argument("--forms", help=f"among {','.join(timing.FORMS)} (default scan; --quick scan,dispatch)")
    p.add_argument("--torch-modes", default=",".join(torch_reference.MODES), help="'' for none")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    p.add_argument("--profile", metavar="DIR", help="trace one repetition of the first config at the last batch")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the teacher forward alone and the student CE step alone (first config, last batch)",
    )
    p.add_argument("--out", help="JSON path")
    args = p.parse_args(argv)
    q = args.quick
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16" if q else "256,1024")).split(",")]
    args.steps, args.reps = args.steps or (2 if q else 30), args.reps or (1 if q else 3)
    args.configs = args.configs.split(",")
    args.forms = (args.forms or ("scan,dispatch" if q else "scan")).split(",")
    args.torch_modes = [m for m in args.torch_modes.split(",") if m and not (q and m.startswith("compile"))]
    for flag, given, known in (
        ("--configs", args.configs, timing.JAX_CONFIGS),
        ("--forms", args.forms, timing.FORMS),
        ("--torch-modes", args.torch_modes, torch_reference.MODES),
    ):
        if set(given) - set(known):
            p.error(f"{flag}: unknown {sorted(set(given) - set(known))}; expected some of {tuple(known)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start, host = time.perf_counter(), timing.host_info()
    ceiling = timing.ceiling_for(host["device_kind"])
    print(
        f"device: {host['platform']} {host['device_kind']} x{host['num_devices']}, jax {host['jax']}, "
        f"torch {host.get('torch')}",
        flush=True,
    )
    jax_results, rows = {}, {}
    for label in args.configs:
        dtype, fold = timing.JAX_CONFIGS[label]
        for i, batch in enumerate(args.batch_sizes):
            try:
                bench = timing.Bench(batch, dtype, fold, args.steps)
                profile = args.profile if label == args.configs[0] and i == len(args.batch_sizes) - 1 else None
                result = {
                    form: timing.time_form(bench, form, args.reps, profile if form == args.forms[0] else None)
                    for form in args.forms
                }
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large batch: record and go on
                result = {"error": f"{type(err).__name__}: {err}"[:2000]}
            jax_results.setdefault(label, {})[str(batch)] = result
            for form in args.forms:
                rows.setdefault(f"jax {form} {label}", {})[batch] = result.get(form, {}).get("img_per_s")
            print(
                f"jax {label} B={batch}: "
                + ", ".join(
                    f"{f} {r['img_per_s']:.1f} img/s (compile {r['compile_s']:.1f} s)"
                    for f, r in result.items()
                    if f in args.forms
                )
                + result.get("error", ""),
                flush=True,
            )
    breakdown = _breakdown(args, jax_results) if args.breakdown else None
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    torch_results = {}
    for mode in args.torch_modes:
        for batch in args.batch_sizes:
            r = torch_reference.benchmark_torch(mode, batch, steps=args.steps, warmup=2 if args.quick else 5)
            torch_results.setdefault(mode, {})[str(batch)] = r
            rows.setdefault(f"torch {mode}", {})[batch] = r.get("img_per_s")
            print(f"torch {mode} B={batch}: {r.get('img_per_s', r.get('error', ''))}", flush=True)
    text = timing.table(rows, args.batch_sizes)
    print("\n" + text)
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/throughput.py", *(argv or sys.argv[1:])]),
        "host": host,
        "ceiling": ceiling,
        "flop_per_image": timing.FLOP_PER_IMAGE,
        "settings": vars(args),
        "jax": jax_results,
        "torch": torch_results,
        "img_per_s": {name: {str(b): v for b, v in vals.items()} for name, vals in rows.items()},
        "ratios": timing.ratios(rows, args.batch_sizes),
        "breakdown": breakdown,
        "table": text,
        "wall_s": time.perf_counter() - t_start,
    }
    out = pathlib.Path(
        args.out
        or HERE / "results" / f"throughput_{host['platform']}_{now:%Y%m%d}{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    return result


def _breakdown(args, jax_results: dict) -> dict:
    """The distill step taken apart at the first config's largest batch: teacher forward, student CE step."""
    label, batch = args.configs[0], args.batch_sizes[-1]
    form = args.forms[0]  # scan on an accelerator, dispatch (the CPU default path) when timed on CPU
    distill = jax_results[label][str(batch)].get(form)
    if distill is None:
        return {"error": f"no {form} measurement of {label} at batch {batch} to compare with"}
    dtype, fold = timing.JAX_CONFIGS[label]
    teacher_ms = timing.teacher_forward_ms(timing.Bench(batch, dtype, fold, args.steps), args.reps)
    student_ms = timing.time_form(timing.Bench(batch, dtype, fold, args.steps, loss="ce"), form, args.reps)["step_ms"]
    out = {
        "config": label,
        "form": form,
        "batch_size": batch,
        "distill_step_ms": distill["step_ms"],
        "teacher_forward_ms": teacher_ms,
        "student_ce_step_ms": student_ms,
        "rest_ms": distill["step_ms"] - teacher_ms - student_ms,
    }
    print(
        f"breakdown {label} B={batch}: distill {distill['step_ms']:.2f} ms = teacher forward {teacher_ms:.2f} ms "
        f"+ student CE step {student_ms:.2f} ms + rest {out['rest_ms']:.2f} ms",
        flush=True,
    )
    return out


if __name__ == "__main__":
    main()
