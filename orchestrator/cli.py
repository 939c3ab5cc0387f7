"""`lottery`: the command line. Each command validates everything before any work starts.

Longer than the ~450 lines a module usually gets, on purpose: one function per command, each a thin
layer (its flags, their help, its exit codes) over the run/ or tracking/ module that does the work;
the help text, which `lottery --help` and docs/commands.md show, is most of it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from orchestrator import layout
from orchestrator.errors import (
    ERRORED_EXIT,
    STORAGE_EXIT,
    TRACKING_EXIT,
    USAGE_EXIT,
    UserError,
    fail,
    usage_error_line,
    user_errors,
)
from trainers.config import DATASET_NAMES, MODEL_NAMES, SCHEMES


class OneLineGroup(TyperGroup):
    """A flag mistake reads like every other mistake: one `error:` line, exit 2 (not Typer's box)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            raise SystemExit(1) from None
        except typer.TyperException as exc:  # Typer's usage errors (its own copy of click's)
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `lottery`: the help, as before
                typer.echo(exc.ctx.get_help())
                raise SystemExit(USAGE_EXIT) from None
            fail(usage_error_line(exc))
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineGroup,
    add_completion=False,
    no_args_is_help=True,
    help="How much does a CNN result depend on its seed, and does filter re-initialization fix it?",
)
console = Console(stderr=True)
SWEEP_HELP = "Sweep name (its directory under $LOTTERY_HOME, default ./runs), or its path."


def table_console() -> Console:
    """Stdout for tables; piped into a file or a CI log it is wide, as 80 columns would cut them."""
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=200)


@app.callback()
def _root() -> None:
    """Seed sweeps of CNN training schemes, tracked in MLflow. RAY_AUTH_MODE: see README."""


@app.command()
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Trial YAML (TrialConfig fields).")
    ] = None,
    scheme: Annotated[str | None, typer.Option(help=" | ".join(SCHEMES))] = None,
    model: Annotated[str | None, typer.Option(help=" | ".join(MODEL_NAMES))] = None,
    dataset: Annotated[str | None, typer.Option(help=" | ".join(DATASET_NAMES))] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (else $LOTTERY_DATA_DIR).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default 10).")] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (CUDA if present) | cpu | cuda; checked before training.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Initialization seed.")] = None,
    data_seed: Annotated[int | None, typer.Option(help="Split and batch-order seed.")] = None,
    tau: Annotated[
        float | None,
        typer.Option(
            help="CGN threshold (RandomOut's tau; summed-loss units unless scheme.cgn_reduction is mean)."
        ),
    ] = None,
    active_fraction: Annotated[float | None, typer.Option(help="RandomOut P.")] = None,
    drop_fraction: Annotated[float | None, typer.Option(help="RePr p.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any field, dotted: --set model.filters=4")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Results root (default $LOTTERY_HOME or ./runs).")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite).")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "lottery-train",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Only write the trial directory.")] = False,
    retrain_changed: Annotated[
        bool,
        typer.Option(
            "--retrain-changed", help="Set aside a stored result trained on other data and train again."
        ),
    ] = False,
) -> None:
    """Train one trial: results to <results root>/train/trials/<trial_key>/ first, then one MLflow run.

    Exit codes: 0 trained (or its stored result reused) and logged; 2 a mistake in the input (nothing
    started); 3 the result is kept but MLflow could not take its run (run the same command again).
    """
    from orchestrator.run.single import build_trial_config, run_single

    flags = {
        "scheme.name": scheme,
        "model.name": model,
        "data.name": dataset,
        "data.data_dir": str(data_dir) if data_dir else None,
        "epochs": epochs,
        "device": device,
        "seed": seed,
        "data_seed": data_seed,
        "tau": tau,
        "scheme.active_fraction": active_fraction,
        "scheme.drop_fraction": drop_fraction,
    }
    trial = build_trial_config(config, flags, set_ or [])
    tracked = run_single(
        trial,
        root=out or layout.results_root(),
        tracking_uri=tracking_uri,
        experiment=experiment,
        log=not no_mlflow,
        retrain_changed=retrain_changed,
    )
    if not tracked:
        raise typer.Exit(TRACKING_EXIT)


