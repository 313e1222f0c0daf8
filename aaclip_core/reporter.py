"""How the library tells the caller what it is doing, without knowing who listens."""

from __future__ import annotations


class Reporter:
    """No-op base; the CLI subclasses it with a rich progress display."""

    def info(self, message: str) -> None:  # noqa: D401 - a sink
        pass

    def warn(self, message: str) -> None:
        """Something the user should act on; the work goes on."""
        self.info(f"warning: {message}")

    def progress(self, stage: str, epoch: int, epochs: int, batch: int, batches: int, loss: float) -> None:
        pass

    def epoch_end(self, stage: str, epoch: int, epochs: int, loss: float, lr: float) -> None:
        """A training epoch finished: its mean loss and the learning rate it ended with."""

    def eval_progress(self, batch: int, batches: int) -> None:
        pass

    def loop(self, loop: int, loops: int) -> None:
        pass
