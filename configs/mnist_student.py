"""Hinton's MNIST student: MLP 784-800-800-10 distilled at T=20 from the mnist_teacher run.

        extkd distill --config=configs/mnist_student.py --workdir=/tmp/mnist_student \\
                --config.teacher.workdir=/tmp/mnist_teacher
"""

from extkd_jax.configs import mnist_teacher


def get_config():
    c = mnist_teacher.get_config()
    c.model.kwargs.hidden_sizes = (800, 800)
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.input_dropout = 0.0
    c.teacher.name = "mlp"
    c.teacher.workdir = "/tmp/mnist_teacher"
    c.loss.name = "kd"
    c.loss.temperature = 20.0
    c.loss.ce_weight = 0.1
    c.loss.kd_weight = 0.9
    # T^2 * KL at T=20 acts like logit matching with large targets: a lower rate and a warm-up keep SGD stable
    c.optim.learning_rate = 0.03
    c.optim.warmup_epochs = 1
    c.num_epochs = 30
    return c
