"""benchmarks/: the timing helpers, the profile summary, and the device check's --cpu rehearsal end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.tiny import REPO_ROOT, build_wheel

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import profile_summary  # noqa: E402
import timing  # noqa: E402

NO_TORCH = 'the PyTorch reference step needs torch (pip install "extkd_jax[torch]")'


def test_arguments():
    pytest.importorskip("torch", reason=NO_TORCH)
    import throughput  # its PyTorch reference imports torch

    quick = throughput.parse_args(["--quick"])
    assert quick.batch_sizes == [8, 16] and quick.steps == 2 and quick.forms == ["scan", "dispatch"]
    assert "compile_amp_bf16" not in quick.torch_modes  # torch.compile's first step takes minutes on 2 cores
    assert throughput.parse_args([]).batch_sizes == [256, 1024]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--forms", "warp"])


def test_ceilings_and_ratios():
    assert timing.ceiling_for("NVIDIA H100 80GB HBM3")["hbm_tb_s"] == 3.35
    assert timing.ceiling_for("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert timing.ceiling_for("cpu") is None
    rows = {"jax scan bf16_fold": {8: 30.0, 16: None}, "torch eager_fp32": {8: 10.0, 16: 5.0}}
    ratios = timing.ratios(rows, [8, 16])
    assert ratios["jax scan bf16_fold"]["vs_torch_eager_fp32"] == {"8": pytest.approx(3.0), "16": None}
    assert ratios["jax scan bf16_fold"]["vs_torch_compile_amp_bf16"] == {"8": None, "16": None}
    text = timing.table(rows, [8, 16])
    assert "3.00" in text and "n/a" in text


def test_profile_categories():
    assert profile_summary.category("sm80_xmma_fprop_implicit_gemm_bf16bf16") == "convolution"
    assert profile_summary.category("cutlass_80_tensorop_gemm") == "matmul"
    assert profile_summary.category("input_reduce_fusion_3") == "reduction"
    assert profile_summary.category("loop_add_fusion") == "elementwise fusion"


@pytest.mark.slow
def test_bench_times_the_real_step_and_profiles_it(tmp_path):
    bench = timing.Bench(8, "float32", False, steps=2)
    row = timing.time_form(bench, "scan", reps=1, profile_dir=str(tmp_path / "profile"))
    assert row["img_per_s"] > 0 and row["compile_s"] > 0 and math.isfinite(row["final_loss"])
    profile = row["profile"]
    assert profile["busy_s"] > 0 and abs(sum(v["fraction"] for v in profile["by_category"].values()) - 1) < 1e-6
    assert profile["by_category"]["convolution"]["fraction"] > 0.3  # a conv net's step is mostly convolutions
    assert timing.teacher_forward_ms(bench, reps=1) > 0


@pytest.mark.slow
def test_device_check_cpu_rehearsal(tmp_path):
    """The whole device check at toy sizes on the CPU, installing from a wheelhouse as on the device (there only
    the project's wheel: this interpreter has the dependencies), so the GPU run is never its first run."""
    pytest.importorskip("torch", reason=NO_TORCH)  # the throughput phase times torch eager fp32
    wheelhouse = build_wheel(tmp_path / "wheelhouse").parent
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "benchmarks/device_check.sh"),
            "--cpu",
            "--wheelhouse",
            str(wheelhouse),
            "--out",
            str(out_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    phases = {"install": "ok", "tests": "ok", "throughput": "ok", "cifar10": "ok", "baseline": "ok"}
    assert summary["phases"] == phases, (out_dir / "device_check.log").read_text()[-4000:]
    assert out.returncode == 0
    assert summary["checks"]["tests_passed"] and summary["tests"]["tests"] > 20
    assert summary["throughput"]["img_per_s"]["jax scan bf16_fold"]["8"] > 0
    assert summary["throughput"]["breakdown"]["teacher_forward_ms"] > 0
    assert set(summary["cifar10"]["students"]) == {"kd", "extended_kd"}
    assert len(list(out_dir.iterdir())) <= 8  # the device tool brings back at most 8 files


def test_conv_layout_benchmark_times_the_same_gradients_in_every_layout():
    """benchmarks/conv_layout.py compares layouts only if each computes the same thing: the gradients of JAX's
    NHWC, NCHW and im2col forms and of PyTorch's NCHW and channels_last forms agree on the same kernels and batch."""
    pytest.importorskip("torch", reason=NO_TORCH)
    import conv_layout
    import numpy as np

    kernels, x = conv_layout.inputs(batch=2)
    grads = {}
    for form in conv_layout.JAX_FORMS:
        step, args = conv_layout.jax_step(form, kernels, x)
        g_kernels, g_x = step(*args)
        if form != "NCHW":  # back to OIHW kernels and NCHW images
            g_kernels, g_x = (
                [np.asarray(k).transpose(3, 2, 0, 1) for k in g_kernels],
                np.asarray(g_x).transpose(0, 3, 1, 2),
            )
        grads[f"jax_{form}"] = [np.asarray(g) for g in [*g_kernels, g_x]]
    for layout in ("NCHW", "channels_last"):
        step, (weights, inp) = conv_layout.torch_step(layout, kernels, x)
        step()
        grads[f"torch_{layout}"] = [t.grad.numpy() for t in [*weights, inp]]
    reference = grads.pop("torch_NCHW")
    assert set(grads) == {"jax_NHWC", "jax_NCHW", "jax_im2col", "torch_channels_last"}
    assert len(reference) == len(conv_layout.RESNET20_CONVS) + 1
    for name, values in grads.items():
        for i, (got, want) in enumerate(zip(values, reference)):
            scale = np.abs(want).max()
            assert scale > 0
            np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, err_msg=f"{name}, gradient {i}")
