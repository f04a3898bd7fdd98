"""Turn a Report into rich renderables: header, layer table, global sparkline, findings, advice, verdict.

Pure functions of the Report: nothing here computes a statistic, and no Console is made except in
``render_text``, which renders to a string for files and tests.
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from ..baseline import Comparison
from ..analyse.clipping import rate_windows
from ..analyse.evaluate import Finding
from ..gate import Verdict
from ..advise.judge import TrialSet
from ..report import Report
from ..analyse.ruleset import SEVERITIES
from ..analyse.stats import LayerStats
from .wording import (SEVERITY_RANK, advice, cause_line, spike_lines, say, clip_rate_words, clip_summary, fmt, fmt_count, guard_summary, guard_words,
                      plural, schedule_caveat, shorten_names)

BARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 16
LAYER_SPARK_WIDTH = 12
MAX_LAYER_ROWS = 12  # the worst layers the table shows; all_layers shows every one
SHOW_ALL = "all_layers=True shows every one"  # how to see the rest, in the caller's words (the CLI names its flag)
GROUP_NAMES = 3  # layers named in a grouped finding before "(N more)"
ORDER_KEY = "by worst finding, then share of the global norm"
STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
MARK = {"error": "✖", "warning": "▲", "info": "●"}


def render(report: Report, gate: Optional[Verdict] = None, *, all_layers: bool = False,
           show_all: str = SHOW_ALL) -> RenderableType:
    """The whole terminal report; ``all_layers`` lifts the cap on the layer table, and ``show_all`` says
    how to, under a capped one."""
    parts: List[RenderableType] = [header(report), global_line(report), LayerTable(report, all_layers, show_all)]
    if report.findings:
        parts.append(findings_block(report.findings, ordered_layers(report)))
    lines = spike_lines(report.statistics.model.spikes)
    if report.cause is not None or lines:
        parts.append(Group(*([Text.assemble(("likely cause: ", "bold"), cause_line(report.cause))]
                             if report.cause is not None else []),
                           *(Text(f"  {line}", "dim") for line in lines), Text("")))
    trials = report.recommendation.evidence.trials
    if trials is not None:
        parts.append(trials_table(trials))
    parts.append(recommendation_block(report))
    if gate is not None and gate.comparison is not None:
        parts.append(baseline_block(gate.comparison))
    if gate is not None and gate.unfinished is not None:
        parts.append(Text.assemble((f"✖ DID NOT FINISH (exit code {gate.exit_code}) ", "bold red"), gate.unfinished))
    else:
        parts.append(verdict(report))
    return Group(*parts)


def render_text(report: Report, width: int = 100, gate: Optional[Verdict] = None, *, all_layers: bool = False,
                show_all: str = SHOW_ALL) -> str:
    """The report as plain text at a fixed width, with no colour and no trailing spaces."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(
        render(report, gate, all_layers=all_layers, show_all=show_all))
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def trials_table(trials: TrialSet) -> RenderableType:
    """Every trial, loosest first, with its held-out loss and whether it stayed stable; the winner marked."""
    reach = (f"contenders carried to {trials.longest}" if trials.longest > trials.steps else "none carried further")
    title = (f"trials: every threshold {trials.steps} steps from the same start, {reach} ({trials.spent} steps in "
             f"all), judged on held-out batches (start {fmt(trials.start_held_out)})" if trials.adaptive else
             f"trials: {trials.steps} steps each from the same start ({trials.spent} steps in all), judged on "
             f"held-out batches (start {fmt(trials.start_held_out)})")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=title, title_justify="left", title_style="bold")
    for name, justify in (("clip at", "right"), ("steps", "right"), ("clipped", "right"), ("held-out", "right"),
                          ("loss over steps", "left"), ("verdict", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "verdict", overflow="fold")
    for t in (trials.reference, *trials.trials):
        if t.threshold == trials.winner:
            verdict = Text("✔ winner", "bold green")
        else:
            verdict = Text("stable", "green") if t.stable else Text(f"✖ {t.unstable}", "red")
        table.add_row("none" if math.isinf(t.threshold) else fmt(t.threshold), str(len(t.losses)),
                      f"{t.clip_fraction:.0%}",
                      fmt(t.held_out), sparkline(np.array(t.losses), width=LAYER_SPARK_WIDTH, log=False), verdict)
    notes = [Text(f"not tried: {', '.join(fmt(c) for c in trials.untried)}", "dim")] if trials.untried else []
    if trials.stopped:
        notes.append(Text(f"the trials stopped: {say(trials.stopped)}", "dim"))
    notes += [Text(say(n), "dim") for n in trials.notes]
    if trials.winner is not None and not trials.learned:
        further = ("a larger trial budget carries the contenders further" if trials.adaptive else
                   "the adaptive horizon (no fixed trial length) carries the contenders further")
        notes.append(Text(f"no threshold trained measurably within {trials.longest} steps, so the pick rests on "
                          f"stability alone; {further}", "yellow"))
    return Group(table, *notes, Text(""))


def baseline_block(c: Comparison) -> RenderableType:
    tally = (f"{len(c.new)} new or worse, {len(c.known)} known, {len(c.fixed)} fixed, {len(c.stale)} stale, "
             f"{len(c.regressions)} regression{'s' if len(c.regressions) != 1 else ''}")
    lines: List[RenderableType] = [Text.assemble(("baseline ", "bold"), (c.source, "cyan"), f": {tally}")]
    for f in c.new:
        lines.append(Text(f"  new: {f.rule_id}" + (f" ({f.layer})" if f.layer else ""), STYLE[f.severity]))
    for rule_id, layer in c.fixed:
        lines.append(Text(f"  fixed: {rule_id}" + (f" ({layer})" if layer else ""), "green"))
    for rule_id, layer in c.stale:
        lines.append(Text(f"  stale: {rule_id} ({layer}): the layer or rule no longer exists; rewrite the baseline",
                          "dim"))
    for r in c.regressions:
        lines.append(Text(f"  regression: {r.metric} is {fmt(r.current)}, over {r.tolerance:g}x the baseline's "
                          f"{fmt(r.baseline)}", "bold red"))
    return Group(*lines, Text(""))


def header(report: Report) -> RenderableType:
    m = report.statistics.model
    title = Text.assemble(("gradscope ", "bold"), (report.model, "bold cyan"))
    steps = f"{m.steps} step{'s' if m.steps != 1 else ''}"
    if report.steps_requested and report.steps_requested > m.steps:
        steps += f" of {report.steps_requested}"
    elif report.extended and report.extended.code == "profile_to_peak":
        steps += f" ({report.steps_requested} asked; on through the warm-up to the schedule's peak)"
    elif report.extended:
        steps += f" ({report.steps_requested} asked; the loss had not moved, so the profile went on)"
    line = Text(f"{steps} on {m.device}" + (f" · seed {report.seed}" if report.seed is not None else ""), "dim")
    lines = [title, line, Text(f"measured: {m.measurement}", "dim")]
    caveat = schedule_caveat(report.schedule)
    if caveat:
        lines.append(Text(f"▲ {caveat}", "yellow"))
    if report.partial:
        lines.append(Text(f"PARTIAL REPORT: {report.stopped_reason}", "bold yellow"))
    return Group(*lines, Text(""))


def global_line(report: Report) -> RenderableType:
    m = report.statistics.model
    mm = m.metrics
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row("global norm", sparkline(m.global_norm),
                 f"median {fmt(mm['global_norm_median'])} · max {fmt(mm['global_norm_max'])} · "
                 f"trend x{fmt(mm['global_norm_growth'])}/step")
    if np.isfinite(m.loss).any() or len(m.loss):
        grid.add_row("loss", sparkline(m.loss, log=False), f"first {fmt(mm['loss_first'])} · last {fmt(mm['loss_last'])}")
    if m.clip is not None:  # the run's own clipping, where gradscope was told of it
        grid.add_row("post-clip" if m.clip.spec.per_step else "clipping",
                     sparkline(m.post_clip_norm) if m.clip.spec.per_step else Text(""), clip_summary(m.clip, mm))
        _, _, rates = rate_windows(m.clip)
        if len(rates):
            grid.add_row("clip rate", sparkline(rates, log=False, bounds=(0.0, 1.0)), clip_rate_words(mm))
    return Group(grid, Text(""))


class LayerTable:
    """The layer table, worst first, laid out for the width it is given: names shortened from the middle
    (each still unique), numbers, headers and sparklines never cut; capped at MAX_LAYER_ROWS rows."""

    NUMBERS = ("params", "norm p50", "max", "g/w", "upd/w")

    def __init__(self, report: Report, all_layers: bool = False, show_all: str = SHOW_ALL) -> None:
        self.report, self.all_layers, self.show_all = report, all_layers, show_all

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        layers = ordered_layers(self.report)
        shown = layers if self.all_layers else layers[:MAX_LAYER_ROWS]
        worst = layer_severity(self.report.findings)
        rows = [self._cells(layer) for layer in shown]
        widths = [max([len(name), 6] + [len(r[i]) for r in rows]) for i, name in enumerate(self.NUMBERS)]
        spark = max([len("norm/step")] + [len(r[-1]) for r in rows])
        padding = 2 * (len(widths) + 1)  # two spaces between columns (collapsed padding), none at the edges
        room = max(options.max_width - sum(widths) - spark - padding, 12)
        kinds = max((len(layer.kind) + 1 for layer in shown), default=0)
        longest = max((len(layer.name) for layer in shown), default=0)
        show_kind = longest + kinds <= room or room - kinds >= 20  # names whole, or still 20 characters
        names = shorten_names([layer.name for layer in shown], room - (kinds if show_kind else 0))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        table.add_column("layer (kind)" if show_kind else "layer", no_wrap=True, overflow="ellipsis")
        for name, width in zip(self.NUMBERS, widths):  # numbers and headers never lose characters
            table.add_column(name, justify="right", no_wrap=True, min_width=width)
        table.add_column("norm/step", no_wrap=True, min_width=spark)
        for layer, cells in zip(shown, rows):
            name = Text.assemble((names[layer.name], STYLE.get(worst.get(layer.name, ""), "")),
                                 (f" {layer.kind}" if show_kind else "", "dim"))
            spark_cell = sparkline(layer.norm_series, width=LAYER_SPARK_WIDTH) if layer.status == "active" \
                else Text(layer.status, "dim")
            table.add_row(name, *cells[:-1], spark_cell)
        yield Text.assemble(("layers, worst first", "bold"), (f" ({ORDER_KEY})", "dim"))
        yield table
        if len(shown) < len(layers):
            yield Text(f"  … and {plural(len(layers) - len(shown), 'more layer')} ({self.show_all})", "dim")
        yield Text("")

    @staticmethod
    def _cells(layer: LayerStats) -> List[str]:
        """The plain figures of one row; the last is the sparkline's text (or the layer's status)."""
        if layer.status != "active":
            return [fmt_count(layer.params or layer.frozen_params), "", "", "", "", layer.status]
        mm = layer.metrics
        return [fmt_count(layer.params), fmt(mm["grad_norm_median"]), fmt(mm["grad_norm_max"]),
                fmt(mm["grad_to_weight_median"]), fmt(mm["update_ratio_median"]),
                sparkline(layer.norm_series, width=LAYER_SPARK_WIDTH).plain]


def findings_block(findings: Sequence[Finding], order: Sequence[LayerStats] = ()) -> RenderableType:
    """Findings grouped by rule, most severe first: one line per rule, naming its worst layers (in the
    layer table's order) and how many more, then the message of the worst one."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for severity, rule_id, group in grouped(findings, order):
        mark = Text(f" {MARK[severity]} {severity}", STYLE[severity])
        if len(group) == 1:
            grid.add_row(mark, Text.assemble((rule_id, "bold"), f": {group[0].message}"))
            continue
        named = ", ".join(f.layer or "(model)" for f in group[:GROUP_NAMES])
        more = f", … ({len(group) - GROUP_NAMES} more)" if len(group) > GROUP_NAMES else ""
        grid.add_row(mark, Text.assemble((rule_id, "bold"), f" in {plural(len(group), 'layer')}: {named}{more}"))
        grid.add_row("", Text(f"worst: {group[0].message}", "dim"))
    return Group(Text("findings", "bold"), grid, Text(""))


def recommendation_block(report: Report) -> RenderableType:
    rec = report.recommendation
    ev = rec.evidence
    if rec.method == "none":
        title = Text.assemble(("recommendation: ", "bold"), ("no clipping needed", "bold green"),
                              (guard_words(rec), "bold magenta"))
    else:
        title = Text.assemble(("recommendation: ", "bold"), (advice(rec), "bold magenta"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    if rec.method != "none":
        where = "steps of the winning trial" if ev.trials is not None and ev.trials.winner else "profiled steps"
        figures = f"would have clipped {ev.clip_fraction:.0%} of the {where}"
        if ev.cosine is not None:
            figures += f"; cosine to the unclipped gradient {ev.cosine:.3f}"
        if ev.element_fraction is not None:
            figures += f"; caps {ev.element_fraction:.2%} of elements"
        grid.add_row("evidence", figures)
    grid.add_row("basis", Text(say(ev.basis), "dim"))
    if rec.guard is not None:
        grid.add_row("guard", Text(guard_summary(rec.guard), "dim"))
    for name, code in rec.snippets.items():
        grid.add_row(name, Text(code))  # code, not markup: a list's brackets must print
    return Group(title, Padding(grid, (0, 0, 0, 2)), Text(""))


def verdict(report: Report) -> RenderableType:
    counts = {s: sum(1 for f in report.findings if f.severity == s) for s in reversed(SEVERITIES)}
    tally = ", ".join(plural(n, s) for s, n in counts.items() if n) or "no findings"
    words = advice(report.recommendation)
    worst = report.worst_severity
    if worst == "error":
        top = next(f for f in report.findings if f.severity == "error")
        return Text.assemble(("✖ UNHEALTHY ", "bold red"), f"{tally}; worst: {top.rule_id}. Advice: {words}.")
    if worst == "warning":
        return Text.assemble(("▲ AT RISK ", "bold yellow"), f"{tally}. Advice: {words}.")
    return Text.assemble(("✔ HEALTHY ", "bold green"), f"{tally}. Advice: {words}.")


# -- small pieces ---------------------------------------------------------------------------------------
def grouped(findings: Sequence[Finding], order: Sequence[LayerStats] = ()) -> List[tuple]:
    """(severity, rule id, findings) per rule, most severe first; within a rule, layers in ``order``."""
    position = {layer.name: i for i, layer in enumerate(order)}
    groups: Dict[tuple, List[Finding]] = {}
    for f in findings:
        groups.setdefault((f.severity, f.rule_id), []).append(f)
    return [(severity, rule_id, sorted(group, key=lambda f: position.get(f.layer or "", len(position))))
            for (severity, rule_id), group in sorted(groups.items(), key=lambda kv: SEVERITY_RANK[kv[0][0]])]


def ordered_layers(report: Report) -> List[LayerStats]:
    """Layers with findings first (by severity), then by share of the global norm; frozen ones last."""
    worst = layer_severity(report.findings)

    def key(layer: LayerStats):
        share = layer.metrics.get("grad_norm_share", float("nan")) if layer.metrics else float("nan")
        return (layer.status == "frozen", SEVERITY_RANK.get(worst.get(layer.name, ""), len(SEVERITY_RANK)),
                -(share if math.isfinite(share) else -1.0))
    return sorted(report.statistics.layers, key=key)


def layer_severity(findings: Sequence[Finding]) -> Dict[str, str]:
    worst: Dict[str, str] = {}
    for f in findings:
        if f.layer is not None and SEVERITY_RANK[f.severity] < SEVERITY_RANK.get(worst.get(f.layer, ""), len(SEVERITY_RANK)):
            worst[f.layer] = f.severity
    return worst


def sparkline(values: np.ndarray, width: int = SPARK_WIDTH, log: bool = True,
              bounds: Optional[tuple] = None) -> Text:
    """Bars for a series on a log scale, averaged down to ``width`` buckets; ✕ marks a non-finite bucket.
    ``bounds`` fixes the scale's ends (a rate from 0 to 1) rather than the series' own range."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return Text("")
    buckets = np.array_split(v, min(width, v.size))
    out, marks = [], []
    for b in buckets:
        if not np.isfinite(b).all():
            marks.append(True)
            out.append(np.nan)
        else:
            marks.append(False)
            out.append(float(np.mean(np.log10(np.maximum(b, 1e-30)) if log else b)))
    arr = np.array(out)
    ok = np.isfinite(arr)
    lo, hi = (arr[ok].min(), arr[ok].max()) if ok.any() else (0.0, 0.0)
    if bounds is not None:
        lo, hi = bounds
    text = Text()
    for value, bad in zip(arr, marks):
        if bad:
            text.append("✕", "bold red")
        else:
            level = 0 if hi <= lo else int(round((value - lo) / (hi - lo) * (len(BARS) - 1)))
            text.append(BARS[level])
    return text
