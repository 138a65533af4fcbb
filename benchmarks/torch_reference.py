"""PyTorch reference of one knowledge-distillation training step, for throughput comparison.

This is the PyTorch side of the throughput benchmark: the same work as the JAX step (teacher forward in eval
mode, student forward in train mode, cross entropy + temperature-scaled KL + per-segment MSE, SGD with momentum
and weight decay) written the way a PyTorch user would, in three modes:

- ``eager_fp32``: plain eager execution in float32, NCHW.
- ``eager_amp_bf16_channels_last``: ``torch.autocast(dtype=torch.bfloat16)``, models and inputs channels_last.
- ``compile_amp_bf16``: as above, with the forward + loss function under ``torch.compile``.

Models are the CIFAR ResNets of He et al. (2016) with 1x1 conv + BN projection shortcuts where the shape
changes (the RepDistiller variant): ``resnet20`` (n=3, ~0.27M params) and ``resnet56`` (n=9, ~0.86M params).

Run alone::

    python benchmarks/torch_reference.py --modes eager_fp32,compile_amp_bf16 --batch-sizes 128,256 --steps 20

Only ``torch`` is needed (no torchvision, no JAX).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("eager_fp32", "eager_amp_bf16_channels_last", "compile_amp_bf16")


# --------------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: stem 3->16, stages of 16/32/64 channels, global average pool, linear.

    ``forward`` returns ``(logits, [stage1_out, stage2_out, stage3_out])``; the stage outputs are the
    post-ReLU outputs of the last block of each stage, shapes (B,16,32,32), (B,32,16,16), (B,64,8,8).
    """

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n>=1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_ch = 16
        for i, ch in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = F.relu(self.bn1(self.conv1(x)))
        segments = []
        for stage in self.stages:
            out = stage(out)
            segments.append(out)
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(pooled), segments


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def calibrate_bn_(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to the statistics of ``images`` (one train-mode forward).

    An untrained model in eval mode has running mean 0 / var 1, so its activations grow through the residual
    stages (a random resnet56 gives stage-3 outputs of RMS ~1e3 and a KD loss of ~1e6). Calibrating the
    frozen teacher on the benchmark batch gives it the activation scale of a trained network; it changes the
    numbers, not the work done per step.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    was_training = model.training
    model.train()
    model(images)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


# --------------------------------------------------------------------------------------------------- loss/step


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_segments: list[torch.Tensor],
    teacher_segments: list[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    segment_weight: float = 1.0,
) -> torch.Tensor:
    """ce_weight*CE + kd_weight*T^2*KL(softmax(t/T) || softmax(s/T)) (batchmean) + segment_weight*sum_k MSE_k.

    Computed in float32 whatever the dtype of the inputs (autocast may give bf16 activations).
    MSE_k is the mean over all elements of segment k; teacher terms carry no gradient.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    ce = F.cross_entropy(s, labels)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    seg = s.new_zeros(())
    for s_k, t_k in zip(student_segments, teacher_segments, strict=True):
        seg = seg + F.mse_loss(s_k.float(), t_k.detach().float())
    return ce_weight * ce + kd_weight * (temperature**2) * kl + segment_weight * seg


def make_sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    """SGD(lr=0.1, momentum=0.9, weight_decay=5e-4), the optimizer of the reference step."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def make_kd_step(
    teacher: nn.Module,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    segment_weight: float = 1.0,
    amp: bool = False,
    compile: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``step(images, labels) -> loss`` doing one distillation training step.

    The teacher is put in eval mode (running BN statistics, frozen: ``requires_grad_(False)``) and run under
    ``torch.no_grad``; the student is put in train mode. ``amp=True`` runs both forwards under
    ``torch.autocast(device_type, dtype=torch.bfloat16)``; the loss is computed in float32. ``compile=True``
    wraps the forward + loss function in ``torch.compile`` (compiled lazily, on the first call); backward and
    the optimizer step run eagerly (the backward graph is still the compiled AOTAutograd one).
    The returned loss is a detached device tensor: the step never synchronises with the host.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    device_type = next(student.parameters()).device.type

    def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_logits, t_segments = teacher(images)
            s_logits, s_segments = student(images)
        return kd_loss(
            s_logits,
            t_logits,
            s_segments,
            t_segments,
            labels,
            temperature=temperature,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            segment_weight=segment_weight,
        )

    fwd = torch.compile(forward_loss) if compile else forward_loss

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = fwd(images, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


# --------------------------------------------------------------------------------------------------- benchmark


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def benchmark_torch(
    mode: str,
    batch_size: int,
    steps: int = 20,
    warmup: int = 5,
    device: str | torch.device | None = None,
    teacher: str = "resnet56",
    student: str = "resnet20",
    num_classes: int = 10,
    seed: int = 0,
) -> dict:
    """Time ``steps`` KD training steps (after ``warmup`` untimed ones) of ``student`` distilled from ``teacher``.

    Returns a dict with keys mode, batch_size, device, device_name, img_per_s, step_ms, torch_version, notes
    (plus first_step_s: wall time of the first warm-up step, i.e. compile time for the compiled mode, and
    final_loss). Data is random and resident on the device. On failure (e.g. torch.compile without a working
    C compiler) returns ``{"error": "...", "mode", "batch_size", "device", "torch_version"}`` instead of raising.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = mode != "eager_fp32"
    channels_last = amp
    compiled = mode.startswith("compile")
    base = {"mode": mode, "batch_size": batch_size, "device": str(device), "torch_version": torch.__version__}
    try:
        if compiled:  # a fresh compile per call: no shape marked dynamic by an earlier batch size's compile
            torch._dynamo.reset()
        torch.manual_seed(seed)
        builders = {"resnet20": resnet20, "resnet56": resnet56}
        t_model = builders[teacher](num_classes).to(device)
        s_model = builders[student](num_classes).to(device)
        images = torch.randn(batch_size, 3, 32, 32, device=device)
        labels = torch.randint(0, num_classes, (batch_size,), device=device, dtype=torch.int64)
        calibrate_bn_(t_model, images)  # realistic teacher activation scale; see calibrate_bn_
        if channels_last:
            t_model = t_model.to(memory_format=torch.channels_last)
            s_model = s_model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer = make_sgd(s_model)
        step = make_kd_step(t_model, s_model, optimizer, amp=amp, compile=compiled)

        _sync(device)
        t0 = time.perf_counter()
        loss = step(images, labels)
        loss.item()
        first_step_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            loss = step(images, labels)
        loss.item()
        _sync(device)

        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(images, labels)
        final_loss = loss.item()  # host sync (and the only one in the timed loop)
        _sync(device)
        elapsed = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - report, do not raise (e.g. torch.compile without a C compiler)
        msg = f"{type(e).__name__}: {e}".strip()
        return {**base, "error": msg[:2000]}

    if not math.isfinite(final_loss):
        return {**base, "error": f"non-finite loss {final_loss}"}
    notes = [
        f"{teacher}->{student}",
        "teacher BN calibrated on the batch",
        "amp bf16" if amp else "fp32",
        "channels_last" if channels_last else "NCHW",
        "torch.compile(forward+loss)" if compiled else "eager",
        f"warmup={warmup} steps={steps}",
    ]
    if device.type == "cpu":
        notes.append(f"cpu threads={torch.get_num_threads()}")
    return {
        **base,
        "device_name": _device_name(device),
        "img_per_s": batch_size * steps / elapsed,
        "step_ms": 1000.0 * elapsed / steps,
        "first_step_s": first_step_s,
        "final_loss": final_loss,
        "notes": ", ".join(notes),
    }


def _print_table(rows: list[dict]) -> None:
    header = f"{'mode':<30} {'batch':>6} {'img/s':>10} {'step_ms':>9} {'1st_step_s':>10}  device"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<30} {r['batch_size']:>6}  ERROR: {r['error'][:200]}")
        else:
            print(
                f"{r['mode']:<30} {r['batch_size']:>6} {r['img_per_s']:>10.1f} {r['step_ms']:>9.2f} "
                f"{r['first_step_s']:>10.2f}  {r['device']} ({r['device_name']})"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--batch-sizes", default="128", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--teacher", default="resnet56", choices=("resnet20", "resnet56"))
    p.add_argument("--student", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected some of {MODES}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    rows = []
    for m in modes:
        for b in batch_sizes:
            rows.append(
                benchmark_torch(
                    m,
                    b,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=args.device,
                    teacher=args.teacher,
                    student=args.student,
                )
            )
    print(f"torch {torch.__version__}")
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
