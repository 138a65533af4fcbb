"""MLKD's levels, one at a time: plug-in methods for the ablation behind docs/results/mlkd_ablation (issue 22,
item 8: is the scale of MLKD's relation terms what makes it diverge on MNIST?).

MLKD (`losses.mlkd`) sums over five temperatures an instance level (T^2 KL), a class level
(``||P_t^T P_t - P_s^T P_s||^2 / C``, growing as (N / C)^2) and a batch level (``||P_t P_t^T - P_s P_s^T||^2 / N``,
growing as N / C). Each variant here keeps some levels, with everything else as the built-in `mlkd`:

    mlkd_instance   instance only (the five T^2-scaled KLs)
    mlkd_no_batch   instance + class
    mlkd_no_class   instance + batch
    mlkd_invariant  all three, the relation terms x C / N^2 (`batch_invariant=True`)

    PYTHONPATH=examples extkd reproduce --config=mnist_omit3 --workdir=/tmp/mlkd_ablation \\
        --config.imports="('mlkd_ablation',)" \\
        --config.reproduce.primary="('mlkd_instance', 'kd')" --config.reproduce.teacher_seeds=1 \\
        --config.reproduce.methods="('kd', 'mlkd', 'mlkd_instance', 'mlkd_no_batch', 'mlkd_no_class', \\
            'mlkd_invariant')" \\
        --config.reproduce.grid.mlkd="(10.0, 20.0)" --config.reproduce.grid.mlkd_instance="(10.0, 20.0)" \\
        --config.reproduce.grid.mlkd_no_batch="(10.0, 20.0)" --config.reproduce.grid.mlkd_no_class="(10.0, 20.0)" \\
        --config.reproduce.grid.mlkd_invariant="(10.0, 20.0)"

Every MLKD variant is tuned over KD's temperature grid (the preset's `reproduce.grid.kd`), as `:zoo` tunes MLKD.
"""

from __future__ import annotations

import extkd_jax
from extkd_jax import losses
from extkd_jax.losses.zoo import MLKD_TEMPERATURES
from extkd_jax.methods import Context, Method

VARIANTS = {
    "mlkd_instance": ((1.0, 0.0, 0.0), False, "MLKD's instance level alone (five T^2-scaled KLs)"),
    "mlkd_no_batch": ((1.0, 1.0, 0.0), False, "MLKD without its batch level (instance + class)"),
    "mlkd_no_class": ((1.0, 0.0, 1.0), False, "MLKD without its class level (instance + batch)"),
    "mlkd_invariant": ((1.0, 1.0, 1.0), True, "MLKD with its relation terms x C / N^2 (batch_invariant)"),
}


def mlkd_levels(levels: tuple[float, float, float], batch_invariant: bool):
    """The built-in MLKD objective (CE + kd_weight x MLKD at T, 2, 3, 5, 6) with only some of its levels."""

    def objective(ctx: Context):
        c = ctx.loss
        logits, _ = ctx.student()
        teacher_logits, _ = ctx.teacher()
        ce = ctx.ce(logits)
        temperatures = (c.temperature, *MLKD_TEMPERATURES)
        kd = losses.mlkd(logits, teacher_logits, temperatures, batch_invariant=batch_invariant, level_weights=levels)
        return c.ce_weight * ce + c.kd_weight * kd, {"ce": ce, "mlkd": kd}, logits

    return objective


for _name, (_levels, _invariant, _description) in VARIANTS.items():
    extkd_jax.register_method(
        Method(
            _name,
            f"{_description} (a plug-in: examples/mlkd_ablation.py)",
            family="plug-in",
            objective=mlkd_levels(_levels, _invariant),
            tune="temperature",
            grid="temperature",
            needs=frozenset({"teacher"}),
        )
    )
