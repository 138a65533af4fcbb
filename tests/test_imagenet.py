"""ImageNet-scale pieces: torchvision-layout ResNets (parameter counts, segments, torch weights give torch's logits),
importing a torchvision teacher, and the imagenet_kd preset end to end on tfds mock data, streamed."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from extkd_jax import cli
from extkd_jax.models import create_model, fold_batchnorm, forward_with_segments
from extkd_jax.models.torch_weights import load_state_dict

TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(name):
    model = nnx.eval_shape(lambda: create_model(name, 1000, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == TORCHVISION_PARAMS[name]


def test_stage_segments_and_exact_bn_folding():
    model = create_model("resnet50", 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    logits, segments = forward_with_segments(model, x, train=False)
    assert [s.shape for s in segments] == [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]
    folded, _ = forward_with_segments(fold_batchnorm(model), x, train=False)
    np.testing.assert_allclose(folded, logits, rtol=1e-4, atol=1e-4)


def _torch_resnet(torch, name: str, num_classes: int):
    """A ResNet written in PyTorch with torchvision's module names (torchvision itself is not installed here)."""
    nn = torch.nn
    bottleneck, depths = {
        "resnet18": (False, (2, 2, 2, 2)),
        "resnet34": (False, (3, 4, 6, 3)),
        "resnet50": (True, (3, 4, 6, 3)),
    }[name]
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, inp, width, stride):
            super().__init__()
            out = width * expansion
            if bottleneck:
                self.conv1, self.bn1 = nn.Conv2d(inp, width, 1, bias=False), nn.BatchNorm2d(width)
                self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
                self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
            else:
                self.conv1, self.bn1 = nn.Conv2d(inp, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
                self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
            self.downsample = None
            if stride != 1 or inp != out:
                self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if bottleneck:
                out = self.bn3(self.conv3(torch.relu(out)))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inp = 64
            for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
                blocks = []
                for j in range(depth):
                    blocks.append(Block(inp, width, 2 if i and not j else 1))
                    inp = width * expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(inp, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    model = ResNet()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # non-trivial BatchNorm statistics and affines: a wrong mapping shows
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_give_torchs_logits(name):
    torch = pytest.importorskip("torch")
    reference = _torch_resnet(torch, name, 7)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = load_state_dict(create_model(name, 7, rngs=nnx.Rngs(1)), state_dict)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got, _ = forward_with_segments(model, x.transpose(0, 2, 3, 1), train=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_bad_state_dicts_are_named():
    torch = pytest.importorskip("torch")
    state_dict = {k: v.numpy() for k, v in _torch_resnet(torch, "resnet18", 7).state_dict().items()}
    model = create_model("resnet18", 7, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 512\)"):
        load_state_dict(model, {**state_dict, "fc.weight": np.zeros((512, 10), np.float32)})
    with pytest.raises(ValueError, match="'layer9.0.conv1.weight' has no counterpart"):
        load_state_dict(model, {**state_dict, "layer9.0.conv1.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="lacks 1 of the model's arrays"):
        load_state_dict(model, {k: v for k, v in state_dict.items() if k != "layer4.1.bn2.running_var"})


@pytest.mark.slow
def test_imagenet_preset_on_mock_data_streamed(tmp_path, capsys):
    """`imagenet_kd:imagenette` on tfds mock data (variable-size images, host crops, the stream pipeline): a teacher
    trained by `extkd train`, one imported from torch weights, and a student distilled from each."""
    tfds = pytest.importorskip("tensorflow_datasets")
    torch = pytest.importorskip("torch")
    small = [
        "--config.data.crop_size=32",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.num_epochs=1",
        "--config.data.stats_sample=4",
        "--config.data.read_threads=2",
        "--config.progress=False",
        "--config.compute_dtype=float32",
    ]
    weights = tmp_path / "resnet34.pth"
    torch.save(_torch_resnet(torch, "resnet34", 10).state_dict(), weights)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        assert (
            cli.main(["train", "--config=imagenet_kd:imagenette,teacher", *small, f"--workdir={tmp_path / 'teacher'}"])
            == 0
        )
        assert (
            cli.main(
                [
                    "import-torch",
                    "--config=imagenet_kd:imagenette,teacher",
                    *small,
                    f"--weights={weights}",
                    f"--workdir={tmp_path / 'imported'}",
                ]
            )
            == 0
        )
        for teacher in ("teacher", "imported"):
            assert (
                cli.main(
                    [
                        "distill",
                        "--config=imagenet_kd:imagenette",
                        *small,
                        f"--config.teacher.workdir={tmp_path / teacher}",
                        f"--workdir={tmp_path / ('student_' + teacher)}",
                    ]
                )
                == 0
            )
    capsys.readouterr()
    record = json.loads((tmp_path / "student_imported" / "config.json").read_text())
    assert record["pipeline"] == "stream" and record["input_shape"] == [32, 32, 3]
    metrics = json.loads((tmp_path / "student_teacher" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train_loss"]) and "test_acc" in metrics
    card = json.loads(next((tmp_path / "imported").glob("checkpoints/0/card/metadata")).read_text())
    assert card["model"]["name"] == "resnet34" and card["normalization"]["mean"][0] == pytest.approx(0.485 * 255)
