"""Command line: ``magseg-nb run --profile demo [--from 03] [--to 05] [--force]``."""

from __future__ import annotations

import argparse
import sys

from magseg_nb import chain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magseg-nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the numbered notebooks with papermill")
    run.add_argument(
        "--profile", default="demo", help="profile name in profiles/ or a YAML path (default: demo)"
    )
    run.add_argument("--from", dest="start", help="first stage, e.g. 03")
    run.add_argument("--to", dest="stop", help="last stage, e.g. 05")
    run.add_argument("--force", action="store_true", help="rerun stages even when they are up to date")
    sub.add_parser("profiles", help="list the profiles")
    args = parser.parse_args(argv)

    if args.command == "profiles":
        for path in sorted((chain.repo_root() / "profiles").glob("*.yaml")):
            print(f"{path.stem:8s} {chain.load_profile(str(path))['description']}")
        return 0
    try:
        records = chain.run_chain(args.profile, args.start, args.stop, force=args.force)
    except chain.StageError as err:
        print(f"magseg-nb: {err}", file=sys.stderr)
        return 1
    ran = sum(r["status"] == "ran" for r in records)
    print(f"magseg-nb: {len(records)} stage(s), {ran} ran, {len(records) - ran} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