@app.command()
@user_errors
def sweep(
    spec: Annotated[Path, typer.Argument(help="Sweep spec YAML (see configs/).")],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Run every check the real run does (spec, data files, device, resources, stored "
            "results), print the planned trials and an estimated cost; start nothing.",
        ),
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Require an existing sweep to continue.")] = False,
    allow_mixed: Annotated[
        bool,
        typer.Option(
            "--allow-mixed",
            help="Resume although the pack size or device differs from the finished trials' "
            "(both change exact numbers; each result records its own).",
        ),
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (else spec, $RAY_ADDRESS, local).")
    ] = None,
    retrain_changed: Annotated[
        bool,
        typer.Option(
            "--retrain-changed",
            help="Set aside (keep) stored results trained on other data than the data now loaded, and "
            "train those trials again; without it such a sweep is refused.",
        ),
    ] = False,
    estimate: Annotated[
        bool, typer.Option(help="With --dry-run: time one epoch per kind of trial to estimate the cost.")
    ] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any spec field, dotted, over the file's: --set base.device=cpu"),
    ] = None,
) -> None:
    """Run every trial of a sweep on Ray Tune; re-running the same command resumes it.

    Results go to <storage_path>/<name>/ (storage_path from the spec, else $LOTTERY_HOME, else ./runs).
    One driver per sweep: a second one at the same time is refused. SIGTERM stops it as Ctrl-C does.

    Exit codes: 0 every trial ended and is tracked; 1 interrupted (run it again to resume);
    2 a mistake in the input (nothing started); 3 every trial ended but some MLflow runs are
    missing (run `lottery sync`); 4 every trial ended but some errored: the last line names how
    many and the first error (running again gives each errored trial one more try). A unit that
    fails twice with the same error and no epoch in between is not retried again; 5 stopped because
    the sweep directory became full or read-only (free space or remount it, then run it again to
    resume).
    """
    from orchestrator.run.dry_run import dry_run as show_plan
    from orchestrator.run.sweep import run_sweep
    from orchestrator.spec import load_plan

    plan = load_plan(spec, set_ or [])  # every trial validated before anything is created
    if dry_run:
        show_plan(
            plan,
            layout.results_root(),
            table_console(),
            address=address,
            allow_mixed=allow_mixed,
            retrain_changed=retrain_changed,
            estimate_cost=estimate,
        )
        return
    try:
        outcome = run_sweep(
            plan,
            root=layout.results_root(),
            resume=resume,
            address=address,
            console=console,
            allow_mixed=allow_mixed,
            retrain_changed=retrain_changed,
        )
    except KeyboardInterrupt:  # before Tune took over Ctrl-C (starting Ray, opening tracking)
        console.print(
            f"stopped during start-up; nothing is lost: run `lottery sweep {spec}` again to resume",
            soft_wrap=True,  # one line, so the command can be copied whole
        )
        raise typer.Exit(130) from None
    c = outcome.counts
    if outcome.storage_fault:
        console.print(f"error: {outcome.storage_fault}", highlight=False, soft_wrap=True)
    console.print(
        f"{c['finished']}/{c['planned']} finished ({c['failed']} failed), {c['errored']} errored, "
        f"{c['damaged']} damaged, {c['unfinished']} unfinished in {outcome.sweep_dir} "
        f"(MLflow parent run {outcome.parent_run_id}); next: lottery aggregate {outcome.sweep_dir}"
    )
    if outcome.storage_fault:
        console.print(
            f"stopped (exit {STORAGE_EXIT}): once the disk has room or is writable again, run "
            f"`lottery sweep {spec}` to resume",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(STORAGE_EXIT)
    if not outcome.complete:
        console.print(f"interrupted: run `lottery sweep {spec}` again to resume", soft_wrap=True)
        raise typer.Exit(1)
    if not outcome.tracked:
        console.print(
            f"tracking incomplete (exit {TRACKING_EXIT}): run `lottery sync {outcome.sweep_dir}`",
            highlight=False,
            soft_wrap=True,
        )
    if c["errored"]:  # after the tracking advice: the last line, and its exit code, name the errors
        from orchestrator.run.errored import errored_line

        keys = layout.planned_keys(outcome.sweep_dir)
        line = errored_line(outcome.sweep_dir, keys, c["errored"])
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # an error's own [brackets] kept
        raise typer.Exit(ERRORED_EXIT)
    if not outcome.tracked:
        raise typer.Exit(TRACKING_EXIT)


@app.command()
@user_errors
def aggregate(
    sweep: Annotated[str, typer.Argument(help=SWEEP_HELP)],
) -> None:
    """Summarise a sweep's trials; write Parquet tables and attach them to the sweep's parent run."""
    from dashboards.sources import format_variance_table
    from dashboards.stats import never_acted
    from orchestrator.aggregate import aggregate as aggregate_sweep
    from orchestrator.aggregate import damaged_lines
    from orchestrator.fate import format_fate_table
    from orchestrator.tables import (
        format_decision_table,
        format_looks_table,
        format_rounds_table,
        format_summary_table,
        sequential_statement,
    )
    from orchestrator.tracking.study import summary_to_parent
    from orchestrator.tracking.sweep import attach_files, parent_record

    sweep_dir = layout.resolve_sweep_dir(sweep, layout.results_root())
    result = aggregate_sweep(sweep_dir)
    table_console().print(format_summary_table(result.summary))
    for line in never_acted(result.summary):
        console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
    table_console().print(format_decision_table(result.decision, result.summary))
    if not result.variance.empty:
        table_console().print(format_variance_table(result.variance))
    if not result.fate.empty:
        table_console().print(format_fate_table(result.fate))
    if not result.rounds.empty:
        table_console().print(format_rounds_table(result.rounds))
    for line in damaged_lines(result.trials):
        console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
    statement = sequential_statement(result.looks)
    if statement:
        table_console().print(format_looks_table(result.looks))
        table_console().print(statement, highlight=False)
    tables = sorted(layout.aggregate_dir(sweep_dir).glob("*.parquet"))
    record = parent_record(sweep_dir, console)  # None for a copy: never the original's parent run
    if record is not None:
        attach_files(record, tables, layout.AGGREGATE, console)
        summary_to_parent(record, sweep_dir, result, console)


@app.command("plan")
@user_errors
def plan_seeds(
    sweep: Annotated[
        str | None, typer.Argument(help="A finished pilot sweep (name or path); or give --rate / --gain-sd.")
    ] = None,
    within: Annotated[float, typer.Option(help="Estimate each failure rate within +-W (95%).")] = 0.05,
    gain: Annotated[
        float | None, typer.Option(help="Paired gain to detect, an accuracy fraction (0.01 = 1 point).")
    ] = None,
    power: Annotated[float, typer.Option(help="Power for the paired gain.")] = 0.8,
    rate: Annotated[list[float] | None, typer.Option(help="A failure rate to plan for (repeatable).")] = None,
    gain_sd: Annotated[float | None, typer.Option(help="Standard deviation of the paired gains.")] = None,
    batch: Annotated[
        int, typer.Option(help="Pairs added between two looks of a sequential study (its seeds.batch).")
    ] = 20,
) -> None:
    """Seeds per arm to estimate a failure rate within +-W, or to detect a paired gain at a given power."""
    from rich.table import Table

    from dashboards.planning import (
        METHOD_ANYTIME,
        METHOD_FIXED,
        METHOD_PAIRED,
        METHOD_PAIRED_SEQUENTIAL,
        PLAN_COLUMNS,
        plan_from_pilot,
        plan_from_rates,
    )

    checks = [
        ("--within", within, 0 < within <= 0.5, "a half-width in (0, 0.5]"),
        ("--power", power, 0.05 < power < 1, "a probability in (0.05, 1)"),
        ("--gain", gain, gain is None or 0 < gain < 1, "an accuracy fraction in (0, 1)"),
        ("--gain-sd", gain_sd, gain_sd is None or gain_sd > 0, "a positive number"),
        ("--batch", batch, batch >= 1, "a whole number of pairs >= 1"),
        *[("--rate", r, 0 < r < 1, "a rate in (0, 1)") for r in rate or []],
    ]
    for flag, value, ok, wanted in checks:
        if not ok:
            raise UserError(f"{flag}: needs {wanted}, got {value:g}")
    if sweep is None and not rate and gain_sd is None:
        raise UserError("plan: give a finished pilot sweep, or --rate P and/or --gain-sd S with --gain D")
    if gain_sd is not None and gain is None:
        raise UserError("--gain-sd: give the gain to detect with --gain D")
    if sweep is not None:
        from orchestrator.aggregate import load_trials

        rows = plan_from_pilot(
            load_trials(layout.resolve_sweep_dir(sweep, layout.results_root())), within, gain, power, batch
        )
    else:
        rows = plan_from_rates(rate or [], within, gain, gain_sd, power, batch)
    gain_text = f"gain {gain:g} at power {power:g}" if gain else "no --gain given"
    table = Table(
        title=f"Seeds per arm: failure rate within +-{within:g} (95%); paired {gain_text}",
        caption=(
            f"methods: {METHOD_FIXED}; {METHOD_ANYTIME}; {METHOD_PAIRED}; "
            f"{METHOD_PAIRED_SEQUENTIAL}, a look every {batch} pairs"
        ),
    )
    for column in PLAN_COLUMNS:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in rows.itertuples(index=False):
        table.add_row(*(_plan_cell(v) for v in row))
    table_console().print(table)


def _plan_cell(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None or value != value:  # NaN
        return "-"
    if value == float("inf"):
        from dashboards.planning import SEQUENTIAL_PAIRED_MAX

        return f"> {SEQUENTIAL_PAIRED_MAX}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


@app.command()
@user_errors
def report(
    sweep: Annotated[str, typer.Argument(help=SWEEP_HELP)],
) -> None:
    """Build the HTML report of an aggregated sweep; attach it and its figures to the parent run."""
    from dashboards.report import build_report
    from orchestrator.aggregate import read_aggregate
    from orchestrator.provenance import report_provenance
    from orchestrator.tracking.sweep import attach_to_parent

    sweep_dir = layout.resolve_sweep_dir(sweep, layout.results_root())
    tables = read_aggregate(sweep_dir)  # the report's numbers come from nothing else
    html = build_report(
        tables.trials,
        tables.epochs,
        tables.summary,
        layout.report_build_dir(sweep_dir),
        name=sweep_dir.name,
        provenance=report_provenance(sweep_dir),
        looks=tables.looks,
        question=str(layout.read_spec(sweep_dir).get("description") or ""),
        decision=tables.decision,
    )
    layout.publish(html.parent, layout.report_dir(sweep_dir))  # a URI sweep's copy on its store
    attach_to_parent(sweep_dir, [html, *sorted(html.parent.glob("*.png"))], layout.REPORT, console)
    print(html)


@app.command()
@user_errors
def ui(
    sweep: Annotated[str, typer.Argument(help=SWEEP_HELP)],
    port: Annotated[int, typer.Option(help="Port of the MLflow UI on 127.0.0.1.")] = 5000,
) -> None:
    """Serve the MLflow UI on a sweep's store: prints the URL of its runs, grouped by arm (scheme, width
    and hyperparameters), and of its parent run (the study: question, setting, per-arm table)."""
    from orchestrator.tracking.study import (
        arm_labels,
        experiment_route,
        refuse_busy_port,
        run_route,
        save_runs_view,
        stale_line,
    )
    from orchestrator.tracking.sweep import SweepRecord, ui_tracking_uri
    from orchestrator.tracking.ui_server import OPEN_PATH, arm_colors, serve

    sweep_dir = layout.resolve_sweep_dir(sweep, layout.results_root())
    uri = ui_tracking_uri(sweep_dir)
    refuse_busy_port(port)
    record = SweepRecord.load(sweep_dir)
    base = f"http://127.0.0.1:{port}{OPEN_PATH}"
    routes, colors = {"": "#/experiments"}, {}
    if record is not None:
        from orchestrator.aggregate import load_trials
        from orchestrator.tracking.runs import client_for

        client = client_for(record.tracking_uri)
        view = save_runs_view(client, record.experiment_id)
        routes = {
            "": experiment_route(record.experiment_id, view),
            record.parent_run_id: run_route(record.experiment_id, record.parent_run_id),
        }
        colors = arm_colors(sorted(set(arm_labels(client, record).values())))
        stale = stale_line(record, load_trials(sweep_dir), sweep_dir)
        if stale:
            console.print(f"[yellow]{stale}[/]", highlight=False, soft_wrap=True)
        console.print(
            f"MLflow UI on {uri}: the runs grouped by arm, then the study (the parent run):",
            highlight=False,
            soft_wrap=True,
        )
        print(base, flush=True)
        print(f"{base}?run={record.parent_run_id}", flush=True)
    else:
        console.print(f"MLflow UI on {uri}:", highlight=False, soft_wrap=True)
        print(base, flush=True)
    serve(uri, layout.artifacts_dir(sweep_dir), port, routes, colors)


@app.command()
@user_errors
def sync(
    sweep: Annotated[str, typer.Argument(help=SWEEP_HELP)],
    tracking_uri: Annotated[
        str | None,
        typer.Option(help=f"MLflow URI for this run of sync (default: the one in {layout.RECORD})."),
    ] = None,
) -> None:
    """Log the MLflow runs that a tracking outage left out; safe to run any number of times."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from orchestrator.tracking.sync import STORE_ERRORS, store_error_line, sync_sweep

    sweep_dir = layout.resolve_sweep_dir(sweep, layout.results_root())
    # One bar however many runs are logged, shown once logging starts (a store error stays one line).
    bar = Progress(TextColumn(f"sync {sweep_dir.name}"), BarColumn(), MofNCompleteColumn(), console=console)

    def on_logged(done: int, total: int) -> None:
        if not bar.task_ids:
            bar.start()
            bar.add_task("runs", total=total)
        bar.update(bar.task_ids[0], completed=done, total=total)

    try:
        with contextlib.ExitStack() as stack:
            stack.callback(bar.stop)
            report = sync_sweep(sweep_dir, tracking_uri, on_logged, console)
    except STORE_ERRORS as exc:
        console.print(store_error_line(exc, sweep_dir, tracking_uri), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for key, problem in report.damaged:
        console.print(
            f"[yellow]skipped damaged trial {key} ({problem}); `lottery sweep` trains it again[/]",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"sync {sweep_dir.name}: {report.created} created, {report.present} already present, "
        f"{report.unfinished} not finished, {len(report.damaged)} damaged (parent run "
        f"{report.record.parent_run_id} at {report.record.tracking_uri})",
        highlight=False,
        soft_wrap=True,
    )


RayAddress = Annotated[
    str,
    typer.Option(
        "--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray Jobs API of the cluster: http://HEAD:8265"
    ),
]


@app.command()
@user_errors
def submit(
    spec: Annotated[Path, typer.Argument(help="Sweep spec YAML inside this checkout (it is uploaded).")],
    address: RayAddress,
) -> None:
    """Validate a sweep here, then run `lottery sweep SPEC` on a Ray cluster as a job; prints the job id."""
    from orchestrator.run.submit import submit_sweep
    from orchestrator.spec import load_plan

    plan = load_plan(spec)  # a mistake costs nothing on the cluster
    job_id = submit_sweep(spec, plan, address, os.environ)
    console.print(f"submitted sweep '{plan.spec.name}' ({len(plan.trials)} trials) to {address}")
    print(job_id)


@app.command()
@user_errors
def status(
    job_id: Annotated[str, typer.Argument(help="Job id printed by submit.")], address: RayAddress
) -> None:
    """Print a job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from orchestrator.run.submit import job_status

    state, message = job_status(job_id, address)
    print(f"{job_id}: {state}" + (f" ({message})" if message else ""))


@app.command()
@user_errors
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id printed by submit.")],
    address: RayAddress,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends; exit 1 unless it succeeded.")
    ] = False,
) -> None:
    """Print a job's driver output (the sweep's progress lines)."""
    from orchestrator.run.submit import print_logs

    state = print_logs(job_id, address, follow=follow)
    if follow:
        console.print(f"{job_id}: {state}")
        if state != "SUCCEEDED":
            raise typer.Exit(1)


def main() -> None:
    """The `lottery` console entry point and `python -m orchestrator`: the app, then a prompt exit
    (orchestrator/process_exit.py: the exit work runs, the interpreter's teardown does not)."""
    from orchestrator.process_exit import run_then_exit

    run_then_exit(lambda: app(prog_name="lottery"))


__all__ = ["UserError", "app", "main"]
