"""Per-phase SeRA statistics through OpenRLHF's logger settings: wandb if --logger.wandb.key is set, else
TensorBoard under --logger.tensorboard_dir/<run_name>_sera, with the iteration as the step."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sera_openrlhf.state import flatten


@dataclass
class LoggerSettings:
    wandb_key: str | None = None
    wandb_org: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None
    run_name: str = "sera"
    tensorboard_dir: str | None = None


class PhaseMetrics:
    def __init__(self, settings: LoggerSettings, writer: bool):
        self.settings = settings
        self.enabled = writer and bool(settings.wandb_key or settings.tensorboard_dir)
        self._wandb_id = None

    def log(self, t: int, phase: str, stats) -> None:
        if not self.enabled or not isinstance(stats, dict):
            return
        s = self.settings
        flat = {f"sera/{phase}/{k}": float(v) for k, v in flatten(stats).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if s.wandb_key:
            import wandb

            # Each training phase's trainer calls wandb.init(reinit=True), which finishes any open run, so the
            # SeRA run is resumed by id for each phase's statistics and finished again right after.
            if not wandb.api.api_key:
                wandb.login(key=s.wandb_key)
            run = wandb.init(entity=s.wandb_org, project=s.wandb_project, group=s.wandb_group,
                             name=f"{s.run_name}_sera", id=self._wandb_id, resume="allow", reinit=True)
            self._wandb_id = run.id
            run.log({**flat, "sera/iteration": t})
            run.finish()
        else:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=os.path.join(s.tensorboard_dir, f"{s.run_name}_sera")) as w:
                for k, v in flat.items():
                    w.add_scalar(k, v, t)
