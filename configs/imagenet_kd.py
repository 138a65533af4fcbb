"""ResNet-34 -> ResNet-18 on ImageNet (ILSVRC-2012), mdistiller's recipe (configs/imagenet/r34_r18/kd.yaml): 100
epochs, batch 512, SGD momentum 0.9, lr 0.2 decayed x0.1 at epochs 30, 60 and 90, weight decay 1e-4, KD at T=1
with 0.5 CE + 0.5 KL. Data: tfds `imagenet2012` (prepared as ArrayRecord), streamed (`data.pipeline='stream'`),
random-resized 224 crops + flips for training, resize-256 centre crops for evaluation (the validation split is the
test set). A run configuration, not the dark-knowledge experiment:

    extkd train --config=imagenet_kd:teacher --workdir=gs://BUCKET/r34            # or use torchvision's weights:
    extkd import-torch --config=imagenet_kd:teacher --weights=resnet34.pth --workdir=gs://BUCKET/r34
    extkd distill --config=imagenet_kd --config.teacher.workdir=gs://BUCKET/r34 --workdir=gs://BUCKET/r18_kd

Variant `imagenette` (`--config=imagenet_kd:imagenette[,teacher]`): tfds `imagenette` (10 classes, 9,469 training
images), batch 128 with the learning rate scaled linearly (0.05), 40 epochs decayed at 12, 24 and 36.
"""

from extkd_jax.configs import base


def get_config(arg=None):
    c = base.get_config()
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.dir = ""  # the tfds data_dir ("" = TFDS's default, e.g. ~/tensorflow_datasets or gs://...)
    c.data.val_size = 0
    c.data.augment = "flip"
    c.data.pipeline = "stream"
    c.data.crop_size = 224
    c.data.stats_sample = 10000
    c.data.read_threads = 32

    c.model.name = "resnet18"
    c.teacher.name = "resnet34"
    c.loss.name = "kd"
    c.loss.temperature = 1.0
    c.loss.ce_weight = 0.5
    c.loss.kd_weight = 0.5

    c.optim.learning_rate = 0.2
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "step"
    c.optim.decay_epochs = (30, 60, 90)
    c.optim.decay_factor = 0.1
    c.batch_size = 512
    c.eval_batch_size = 500
    c.num_epochs = 100
    c.compute_dtype = "bfloat16"
    return base.with_variant(c, arg, {"imagenette": imagenette})


def imagenette(c):
    c.data.name = "imagenette"
    c.data.stats_sample = 2000
    c.batch_size = 128
    c.optim.learning_rate = 0.05
    c.num_epochs = 40
    c.optim.decay_epochs = (12, 24, 36)
