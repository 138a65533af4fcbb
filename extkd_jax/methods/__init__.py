"""The method layer: what each distillation method is, below the engine that runs it (extkd_jax/train) and the
experiments that compare them (extkd_jax/experiment). `roles`: the methods of `extkd reproduce`."""
