"""``python -m stack up|down|status|env|restart``: the local MLflow + PostgreSQL + S3 stack."""

from __future__ import annotations

import argparse
import sys

from stack import DEFAULT_DIR, SERVICES, StackError, control


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=control.__doc__)
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state folder (default .stack)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the stack and print the env to export")
    start.add_argument("--mlflow-port", type=int, help="MLflow port (default: a free one)")
    start.add_argument("--s3-port", type=int, help="S3 port (default: a free one)")
    start.add_argument("--postgres-port", type=int, help="PostgreSQL port (default: a free one)")
    start.add_argument("--mlflow-workers", type=int, help="MLflow server workers (default 1)")
    start.add_argument(
        "--timeout", type=float, default=control.START_TIMEOUT_S, help="seconds per server"
    )
    sub.add_parser("down", help="stop the stack (its data stays in the state folder)")
    sub.add_parser("status", help="show which servers run")
    sub.add_parser("env", help="print the export lines of a running stack")
    again = sub.add_parser("restart", help="restart one server on the same ports and data")
    again.add_argument("service", choices=SERVICES)
    args = parser.parse_args(argv)

    try:
        return _run(args)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        stack = control.up(
            args.dir,
            mlflow_port=args.mlflow_port,
            s3_port=args.s3_port,
            postgres_port=args.postgres_port,
            mlflow_workers=args.mlflow_workers,
            timeout=args.timeout,
        )
        print(f"stack up: MLflow {stack.mlflow_uri} (UI and API), S3 {stack.s3_endpoint}")
        print(f"logs: {stack.root}/<server>.log; stop with `make stack-down`")
        print(f"export these (or `source {stack.root / 'env'}`):")
        print("\n".join(control.env_lines(stack)))
        return 0
    if args.command == "down":
        stopped = control.down(args.dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    if args.command == "status":
        pids = control.status(args.dir)
        for service, pid in pids.items():
            print(f"{service}: " + (f"running (pid {pid})" if pid else "stopped"))
        return 0 if all(pids.values()) else 3
    stack = control.load(args.dir)
    if stack is None:
        raise StackError(f"no stack in {args.dir}; start one with `make stack-up`")
    if args.command == "env":
        print("\n".join(control.env_lines(stack)))
        return 0
    control.restart_service(stack, args.service)
    print(f"restarted {args.service}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
