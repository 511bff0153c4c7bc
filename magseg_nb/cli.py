"""Command line: ``magseg-nb run --profile demo [--from 03] [--to 05] [--force] [--debug]``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from magseg_nb import chain, progress

INTERRUPTED = 130  # the shell's code for a run stopped with Ctrl-C


class _OrphanedCellError(logging.Filter):
    """Drops the two log records of a kernel found dead after Ctrl-C: nbclient's "Kernel died while
    waiting for execute reply." and asyncio's "Task exception was never retrieved" for its
    ``DeadKernelError``.

    Ctrl-C leaves papermill's cell task pending; when the kernel shutdown that follows lasts over a
    second (a loaded machine), the task's kernel poll finds the kernel gone and the task ends with
    that error, which nobody awaits. asyncio then logged its traceback when the task was freed, after
    the runner's one-line message (seen in CI). A kernel that dies on its own still raises
    ``DeadKernelError`` through papermill, and the runner reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "DeadKernelError" and not record.getMessage().startswith(
            "Kernel died while waiting for execute reply"
        )


def quiet_orphaned_cell_errors() -> None:
    """Install ``_OrphanedCellError`` on the loggers of asyncio and papermill (once)."""
    for name in ("asyncio", "papermill"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _OrphanedCellError) for f in log.filters):
            log.addFilter(_OrphanedCellError())


def report_error(prog: str, err: BaseException, debug: bool) -> int:
    """Print one clear line per problem (no traceback unless ``debug``); returns the exit code."""
    if isinstance(err, KeyboardInterrupt):
        print(
            f"{prog}: interrupted; finished stages are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    if debug:
        traceback.print_exception(err)
    if isinstance(err, chain.StageError):  # expected: the message says what to do
        lines = str(err).splitlines() or [type(err).__name__]
    else:
        text = " ".join(str(err).split()) or "(no message)"
        lines = [f"{type(err).__name__}: {text}" + ("" if debug else " (run with --debug for the traceback)")]
    for line in lines:
        print(f"{prog}: {line}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magseg-nb", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the numbered notebooks with papermill")
    run.add_argument(
        "--profile", default="demo", help="profile name in profiles/ or a YAML path (default: demo)"
    )
    run.add_argument("--from", dest="start", help="first stage, e.g. 03")
    run.add_argument("--to", dest="stop", help="last stage, e.g. 05")
    run.add_argument(
        "--force", action="store_true", help="rerun stages even when they are up to date, from scratch"
    )
    run.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    sub.add_parser("profiles", help="list the profiles")
    args = parser.parse_args(argv)
    quiet_orphaned_cell_errors()

    try:
        if args.command == "profiles":
            for path in sorted((chain.repo_root() / "profiles").glob("*.yaml")):
                print(f"{path.stem:8s} {chain.load_profile(str(path))['description']}")
            return 0
        records = chain.run_chain(args.profile, args.start, args.stop, force=args.force)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the top of the program
        return report_error("magseg-nb", err, args.debug)
    ran = sum(r["status"] == "ran" for r in records)
    try:
        for line in chain.final_report(records, args.profile, progress.interactive(sys.stdout)):
            print(line)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; the table is a courtesy
        print(f"magseg-nb: could not draw the final table ({type(err).__name__}: {err})", file=sys.stderr)
    print(f"magseg-nb: {len(records)} stage(s), {ran} ran, {len(records) - ran} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
