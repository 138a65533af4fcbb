"""Learning-rate schedules and the SGD optimizer, built from `config.optim`."""

from __future__ import annotations

import optax


def create_learning_rate_fn(optim_config, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Per-step learning rate: linear warm-up, then cosine, step or constant."""
    base = float(optim_config.learning_rate)
    warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
    total_steps = max(1, num_epochs * steps_per_epoch)
    schedule = optim_config.schedule
    if schedule == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps=max(1, total_steps - warmup_steps))
    elif schedule == "step":
        boundaries = {
            int(e * steps_per_epoch) - warmup_steps: optim_config.decay_factor
            for e in optim_config.decay_epochs
        }
        main = optax.piecewise_constant_schedule(base, boundaries)
    elif schedule == "constant":
        main = optax.constant_schedule(base)
    else:
        raise ValueError(f"optim.schedule={schedule!r}; expected one of 'cosine', 'step', 'constant'")
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(optim_config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and coupled L2 weight decay, as in the PyTorch recipes."""
    return optax.chain(
        optax.add_decayed_weights(float(optim_config.weight_decay)),
        optax.sgd(
            learning_rate_fn,
            momentum=float(optim_config.momentum) or None,
            nesterov=bool(optim_config.nesterov),
        ),
    )
