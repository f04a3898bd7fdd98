"""The command line: argv in, a rendered report out, and the exit code CI gates on."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .diagnose import DEFAULT_STEPS, MAX_STEPS, diagnose, seed_everything
from .errors import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, GradscopeError
from .metrics import LAYER_METRICS, MODEL_METRICS
from .render import render, render_text
from .report import Report
from .ruleset import SEVERITIES, load_rules
from .target import DEFAULT_CALLABLE, load_experiment

FORMATS: Dict[str, Callable[[Report], str]] = {
    "json": lambda report: report.to_json(),
    "rich": lambda report: render_text(report, width=100),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other usage error
        self.print_usage(sys.stderr)
        sys.stderr.write(f"gradscope: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradscope", description="Profile gradients, diagnose explosion risk, recommend clipping.")
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("diagnose", help="profile a few training steps and report on the gradients",
                       description="Exit codes: 0 no finding at or above --fail-on; 1 findings at or above it; "
                                   "2 usage error, bad target or rule file, or a model or loss that raised; "
                                   "130 interrupted.")
    d.add_argument("target", help=f"path/to/file.py[:callable] or package.module:callable "
                                  f"(a bare file uses the callable '{DEFAULT_CALLABLE}')")
    d.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps to profile, 1-{MAX_STEPS} (default {DEFAULT_STEPS})")
    d.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and random before the target is built (default 0)")
    d.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to run (default auto)")
    d.add_argument("--rules", metavar="FILE", help="a rule file that extends or overrides the default rules")
    d.add_argument("--fail-on", choices=("error", "warning", "never"), default="error",
                   help="lowest severity that makes the exit code 1 (default error)")
    d.add_argument("--format", choices=tuple(FORMATS), default="rich", help="output format (default rich)")
    d.add_argument("--output", metavar="FILE", help="write the output to FILE instead of stdout")
    d.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    r = sub.add_parser("rules", help="list the rules in force (defaults plus an optional --rules file)")
    r.add_argument("--rules", metavar="FILE")
    r.add_argument("--debug", action="store_true")
    m = sub.add_parser("metrics", help="list the metrics rules can test")
    m.add_argument("--debug", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        if args.command == "diagnose":
            return _diagnose(args, out, err)
        if args.command == "rules":
            out.print(_rules_table(args.rules))
            return EXIT_OK
        out.print(_metrics_table())
        return EXIT_OK
    except GradscopeError as exc:
        if exc.partial is not None and args.command == "diagnose":
            _emit(exc.partial, args, out)
        if args.debug:
            err.print_exception()
        _print_error(err, exc)
        return exc.exit_code


def _diagnose(args: argparse.Namespace, out: Console, err: Console) -> int:
    if not 1 <= args.steps <= MAX_STEPS:
        raise GradscopeError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}",
                             "a few dozen steps show the trend; use gradscope.Monitor for whole training runs")
    rules = load_rules(args.rules)  # a bad rule file fails before any training step
    seed_everything(args.seed)
    experiment = load_experiment(args.target)
    with Progress(TextColumn("profiling {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("global norm {task.fields[norm]}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(experiment.display_name, total=args.steps, norm="–")
        report = diagnose(experiment, steps=args.steps, rules=rules, seed=args.seed, device=args.device,
                          restore=False,
                          progress=lambda done, total, o: progress.update(task, completed=done, norm=f"{o['global_norm']:.3g}"))
    _emit(report, args, out)
    return exit_code(report, args.fail_on)


def exit_code(report: Report, fail_on: str) -> int:
    """1 when a finding is at or above ``fail_on``; ``never`` always gives 0."""
    if fail_on == "never" or report.worst_severity is None:
        return EXIT_OK
    return EXIT_FINDINGS if SEVERITIES.index(report.worst_severity) >= SEVERITIES.index(fail_on) else EXIT_OK


def _emit(report: Report, args: argparse.Namespace, out: Console) -> None:
    if args.output:
        Path(args.output).write_text(FORMATS[args.format](report), encoding="utf-8")
    elif args.format == "rich":
        out.print(render(report))
    else:
        sys.stdout.write(FORMATS[args.format](report))


def _print_error(err: Console, exc: GradscopeError) -> None:
    err.print(f"[bold red]gradscope: error:[/] {escape(exc.problem)}", highlight=False, soft_wrap=True)
    if exc.hint:
        err.print(f"  hint: {exc.hint}", markup=False, highlight=False, soft_wrap=True)


def _rules_table(path: Optional[str]) -> Table:
    rule_set = load_rules(path)
    table = Table(title=f"rules from {', '.join(rule_set.sources)}", title_justify="left")
    for column in ("id", "severity", "scope", "remedy", "description"):
        table.add_column(column, overflow="fold")
    for rule in rule_set.rules:
        table.add_row(rule.id, rule.severity, rule.scope, rule.remedy, rule.description)
    return table


def _metrics_table() -> Table:
    table = Table(title="metrics a rule may test", title_justify="left")
    for column in ("metric", "scope", "meaning"):
        table.add_column(column, overflow="fold")
    for name, metric in {**MODEL_METRICS, **LAYER_METRICS}.items():
        table.add_row(name, metric.scope, metric.description)
    return table
