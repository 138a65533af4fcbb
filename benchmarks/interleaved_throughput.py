#!/usr/bin/env python
"""Our distillation step against torch.compile's, timed in interleaved repetitions on the same device, so that a
drift of the machine (clocks, a neighbour, the other framework's caches) hits both sides alike.

    python benchmarks/interleaved_throughput.py --out results/interleaved_h200.json          # accelerator
    python benchmarks/interleaved_throughput.py --cpu --out /tmp/i.json                       # CPU rehearsal

Each side is built and warmed up once (ours: the compile of its program; torch: its warm-up steps, which compile
under torch.compile); then `--reps` repetitions, each timing `--steps` steps of ours and `--steps` steps of theirs
back to back, the side that goes first alternating (ours-theirs, theirs-ours, ...: a linear drift cancels in each
pair of pairs). The ratio of a repetition is our img/s over theirs; reported: the median of those ratios, their
min/max and quartiles, and each side's median img/s. The work is throughput.py's: resnet56 (frozen, eval mode, BN
calibrated on one batch) -> resnet20, CE + T^2 KL (T=4) + MSE of the 3 stage outputs, SGD momentum 0.9, weight decay
5e-4; ours as a run builds it (gather, `cifar` augmentation, normalisation and step in one compiled program, bf16 with
the teacher's BN folded by default), theirs on one device-resident batch (benchmarks/torch_reference.py).
--cpu: tiny sizes (resnet8 -> resnet8, batch 8, 2 steps, 5 repetitions, one step per dispatch) against torch eager
fp32 (torch.compile on a busy CPU takes minutes): it rehearses the procedure; its numbers mean nothing on a shared
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # JAX and torch share one GPU (before jax loads)
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
import torch_reference as tr  # noqa: E402

from extkd_jax.models import forward_with_segments  # noqa: E402
from extkd_jax.train import sharding  # noqa: E402
from extkd_jax.train.epoch import epoch_permutation, make_run_steps  # noqa: E402
from extkd_jax.train.setup import DTYPES, build, build_model  # noqa: E402
from extkd_jax.train.step import Network, normalize, split  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes against torch eager fp32 (a rehearsal)")
    p.add_argument("--batch-size", type=int, help="default 1024; --cpu 8")
    p.add_argument("--steps", type=int, help="steps per timed side of a repetition (default 30; --cpu 2)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 9; --cpu 5)")
    p.add_argument("--config", default="bf16_fold", choices=sorted(timing.JAX_CONFIGS), help="ours (timing.py)")
    p.add_argument("--form", choices=timing.FORMS, help="ours: scan (default) or dispatch (--cpu)")
    p.add_argument("--torch-mode", choices=tr.MODES, help="theirs (default compile_amp_bf16; --cpu eager_fp32)")
    p.add_argument("--teacher", help="default resnet56; --cpu resnet8")
    p.add_argument("--student", help="default resnet20; --cpu resnet8")
    p.add_argument("--warmup", type=int, default=5, help="torch warm-up steps (the compile happens in the first)")
    p.add_argument("--out", help="JSON path (default results/interleaved_<platform>_<date>.json)")
    args = p.parse_args(argv)
    cpu = args.cpu
    defaults = {  # (accelerator, --cpu)
        "batch_size": (1024, 8),
        "steps": (30, 2),
        "reps": (9, 5),
        "form": ("scan", "dispatch"),
        "torch_mode": ("compile_amp_bf16", "eager_fp32"),
        "teacher": ("resnet56", "resnet8"),
        "student": ("resnet20", "resnet8"),
    }
    for key, values in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, values[int(cpu)])
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--reps", args.reps)):
        if value < 1:
            p.error(f"{flag}={value}: expected at least 1")
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if not name.startswith("resnet") or not name[6:].isdigit() or (int(name[6:]) - 2) % 6:
            p.error(f"{flag}={name}: expected a CIFAR resnet of depth 6n+2 (resnet8, resnet20, resnet56, ...)")
    return args


class Ours:
    """Our step as a run builds it (timing.Bench's, for any teacher/student pair), on device-resident random data."""

    def __init__(self, args: argparse.Namespace, seed: int = 0):
        dtype, fold = timing.JAX_CONFIGS[args.config]
        self.batch_size, self.steps, self.form = args.batch_size, args.steps, args.form
        self.mesh = sharding.make_mesh()
        rng = np.random.default_rng(seed)
        n = self.batch_size * self.steps
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.int32)
        config = timing.bench_config(dtype, fold, self.batch_size)
        config.model.name, config.teacher.name = args.student, args.teacher
        teacher = _calibrated_teacher(args.teacher, dtype, images[:256])
        setup = build(config, 10, (32, 32, 3), self.steps, timing.CIFAR_MEAN, timing.CIFAR_STD, teacher)
        self.run_steps = make_run_steps(setup.step_fn, self.mesh, self.batch_size, "cifar")
        self.state = sharding.put_replicated(setup.init_state(), self.mesh)
        self.teacher_variables = sharding.put_replicated(setup.teacher_variables, self.mesh)
        self.images, self.labels = sharding.put_replicated((images, labels), self.mesh)
        self.key = jax.random.key(seed)
        self.perm = epoch_permutation(self.key, n)

    call = timing.Bench.call  # the same dispatch as the device check's: one program of `num_steps` steps

    def rep(self) -> float:
        """`steps` steps (one scan program, or one dispatch per step), ended by block_until_ready; the loss."""
        metrics = timing.Bench.rep(self, self.form)
        return float(np.asarray(metrics["loss"])[-1])


