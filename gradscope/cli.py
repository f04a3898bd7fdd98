"""The command line: argv in, a rendered report out, and the exit code CI gates on."""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import List, Optional, Tuple

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from . import __version__, interrupts, outputs, recorder
from .collect import distributed
from .baseline import DEFAULT_TOLERANCE, compare, load_baseline, write_baseline
from .config import load_config
from .run.diagnose import DEFAULT_STEPS, EXTEND, MAX_STEPS, diagnose, seed_everything
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, GradscopeError
from .present.formats import FORMATS, html_available, to_markdown
from .gate import FAIL_ON, Verdict, decide, unfinished
from .analyse.metrics import LAYER_METRICS, MODEL_METRICS
from .present.render import MAX_LAYER_ROWS, render, render_text
from .present.wording import plural
from .report import Report
from .analyse.ruleset import RuleSet, condition_lines, condition_metrics, load_rules
from .run.target import DEFAULT_CALLABLE, load_experiment
from .run.options import (BUDGET, FIRST_STEPS, MAX_TRIAL_STEPS, MIN_TRIAL_STEPS, MOST_TRIALS, ProfileOptions,
                           TrialOptions)

FORMAT_ENV = "GRADSCOPE_FORMAT"
SHOW_ALL = "--all-layers shows every one"  # under a capped layer table
# The fixes the library names as data (GradscopeError.remedy), in the command line's words.
REMEDIES = {
    "record-baseline": "write one with: gradscope diagnose TARGET --write-baseline {}",
    "re-record-baseline": "re-record it for this model: gradscope diagnose TARGET --write-baseline {}",
    "write-json-report": "write one with: gradscope diagnose TARGET --format json --output {}",
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
    d.add_argument("--steps", type=int, help=f"optimizer steps to profile, 1-{MAX_STEPS} (default {DEFAULT_STEPS}); "
                   f"while nothing is flagged and the loss has not fallen, the profile goes on, as many steps "
                   f"again at a time, to at most {EXTEND}x")
    d.add_argument("--no-extend", dest="extend", action="store_false",
                   help="profile exactly --steps steps, even when they show nothing yet")
    d.add_argument("--seed", type=_seed_arg, default=0, help="seed for torch, numpy and random before the target is built (default 0)")
    d.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to run (default auto)")
    d.add_argument("--rules", metavar="FILE", help="a rule file that extends or overrides the default rules")
    d.add_argument("--fail-on", choices=FAIL_ON, help="lowest severity that makes the exit code 1 (default error)")
    d.add_argument("--format", choices=tuple(FORMATS),
                   help=f"output format (default ${FORMAT_ENV}, else rich)")
    d.add_argument("--output", metavar="FILE", help="write the output to FILE instead of stdout")
    d.add_argument("--html", metavar="FILE", help="also write the HTML report, with plots, to FILE "
                                                  "(needs gradscope[html])")
    d.add_argument("--all-layers", action="store_true",
                   help=f"show every layer in the terminal report (default: the worst {MAX_LAYER_ROWS})")
    d.add_argument("--baseline", metavar="FILE", help="fail only on findings that are new or worse than in FILE")
    d.add_argument("--baseline-tolerance", type=_tolerance_arg, default=DEFAULT_TOLERANCE, metavar="X",
                   help=f"a global-norm p95 or max above X times the baseline's is a regression (default {DEFAULT_TOLERANCE:g})")
    d.add_argument("--write-baseline", metavar="FILE", help="record this run as the baseline in FILE (exit 0)")
    d.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files to DIR "
                                                        "(needs gradscope[tensorboard])")
    d.add_argument("--trials", type=_trials_arg, default=MOST_TRIALS, metavar="N|off",
                   help="when a finding calls for norm clipping, run up to N trials of a threshold from the same "
                        f"start, and recommend the winner (default {MOST_TRIALS}; off: an estimate from the profile "
                        "alone)")
    d.add_argument("--trial-steps", type=_number(int), metavar="N",
                   help=f"train every trial exactly N steps, {MIN_TRIAL_STEPS}-{MAX_TRIAL_STEPS}, and continue none "
                        f"(default: an adaptive horizon: every candidate {FIRST_STEPS} steps, then the contenders go "
                        "on, the horizon doubling, while their ranking is open)")
    d.add_argument("--trial-budget", type=_number(float), default=BUDGET, metavar="X",
                   help=f"trials may train at most X first-rung trials' worth of steps in all (default {BUDGET:g}: "
                        f"with the default --steps, diagnose then costs at most about {BUDGET + 2:g}x its profile)")
    d.add_argument("--trial-seconds", type=_number(float), metavar="S",
                   help="also start no trial that would end past S seconds of trials (makes the advice depend "
                        "on the machine's speed)")
    d.add_argument("--trial-states", choices=("device", "cpu"), default="device",
                   help="where the contenders' kept training states live (each a copy of the model and optimizer "
                        "state, at most 3 at once): cpu for a model whose device has no room for them")
    d.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    r = sub.add_parser("rules", help="list the rules in force (defaults plus an optional --rules file)")
    r.add_argument("--rules", metavar="FILE")
    r.add_argument("--verbose", "-v", action="store_true",
                   help="explain every rule: condition, params, metrics, message (as `gradscope rule ID` does)")
    r.add_argument("--debug", action="store_true")
    e = sub.add_parser("rule", help="explain one rule: what it tests, its thresholds, its message and remedy")
    e.add_argument("rule_id", metavar="ID")
    e.add_argument("--rules", metavar="FILE", help="a rule file that extends or overrides the defaults")
    e.add_argument("--debug", action="store_true")
    w = sub.add_parser("watch", help="run a training script unchanged, observing every optimizer step",
                       usage="gradscope watch [options] SCRIPT [ARGS...] | gradscope watch [options] -m MODULE [ARGS...]",
                       description="Runs SCRIPT (or -m MODULE) as python would, with its own arguments, stdout and "
                                   "exit code, and reports on the gradients of every optimizer step when it ends, "
                                   "however it ends. Exit codes: the script's own when it failed; else 0, or 1 "
                                   "for findings at or above --fail-on; 2 usage error or no step observed.")
    w.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m does")
    w.add_argument("--rules", metavar="FILE", help="a rule file that extends or overrides the default rules")
    w.add_argument("--fail-on", choices=FAIL_ON, help="lowest severity that makes the exit code 1 (default error)")
    w.add_argument("--format", choices=tuple(FORMATS), help=f"report format (default ${FORMAT_ENV}, else rich)")
    w.add_argument("--output", metavar="FILE", help="write the report to FILE (default: stderr, so that the "
                                                    "script's stdout stays its own)")
    w.add_argument("--html", metavar="FILE", help="also write the HTML report to FILE (needs gradscope[html])")
    w.add_argument("--every", type=_bounded(int, lambda v: v >= 1, "a whole number of at least 1"), default=1,
                   metavar="N", help="observe every N-th optimizer step (default 1)")
    w.add_argument("--log", choices=("wandb", "mlflow", "tensorboard"),
                   help="stream the first watched model's figures and findings while the script runs: to the "
                        "script's own W&B or MLflow run, or to TensorBoard (runs/)")
    w.add_argument("--debug", action="store_true", help="show tracebacks for gradscope's own errors")
    w.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script, run as python SCRIPT ARGS would")
    m = sub.add_parser("metrics", help="list the metrics rules can test")
    m.add_argument("--debug", action="store_true")
    return parser


