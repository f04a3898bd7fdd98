"""PyTorch Lightning: ``GradscopeCallback`` profiles gradients where Lightning shows them pre-clip.

Lightning calls ``on_before_optimizer_step`` after the closure has run backward (and, under AMP, after
the GradScaler has unscaled the gradients), and before it clips them and steps: once per optimizer
step, so accumulated micro-batches are observed once, at the accumulation boundary. There is one
Monitor per optimizer, over that optimizer's parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import lightning.pytorch as pl
import torch
from rich.console import Console

from ..errors import GradscopeError
from ..formats import FORMATS
from ..gate import decide
from ..monitor import Monitor
from ..render import render
from ..report import Report
from ..ruleset import RuleSet, load_rules
from ..testing import findings_table


class GradientHealthError(GradscopeError):
    """Raised at the end of fit when ``fail_on`` is set and findings reach it."""


class GradscopeCallback(pl.Callback):
    """Observe every optimizer step of a fit and report on the gradients at the end.

    ``output``: None prints the rich report; a path ending in ``.json`` writes JSON, ``.xml`` JUnit,
    ``.sarif`` SARIF, ``.md`` Markdown, anything else the plain-text report. ``fail_on`` ("error" or
    "warning") raises :class:`GradientHealthError` at the end of fit when findings reach it.
    ``update_every`` and ``histogram_sample`` are passed to each :class:`~gradscope.Monitor`.
    """

    def __init__(self, rules: Union[None, str, Path, RuleSet] = None, output: Union[None, str, Path] = None,
                 fail_on: Optional[str] = None, update_every: int = 4, histogram_sample: int = 4) -> None:
        if fail_on not in (None, "error", "warning"):
            raise GradscopeError(f"fail_on={fail_on!r}", "use None, 'error' or 'warning'")
        self.rules = rules if isinstance(rules, RuleSet) else load_rules(rules)  # a bad file fails at once
        self.output = output
        self.fail_on = fail_on
        self.monitor_options = {"update_every": update_every, "histogram_sample": histogram_sample}
        self.monitors: Dict[int, Monitor] = {}
        self.reports: List[Report] = []

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.monitors = {id(opt): Monitor(pl_module, parameters=_parameters(opt), **self.monitor_options)
                         for opt in trainer.optimizers}
        self.reports = []

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        monitor = self.monitors.get(id(_unwrap(optimizer)))
        if monitor is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            monitor.observe(scaler=scaler)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            for monitor in self.monitors.values():
                if monitor.steps:
                    monitor.note_loss(loss)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        name = type(pl_module).__name__
        for k, monitor in enumerate(self.monitors.values()):
            monitor.close()
            if monitor.steps:
                label = name if len(self.monitors) == 1 else f"{name} (optimizer {k})"
                self.reports.append(monitor.report(self.rules, name=label))
        if trainer.is_global_zero:
            self._emit()
        failing = [r for r in self.reports if self.fail_on and not decide(r, self.fail_on).passed]
        if failing:
            raise GradientHealthError("gradient health check failed at the end of fit:\n"
                                      + "\n".join(findings_table(r, decide(r, self.fail_on)) for r in failing),
                                      "see the gradscope report above, or pass fail_on=None")

    def _emit(self) -> None:
        if self.output is None:
            console = Console(highlight=False)
            for report in self.reports:
                console.print(render(report))
            return
        suffix = Path(self.output).suffix.lower()
        kind = {".json": "json", ".xml": "junit", ".sarif": "sarif", ".md": "markdown"}.get(suffix, "rich")
        texts = [FORMATS[kind](r, decide(r, self.fail_on or "never")) for r in self.reports]
        if kind == "json" and len(texts) > 1:  # one document: a list with a report per optimizer
            texts = [json.dumps([json.loads(t) for t in texts], indent=2) + "\n"]
        Path(self.output).write_text("".join(texts), encoding="utf-8")


def _parameters(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _unwrap(optimizer: Any) -> Any:
    """Lightning may hand over its LightningOptimizer wrapper; the Monitor is keyed by the real one."""
    return getattr(optimizer, "optimizer", optimizer) if type(optimizer).__name__ == "LightningOptimizer" \
        else optimizer
