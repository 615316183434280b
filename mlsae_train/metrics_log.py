"""Per-step metrics: one JSON object a line in RUN/metrics.jsonl, optionally mirrored to TensorBoard or wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.errors import MlsaeError

from .checkpoint import METRICS_FILE


def check_loggers_available(tensorboard: bool, wandb: bool) -> None:
    """Fail before training starts if an asked-for logger is not installed."""
    if tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise MlsaeError("--tensorboard needs the tensorboard package; `pip install tensorboard` or drop the flag") from None
    if wandb:
        try:
            import wandb as _wandb  # noqa: F401
        except ImportError:
            raise MlsaeError("--wandb needs the wandb package; `pip install wandb` or drop the flag") from None


class MetricsLog:
    """Appends one record per step. On resume, first drops the records of steps that will be redone."""

    def __init__(
        self, run_dir: Path, first_step: int, tensorboard: bool = False, wandb: bool = False, config: dict | None = None
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        kept = []
        if first_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < first_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a line torn by a kill: it and anything after it belong to redone steps
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the whole run, closed by close()
        self._tensorboard = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=first_step)
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(
                project="mlsae", dir=str(run_dir), name=Path(run_dir).name, config=config, resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
