"""Smoke test of benchmarks/throughput.py: the JAX timing at a tiny batch, and the report helpers."""

import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("throughput", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_defaults_and_ceilings(tp):
    args = tp.parse_args(["--quick"])
    assert args.batch_sizes == [8, 16] and args.steps == 2 and args.skip_torch_compile
    assert "quick" in args.compile_skip_reason
    assert args.forms == ["scan", "dispatch"]
    assert tp.JAX_FORMS == ("scan", "dispatch", "dispatch_sync")
    assert tp.parse_args([]).batch_sizes == [256, 1024]
    assert tp.ceiling_for("NVIDIA H100 80GB HBM3")["hbm_tb_s"] == 3.35
    assert tp.ceiling_for("NVIDIA H200")["hbm_tb_s"] == 4.8
    assert tp.ceiling_for("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert tp.ceiling_for("cpu") is None


def test_table_and_ratios(tp):
    jax_results = {"bf16_fold": {8: {"scan": {"img_per_s": 30.0, "batch_size": 8}}}}
    torch_results = {
        "eager_fp32": {8: {"img_per_s": 10.0}},
        "compile_amp_bf16": {8: {"skipped": "quick"}},
    }
    rows = tp.build_rows(jax_results, torch_results, [8])
    rat = tp.ratios(rows, [8])
    assert rat["jax scan bf16_fold"]["vs_torch_eager_fp32"][8] == pytest.approx(3.0)
    assert rat["jax scan bf16_fold"]["vs_torch_compile_amp"][8] is None
    table = tp.format_table(rows, rat, [8])
    assert "skipped" in table and "3.00" in table


def test_epoch_seconds_derived(tp):
    shape = {"batch_size": 512, "transfer_images": 40500, "compute_dtype": "bfloat16", "fold_bn": True}
    measured = {
        "bf16_fold": {16: {"scan": {"img_per_s": 10.0, "batch_size": 16}, "dispatch": {"img_per_s": 100.0}}}
    }
    r = tp.epoch_seconds(shape, measured, direct=False)
    assert r["steps_per_epoch"] == 79
    assert r["epoch_s"] == pytest.approx(79 * 512 / 10.0)
    assert r["epoch_s_dispatch"] == pytest.approx(79 * 512 / 100.0)


@pytest.mark.slow
def test_benchmark_jax_tiny(tp):
    r = tp.benchmark_jax(8, 2, "float32", False, forms=("scan",), reps=1)
    row = r["scan"]
    assert row["img_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0
    assert math.isfinite(row["final_loss"])