def _calibrated_teacher(name: str, dtype_name: str, images: np.ndarray, seed: int = 100):
    """timing.calibrated_teacher for any teacher: BN running statistics of `images` (train pass, momentum 0)."""
    from flax import nnx

    dtype = DTYPES[dtype_name]
    graph, variables = split(build_model(name, {}, 10, seed, dtype))

    @jax.jit
    def calibrate(variables, images):
        model = graph.merge(variables)
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.BatchNorm):
                m.momentum = 0.0
        forward_with_segments(model, normalize(images, timing.CIFAR_MEAN, timing.CIFAR_STD, dtype), train=True)
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    network = Network(graph, timing.CIFAR_MEAN, timing.CIFAR_STD, dtype)
    return network, {**variables, "batch_stats": calibrate(variables, images)}


class Theirs:
    """torch_reference's step in `mode` on one device-resident batch."""

    def __init__(self, args: argparse.Namespace, seed: int = 0):
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.steps, self.mode = args.steps, args.torch_mode
        amp = self.mode != "eager_fp32"
        torch._dynamo.reset()
        torch.manual_seed(seed)
        depth = {n: int(n[6:]) for n in (args.teacher, args.student)}
        teacher = tr.CifarResNet(depth[args.teacher]).to(self.device)
        student = tr.CifarResNet(depth[args.student]).to(self.device)
        self.images = torch.randn(args.batch_size, 3, 32, 32, device=self.device)
        self.labels = torch.randint(0, 10, (args.batch_size,), device=self.device, dtype=torch.int64)
        tr.calibrate_bn_(teacher, self.images)
        if amp:  # channels_last with AMP, as throughput.py's torch modes
            teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        optimizer = tr.make_sgd(student)
        self.step = tr.make_kd_step(teacher, student, optimizer, amp=amp, compile=self.mode.startswith("compile"))

    def rep(self, steps: int | None = None) -> float:
        for _ in range(steps or self.steps):
            loss = self.step(self.images, self.labels)
        value = loss.item()  # the host waits for the device here
        tr._sync(self.device)
        return value


def _timed(side) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = side.rep()
    return time.perf_counter() - t0, loss


def interleave(ours, theirs, reps: int, images_per_rep: int) -> dict:
    """`reps` repetitions of one timed rep of each side, the first side alternating; per-rep ratios and spread."""
    rows = []
    for i in range(reps):
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        times = {}
        for name in order:
            times[name], loss = _timed(ours if name == "ours" else theirs)
            if not np.isfinite(loss):
                raise FloatingPointError(f"repetition {i}: {name}'s loss is {loss}")
        rows.append({"first": order[0], "ours_s": times["ours"], "theirs_s": times["theirs"]})
        rows[-1]["ratio"] = times["theirs"] / times["ours"]  # img/s ours / img/s theirs, same images per side
    return {"repetitions": rows, **summarize(rows, images_per_rep)}


def summarize(rows: list[dict], images_per_rep: int) -> dict:
    """The median of the per-repetition ratios, their min/max and quartiles; each side's median img/s."""
    ratios = [r["ratio"] for r in rows]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ours_img_per_s_median": images_per_rep / statistics.median(r["ours_s"] for r in rows),
        "theirs_img_per_s_median": images_per_rep / statistics.median(r["theirs_s"] for r in rows),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    t_start, host = time.perf_counter(), timing.host_info()
    print(f"device: {host['platform']} {host['device_kind']}, jax {host['jax']}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    ours = Ours(args)
    ours.rep()  # compiles
    ours_warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = Theirs(args)
    theirs.rep(args.warmup)  # torch.compile compiles in the first step
    theirs_warmup_s = time.perf_counter() - t0
    print(f"warm-up: ours {ours_warmup_s:.1f} s, theirs ({args.torch_mode}) {theirs_warmup_s:.1f} s", flush=True)
    result = interleave(ours, theirs, args.reps, args.batch_size * args.steps)
    for i, r in enumerate(result["repetitions"]):
        print(
            f"rep {i} ({r['first']} first): ours {r['ours_s']:.4f} s, theirs {r['theirs_s']:.4f} s, {r['ratio']:.3f}x"
        )
    print(
        f"ours / {args.torch_mode}: median {result['ratio_median']:.3f}x "
        f"(min {result['ratio_min']:.3f}, quartiles {result['ratio_q1']:.3f}-{result['ratio_q3']:.3f}, "
        f"max {result['ratio_max']:.3f}); ours {result['ours_img_per_s_median']:,.0f} img/s, "
        f"theirs {result['theirs_img_per_s_median']:,.0f} img/s",
        flush=True,
    )
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/interleaved_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": {**host, "torch_device": str(theirs.device)},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "warmup_s": {"ours": ours_warmup_s, "theirs": theirs_warmup_s},
        **result,
        "wall_s": time.perf_counter() - t_start,
    }
    out = pathlib.Path(args.out or HERE / "results" / f"interleaved_{host['platform']}_{now:%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
