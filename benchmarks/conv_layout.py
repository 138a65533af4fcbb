#!/usr/bin/env python
"""Convolutions alone, JAX against PyTorch on CPU, in both memory layouts: where the CPU step's gap comes from.

    python benchmarks/conv_layout.py --batch 64 --reps 5 --out benchmarks/results/conv_layout_cpu_<date>.json

Times the forward and backward pass (gradients of the input and the kernels) of the 3x3 convolutions of a CIFAR
resnet20 student (widths 16/32/64 at 32/16/8 pixels, stride-2 transitions), no BatchNorm and no ReLU, so that the
figure is the convolutions' alone: JAX with NHWC (Flax's layout) and with NCHW dimension numbers, JAX with each
convolution written as one matrix product of its 3x3 patches (`im2col`, NHWC: whether XLA:CPU's matmul beats its
convolution kernels), PyTorch with NCHW (its default) and channels_last. Median of `--reps` repetitions of `--steps`
calls each, float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# (in channels, out channels, stride) of resnet20's 19 convolutions after the stem, the stem first
RESNET20_CONVS = [(3, 16, 1)] + [
    (c_in if i == 0 else c_out, c_out, 2 if (i == 0 and c_in != c_out) else 1)
    for c_in, c_out in ((16, 16), (16, 32), (32, 64))
    for i in range(6)
]


def _median_seconds(fn, steps: int, reps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def inputs(batch: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """He-initialised kernels (OIHW, PyTorch's layout) and an NCHW batch, shared by every variant."""
    rng = np.random.default_rng(seed)
    kernels = [
        (rng.standard_normal((c_out, c_in, 3, 3)) * (2.0 / (9 * c_in)) ** 0.5).astype(np.float32)
        for c_in, c_out, _ in RESNET20_CONVS
    ]
    return kernels, rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)


JAX_FORMS = ("NHWC", "NCHW", "im2col")


def conv3x3_im2col(x, kernel, stride: int):
    """A 3x3 convolution, padding 1, as one matrix product: the nine shifted (strided) views of the NHWC input
    side by side on the channel axis, times the HWIO kernel flattened to (9 * C_in, C_out)."""
    import jax.numpy as jnp

    _, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    views = [
        padded[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(3)
        for j in range(3)
    ]
    patches = jnp.concatenate(views, axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(9 * channels, -1))


def jax_step(form: str, kernels: list[np.ndarray], x: np.ndarray):
    """(jitted step, its arguments): the gradients of mean(output^2) in `form` (one of JAX_FORMS; im2col and NHWC
    take NHWC images and HWIO kernels, NCHW takes NCHW and OIHW)."""
    import jax
    import jax.numpy as jnp

    if form not in JAX_FORMS:
        raise ValueError(f"form {form!r}: expected one of {JAX_FORMS}")
    if form == "NCHW":
        numbers = ("NCHW", "OIHW", "NCHW")
    else:
        numbers = ("NHWC", "HWIO", "NHWC")
        kernels, x = [k.transpose(2, 3, 1, 0) for k in kernels], x.transpose(0, 2, 3, 1)

    def conv(x, k, stride):
        if form == "im2col":
            return conv3x3_im2col(x, k, stride)
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=numbers)

    def loss(kernels, x):
        for k, (_, _, stride) in zip(kernels, RESNET20_CONVS):
            x = conv(x, k, stride)
        return jnp.mean(x**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), ([jnp.asarray(k) for k in kernels], jnp.asarray(x))


def torch_step(layout: str, kernels: list[np.ndarray], x: np.ndarray):
    """A step computing the same gradients with torch (NCHW or channels_last); returns (step, leaves)."""
    import torch

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    weights = [torch.from_numpy(k).to(memory_format=fmt).requires_grad_() for k in kernels]
    inp = torch.from_numpy(x).to(memory_format=fmt).requires_grad_()

    def step():
        for leaf in [*weights, inp]:
            leaf.grad = None
        y = inp
        for w, (_, _, stride) in zip(weights, RESNET20_CONVS):
            y = torch.nn.functional.conv2d(y, w, stride=stride, padding=1)
        (y**2).mean().backward()

    return step, (weights, inp)


def time_jax(form: str, batch: int, steps: int, reps: int) -> float:
    import jax

    step, args = jax_step(form, *inputs(batch))
    return _median_seconds(lambda: jax.block_until_ready(step(*args)), steps, reps)


def time_torch(layout: str, batch: int, steps: int, reps: int, threads: int) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    step, _ = torch_step(layout, *inputs(batch))
    return _median_seconds(step, steps, reps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--out", help="JSON path (printed only when not given)")
    args = p.parse_args(argv)
    import timing  # imports jax and the project: after the arguments are checked

    host = timing.host_info()  # before the timings: its load average says whether the machine was idle
    seconds = {f"jax_{form}": time_jax(form, args.batch, args.steps, args.reps) for form in JAX_FORMS}
    for layout in ("NCHW", "channels_last"):
        seconds[f"torch_{layout}"] = time_torch(layout, args.batch, args.steps, args.reps, args.torch_threads)
    result = {
        "what": "resnet20's 3x3 convolutions, forward + backward (input and kernel gradients), float32",
        "date": datetime.date.today().isoformat(),
        "host": host,
        "batch": args.batch,
        "steps": args.steps,
        "reps": args.reps,
        "ms_per_step": {k: v * 1e3 for k, v in seconds.items()},
        "img_per_s": {k: args.batch / v for k, v in seconds.items()},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
