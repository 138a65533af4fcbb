"""Hinton's MNIST teacher: MLP 784-1200-1200-10, dropout, inputs jittered by up to 2 pixels.

extkd train --config=configs/mnist_teacher.py --workdir=/tmp/mnist_teacher
"""

from extkd_jax.configs import base


def get_config():
    c = base.get_config()
    c.data.source = "npz"
    c.data.name = "mnist"
    c.data.dir = ""  # the dataset, not a folder: $EXTKD_DATA_DIR/mnist, else tfds (configs/base.py)
    c.data.val_size = 0
    c.model.name = "mlp"
    c.model.kwargs.hidden_sizes = (1200, 1200)
    c.model.kwargs.dropout = 0.5
    c.model.kwargs.input_dropout = 0.2
    c.model.kwargs.input_size = 784
    c.optim.learning_rate = 0.1
    c.optim.weight_decay = 0.0
    c.batch_size = 256
    c.num_epochs = 20
    return c
