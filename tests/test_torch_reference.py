"""Tests of the PyTorch reference step in benchmarks/torch_reference.py (skipped without torch)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason='the PyTorch reference step needs torch (pip install "extkd_jax[torch]")')

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("torch_reference", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_counts(tr):
    # He et al. CIFAR ResNets with 1x1 conv + BN projection shortcuts (RepDistiller style), 10 classes.
    assert tr.count_params(tr.resnet20()) == 272_474
    assert tr.count_params(tr.resnet56()) == 855_770
    assert 0.26e6 < tr.count_params(tr.resnet20(100)) < 0.29e6
    assert 0.85e6 < tr.count_params(tr.resnet56(100)) < 0.88e6


def test_segment_shapes(tr):
    torch.manual_seed(0)
    model = tr.resnet20(num_classes=7).eval()
    with torch.no_grad():
        logits, segments = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert [tuple(s.shape) for s in segments] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    with pytest.raises(ValueError):
        tr.CifarResNet(21)


def test_loss_matches_hand_computation(tr):
    s = np.array([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]])
    t = np.array([[0.2, 1.5, -0.3], [2.0, -1.0, 0.5]])
    y = np.array([2, 0])
    T, wce, wkd, wseg = 2.0, 0.7, 1.3, 0.5
    seg_s = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.0], [1.0]])]
    seg_t = [np.array([[1.5, 2.0], [2.0, 4.0]]), np.array([[2.0], [1.0]])]

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    ce = -np.mean(log_softmax(s)[np.arange(2), y])
    log_p_t, log_p_s = log_softmax(t / T), log_softmax(s / T)
    kl = np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)) / 2  # batchmean
    mse = sum(np.mean((a - b) ** 2) for a, b in zip(seg_s, seg_t))  # (0.25+1)/4 + 4/2
    expected = wce * ce + wkd * T**2 * kl + wseg * mse

    def f64(a):
        return torch.tensor(a, dtype=torch.float64)

    got = tr.kd_loss(
        f64(s),
        f64(t),
        [f64(a) for a in seg_s],
        [f64(a) for a in seg_t],
        torch.tensor(y),
        temperature=T,
        ce_weight=wce,
        kd_weight=wkd,
        segment_weight=wseg,
    )
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    assert math.isclose(mse, 0.3125 + 2.0)


@pytest.mark.parametrize("amp", [False, True])
def test_kd_step_updates_student_only(tr, amp):
    torch.manual_seed(0)
    teacher, student = tr.resnet20(), tr.resnet20()
    if amp:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    optimizer = tr.make_sgd(student)
    step = tr.make_kd_step(teacher, student, optimizer, amp=amp)
    assert not teacher.training and student.training

    images = torch.randn(4, 3, 32, 32)
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (4,), dtype=torch.int64)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}

    loss = step(images, labels)
    assert loss.shape == () and not loss.requires_grad
    assert math.isfinite(loss.item())
    for k, v in teacher.state_dict().items():  # weights and BN running statistics untouched
        assert torch.equal(v, t_before[k]), k
    changed = [k for k, v in student.named_parameters() if not torch.equal(v.detach(), s_before[k])]
    assert len(changed) == len(list(student.parameters()))
    # train-mode BN updated the student's running statistics.
    assert not torch.equal(student.bn1.running_mean, s_before["bn1.running_mean"])


def test_benchmark_torch_eager_smoke(tr):
    r = tr.benchmark_torch("eager_fp32", 2, steps=1, warmup=1, device="cpu", teacher="resnet20")
    assert "error" not in r, r
    for key in (
        "mode",
        "batch_size",
        "device",
        "device_name",
        "img_per_s",
        "step_ms",
        "torch_version",
        "notes",
    ):
        assert key in r
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["device"] == "cpu"


def test_benchmark_torch_reports_compile_failure(tr, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(tr.torch, "compile", broken_compile)
    r = tr.benchmark_torch("compile_amp_bf16", 2, steps=1, warmup=1, device="cpu")
    assert "no C compiler" in r["error"]
    with pytest.raises(ValueError):
        tr.benchmark_torch("nope", 2)


def test_calibrate_bn_matches_train_mode(tr):
    torch.manual_seed(0)
    model = tr.resnet20()
    images = torch.randn(4, 3, 32, 32)
    tr.calibrate_bn_(model.eval(), images)
    assert not model.training and model.bn1.momentum == 0.1
    with torch.no_grad():
        eval_logits, eval_segments = model(images)
        train_logits, _ = model.train()(images)
    # Same statistics up to running_var's unbiased (n-1) normalisation.
    torch.testing.assert_close(eval_logits, train_logits, rtol=0.1, atol=0.1)
    assert all(0.3 < s.pow(2).mean().sqrt().item() < 10 for s in eval_segments)