WATCH_VALUED = ("-m", "--rules", "--fail-on", "--format", "--output", "--html", "--every", "--log")


def split_watch(argv: List[str]) -> Tuple[List[str], List[str]]:
    """``watch``'s own options (with ``--`` before SCRIPT, whatever its name looks like), and the script's
    arguments: everything after SCRIPT or -m MODULE is the script's, as python's own command line has it."""
    k = 0
    while k < len(argv):
        token = argv[k]
        if token == "-m":
            return argv[:k + 2], argv[k + 2:]
        if token in WATCH_VALUED:
            k += 2
            continue
        if token.startswith("-") and token != "-":
            k += 1
            continue
        return [*argv[:k], "--", token], argv[k + 1:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args: List[str] = []
    if argv[:1] == ["watch"]:
        own, script_args = split_watch(argv[1:])
        argv = ["watch", *own]
    args = parser.parse_args(argv)
    args.script_args = script_args
    if args.command == "diagnose":
        try:  # one validation, TrialOptions', for the command line and the Python API alike
            args.trial_options = TrialOptions(most=args.trials, steps=args.trial_steps, budget=args.trial_budget,
                                              seconds=args.trial_seconds, keep_on_cpu=args.trial_states == "cpu")
        except GradscopeError as exc:
            parser.error(f"{exc.problem} ({exc.hint})" if exc.hint else exc.problem)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        if args.command == "diagnose":
            return _diagnose(args, out, err)
        if args.command == "watch":
            return _watch(args, err)
        if args.command == "rules":
            if args.verbose:
                rule_set = load_rules(args.rules)
                texts = [_rule_text(rule.id, rule_set) for rule in rule_set.rules]
                out.print("\n\n".join(texts), markup=False, highlight=False, soft_wrap=True)
            else:
                out.print(_rules_table(args.rules))
            return EXIT_OK
        if args.command == "rule":
            out.print(_rule_text(args.rule_id, load_rules(args.rules)), markup=False, highlight=False, soft_wrap=True)
            return EXIT_OK
        out.print(_metrics_table())
        return EXIT_OK
    except GradscopeError as exc:
        if exc.partial is not None and args.command == "diagnose":
            with interrupts.shielded():  # the run is over; what it measured is saved whatever is pressed now
                _emit(exc.partial, unfinished(exc.partial, args.fail_on or "error", exc.problem, exc.exit_code),
                      args, out)
        if args.debug:
            err.print_exception()
        _print_error(err, exc, args.debug)
        return exc.exit_code
    except KeyboardInterrupt:  # outside profiling (importing the target): nothing to report
        err.print("gradscope: interrupted", highlight=False)
        return EXIT_INTERRUPTED


def _diagnose(args: argparse.Namespace, out: Console, err: Console) -> int:
    _apply_defaults(args)
    if not 1 <= args.steps <= MAX_STEPS:
        raise GradscopeError(f"{args.steps_source} must be between 1 and {MAX_STEPS}, got {args.steps}",
                             f"{DEFAULT_STEPS} steps show the trend (the default); for whole training runs use "
                             "gradscope.Monitor")
    rules = load_rules(args.rules)  # a bad rule file, baseline or destination fails before any training step
    baseline = load_baseline(args.baseline) if args.baseline else None
    _check_destinations(args)
    created = distributed.init_from_env(args.device)  # under torchrun: join the process group
    finished = False
    try:
        code = _diagnose_ranked(args, rules, baseline, out, err)
        finished = True
        return code
    except GradscopeError as exc:
        exc.problem = distributed.rank_prefix() + exc.problem
        raise
    finally:
        if created:
            distributed.leave(wait_for_others=finished)


def _diagnose_ranked(args: argparse.Namespace, rules, baseline, out: Console, err: Console) -> int:
    """The run itself; under a process group every rank trains and measures, and rank 0 reports."""
    seed_everything(args.seed)
    failure, experiment = None, None
    quiet = outputs.user_stdout_to_stderr(_document_on_stdout(args))  # prints must not corrupt a JSON document
    try:
        with quiet:
            experiment = load_experiment(args.target)
    except GradscopeError as exc:
        failure = exc
    distributed.agree(failure)  # if any rank could not build its experiment, every rank stops here
    ctx = distributed.context()
    main_rank = ctx is None or ctx.rank == 0
    # at 80 columns every part fits whole: long names and notes end in an ellipsis, never mid-bar
    with Progress(TextColumn("{task.description}", table_column=_clipped(24)), BarColumn(bar_width=16),
                  MofNCompleteColumn(), TextColumn("{task.fields[note]}", table_column=_clipped(20)),
                  TimeElapsedColumn(),
                  console=err, transient=True, disable=not (err.is_terminal and main_rank)) as progress, \
            outputs.user_stdout_to_stderr(_document_on_stdout(args)):
        task = progress.add_task(f"profiling {experiment.display_name}", total=args.steps, note="")
        report = diagnose(
            experiment, steps=args.steps, rules=rules, seed=args.seed,
            profile=ProfileOptions(extend=args.extend, device=args.device, restore=False), trials=args.trial_options,
            progress=lambda done, total, o: progress.update(task, completed=done, total=total,
                                                             note=f"global norm {o['global_norm']:.3g}"),
            trial_progress=lambda done, total, label: progress.update(
                task, description="trials", completed=done, total=total, note=label))
    trials = report.recommendation.evidence.trials
    if trials is not None and main_rank:  # the cost in time, on stderr: the report itself stays deterministic
        err.print(f"gradscope: {plural(len(trials.trials), 'trial')} took {trials.seconds:.1f} s, "
                  f"{trials.seconds / max(trials.profile_seconds, 1e-9):.1f}x the {trials.profile_seconds:.1f} s "
                  "of profiling", style="dim", highlight=False, soft_wrap=True)
    try:
        comparison = compare(report, baseline, args.baseline_tolerance) if baseline else None
    except GradscopeError as exc:  # a baseline of another model: the gate cannot be decided, the report stays
        exc.partial = exc.partial or report
        raise
    verdict = decide(report, args.fail_on, comparison)
    code = verdict.exit_code
    if main_rank:
        _emit(report, verdict, args, out)
        if args.tensorboard:
            from .integrations.tensorboard import write_tensorboard
            write_tensorboard(report, args.tensorboard)
        if args.write_baseline:
            write_baseline(report, args.write_baseline)  # checked before training, written atomically
            err.print(f"gradscope: wrote baseline {args.write_baseline} ({plural(len(report.findings), 'finding')})",
                      highlight=False, soft_wrap=True)
            code = EXIT_OK
    return distributed.broadcast_int(code)  # every rank exits as rank 0 does


def _watch(args: argparse.Namespace, err: Console) -> int:
    """Run the script under a Watcher, then report: the script's own exit code where it failed, else the gate's."""
    from .run import watch
    if bool(args.script) == bool(args.module):
        raise GradscopeError("gradscope watch takes a SCRIPT or -m MODULE, and one of them",
                             "gradscope watch train.py --epochs 1, or gradscope watch -m package.train")
    if args.script and not os.path.isfile(args.script):
        raise GradscopeError(f"the script {args.script} does not exist", "give the path of a Python file")
    config = load_config()
    args.fail_on = args.fail_on or config.get("fail-on", "error")
    args.format = args.format or os.environ.get(FORMAT_ENV) or "rich"
    if args.fail_on not in FAIL_ON or args.format not in FORMATS:
        raise GradscopeError(f"fail-on {args.fail_on!r} or format {args.format!r} is not known",
                             f"use one of {', '.join(FAIL_ON)}, and one of {', '.join(FORMATS)}")
    rules = load_rules(args.rules)
    if args.output:
        outputs.check(args.output, "--output")
    if args.html:
        outputs.check(args.html, "--html")
        html_available()
    log = None
    if args.log:  # a library that is not installed fails now, before the script runs
        from .live import LiveLog
        log = LiveLog(args.log)
    watcher = watch.Watcher(rules, every=args.every, log=log)
    watcher.start()
    try:
        ending = watch.run(args.module or args.script, args.script_args, module=bool(args.module))
    finally:
        watcher.stop()
    try:
        with interrupts.shielded(sigterm=True):  # the script is over; what was measured is written whatever comes
            return _watched(watch.reports(watcher, ending), ending, args, err)
    finally:
        recorder.disarm(ending.sigterm)


def _watched(reports: List[Report], ending, args: argparse.Namespace, err: Console) -> int:
    ctx = distributed.context()
    if ctx is not None and ctx.rank != 0:
        return ending.code if ending.failed else EXIT_OK
    if not reports:
        err.print("gradscope watch: no optimizer step was observed (does the script train with a torch.optim "
                  "optimizer?); no report", highlight=False, soft_wrap=True)
        return ending.code if ending.failed else EXIT_USAGE
    verdicts = [unfinished(r, args.fail_on, r.stopped_reason or "", ending.code) if ending.failed
                else decide(r, args.fail_on) for r in reports]
    if args.output:
        outputs.write_reports(args.output, reports, verdicts, args.format, "--output")
    elif args.format == "rich":
        for report, verdict in zip(reports, verdicts):
            err.print(render(report, verdict))
    else:
        sys.stderr.write("".join(FORMATS[args.format](r, v) for r, v in zip(reports, verdicts)))
    if args.html:
        outputs.write_reports(args.html, reports[:1], verdicts[:1], "html", "--html")
    if any(r.recommendation.method != "none" for r in reports):
        err.print("gradscope watch: the threshold is an estimate from the watched run (no trial runs inside a "
                  "script's own loop); `gradscope diagnose` on an Experiment of this model tries thresholds "
                  "for real and confirms it (docs/usage.md)", style="dim", highlight=False, soft_wrap=True)
    return ending.code if ending.failed else max(v.exit_code for v in verdicts)


def _trials_arg(text: str) -> int:
    if text == "off":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of trials or off, got {text!r}") from None


def _bounded(kind: type, ok, expected: str):
    """An argparse type: the text read as ``kind``, accepted when ``ok(value)``, else one clear line."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


_seed_arg = _bounded(int, lambda v: 0 <= v < 2 ** 64, "a seed from 0 to 2**64 - 1")  # what torch.manual_seed takes
# below 1, a run as good as its baseline would count as a regression
_tolerance_arg = _bounded(float, lambda v: 1 <= v < float("inf"), "a finite factor of at least 1")


def _number(kind: type):
    """An argparse type that reads the text as ``kind`` alone; TrialOptions checks the range."""
    return _bounded(kind, lambda v: True, "")


def _apply_defaults(args: argparse.Namespace) -> None:
    """Flags win; then [tool.gradscope] in pyproject.toml (and $GRADSCOPE_FORMAT); then built-in defaults."""
    config = load_config()
    args.steps_source = "--steps"
    if args.steps is None:
        args.steps = config.get("steps", DEFAULT_STEPS)
        args.steps_source = f"steps in [tool.gradscope] of {config.source}" if "steps" in config else "steps"
    args.rules = args.rules or config.get("rules")
    args.fail_on = args.fail_on or config.get("fail-on", "error")
    args.baseline = args.baseline or (None if args.write_baseline else config.get("baseline"))
    if args.fail_on not in FAIL_ON:
        raise GradscopeError(f"[tool.gradscope] fail-on is {args.fail_on!r}", f"use one of {', '.join(FAIL_ON)}")
    if args.format is None:
        args.format = os.environ.get(FORMAT_ENV) or "rich"
        if args.format not in FORMATS:
            raise GradscopeError(f"${FORMAT_ENV} is {args.format!r}, not a known format",
                                 f"use one of {', '.join(FORMATS)}, or unset it")


def _document_on_stdout(args: argparse.Namespace) -> bool:
    return args.format != "rich" and not args.output


def _check_destinations(args: argparse.Namespace) -> None:
    """Every file the run will write, checked now: a report must not be lost after the work is done."""
    if args.output:
        outputs.check(args.output, "--output")
    if args.write_baseline:
        outputs.check(args.write_baseline, "--write-baseline")
    if args.html:
        outputs.check(args.html, "--html")
    if args.html or args.format == "html":
        html_available()  # a missing plotting library is found now, not after the training steps
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if args.format == "github" and summary:
        outputs.check(summary, "$GITHUB_STEP_SUMMARY", append=True)


def _emit(report: Report, verdict: Verdict, args: argparse.Namespace, out: Console) -> None:
    fmt_name = args.format or "rich"
    if args.output:
        outputs.write_reports(args.output, [report], [verdict], fmt_name, "--output")
        outputs.save_batches(report.statistics.model.spikes, args.output)
    elif fmt_name == "rich" and out.is_terminal:
        out.print(render(report, verdict, all_layers=args.all_layers, show_all=SHOW_ALL))
    elif fmt_name == "rich":  # piped: plain text at the console's width, no padding at line ends
        sys.stdout.write(render_text(report, out.width, verdict, all_layers=args.all_layers, show_all=SHOW_ALL))
        sys.stdout.flush()
    else:
        sys.stdout.write(FORMATS[fmt_name](report, verdict))
        sys.stdout.flush()
    if args.html:
        outputs.write_reports(args.html, [report], [verdict], "html", "--html")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if fmt_name == "github" and summary:
        outputs.append(summary, to_markdown(report, verdict), "$GITHUB_STEP_SUMMARY")


def _clipped(width: int) -> Column:
    return Column(max_width=width, no_wrap=True, overflow="ellipsis")


def _print_error(err: Console, exc: GradscopeError, debug: bool = False) -> None:
    err.print(f"[bold red]gradscope: error:[/] {escape(exc.problem)}", highlight=False, soft_wrap=True)
    hint = REMEDIES[exc.remedy[0]].format(exc.remedy[1]) if exc.remedy and exc.remedy[0] in REMEDIES else exc.hint
    if not debug and exc.__cause__ is not None and not isinstance(exc.__cause__, GradscopeError):
        # the user's code raised: the library's hint says what to fix, the flag is the command line's to name
        hint = (hint + "; " if hint else "") + "--debug shows the traceback"
    if hint:
        err.print(f"  hint: {hint}", markup=False, highlight=False, soft_wrap=True)


def _rules_table(path: Optional[str]) -> Table:
    rule_set = load_rules(path)
    table = Table(title=f"rules from {', '.join(rule_set.sources)}", title_justify="left")
    for column in ("id", "severity", "scope", "remedy", "description"):
        table.add_column(column, overflow="fold")
    for rule in rule_set.rules:
        table.add_row(rule.id, rule.severity, rule.scope, rule.remedy, rule.description)
    return table


def _rule_text(rule_id: str, rule_set: RuleSet) -> str:
    """What a rule tests, as `ruff rule X` explains a lint: enough to see why it did or did not fire."""
    rule = rule_set.get(rule_id)
    if rule is None:
        close = difflib.get_close_matches(rule_id, [r.id for r in rule_set.rules], n=3)
        raise GradscopeError(f"no rule {rule_id!r} in {', '.join(rule_set.sources)}",
                             f"did you mean {', '.join(close)}?" if close else "`gradscope rules` lists them")
    metrics = {**MODEL_METRICS, **LAYER_METRICS}
    lines = [f"{rule.id} ({rule.severity}, {rule.scope} rule{', remedy: ' + rule.remedy if rule.remedy != 'none' else ''})",
             f"  {rule.description}" if rule.description else "", "", "fires when:",
             *condition_lines(rule.when, "  ")]
    if rule.match_kind or rule.match_name:
        lines += ["only for layers matching:"] + ([f"  kind: {', '.join(rule.match_kind)}"] if rule.match_kind else []) \
            + ([f"  name: {', '.join(rule.match_name)}"] if rule.match_name else [])
    if rule.params:
        lines += ["params (override them in a --rules file):",
                  *(f"  {name}: {value:g}" for name, value in rule.params.items())]
    lines += ["metrics:", *(f"  {m}: {metrics[m].description}" if m in metrics else f"  {m}"
                            for m in condition_metrics(rule.when))]
    lines += ["message:", f"  {rule.message}"]
    return "\n".join(line for i, line in enumerate(lines) if line or i == 2)


def _metrics_table() -> Table:
    table = Table(title="metrics a rule may test", title_justify="left")
    for column in ("metric", "scope", "meaning"):
        table.add_column(column, overflow="fold")
    for name, metric in {**MODEL_METRICS, **LAYER_METRICS}.items():
        table.add_row(name, metric.scope, metric.description)
    return table
