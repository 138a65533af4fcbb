"""Progress of a run: a tqdm bar on a terminal; elsewhere (CI, `gcloud ... ssh` logs) one line per epoch."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("extkd_jax.train")


class Progress:
    """`update(steps, **live)` after each dispatch; `epoch_done(epoch, summary)` after each epoch."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool, stream=None):
        stream = stream or sys.stderr
        self.enabled = enabled
        self.description = description
        self.bar = None
        if enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, desc=description, file=stream
            )

    def update(self, steps: int, **live) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(**live)

    def epoch_done(self, epoch: int, num_epochs: int, summary: str) -> None:
        if self.enabled and self.bar is None:
            log.info("%s: epoch %d/%d %s", self.description, epoch, num_epochs, summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
