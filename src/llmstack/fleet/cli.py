"""``llmstack jobs``: submit training and fine-tuning runs to a Ray cluster and follow them.

Registered onto the main parser by :func:`add_jobs_parser` (one hook line in ``llmstack/cli.py``)::

    llmstack jobs submit --config train.yaml [--kind train|finetune] [key.path=value ...]
    llmstack jobs list | status ID | logs ID | stop ID      (all take --address, default $RAY_ADDRESS)
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")


def add_jobs_parser(verbs: Any, *,
                    parser_class: type[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Add the ``jobs`` verb and its actions to ``verbs`` (the main parser's subparsers)."""
    sub = verbs.add_parser("jobs", help="training and fine-tuning runs as Ray Jobs on a running cluster",
                           description="training and fine-tuning runs as Ray Jobs on a running cluster")
    sub.set_defaults(handler=run_jobs_command)
    kwargs = {"parser_class": parser_class} if parser_class is not None else {}
    actions = sub.add_subparsers(dest="jobs_action", metavar="ACTION", required=True, **kwargs)
    submit = actions.add_parser("submit", help="submit a train or finetune config; prints the job id")
    submit.add_argument("--config", required=True, help="YAML config of a train or finetune run")
    submit.add_argument("--kind", choices=("train", "finetune"), default=None,
                        help="default: the config's `kind:` key, else inferred (base/lora: finetune; model: train)")
    submit.add_argument("--id", dest="submission_id", default=None, help="job id (default: <kind>-<name>-<random>)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    submit.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    listing = actions.add_parser("list", help="the cluster's llmstack jobs")
    listing.add_argument("--all", dest="all_jobs", action="store_true", help="also jobs llmstack did not submit")
    listing.add_argument("--json", action="store_true")
    status = actions.add_parser("status", help="a job's status (and the version it registered)")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true")
    actions.add_parser("logs", help="what the job printed so far").add_argument("job_id")
    actions.add_parser("stop", help="stop a running job").add_argument("job_id")
    for action in actions.choices.values():
        _address_option(action)
    return sub


def run_jobs_command(args: argparse.Namespace) -> int:
    from llmstack.fleet import jobs

    action, address = args.jobs_action, args.address
    if action == "submit":
        job_id = jobs.submit_job(args.config, kind=args.kind, overrides=args.overrides, address=address,
                                 registry=getattr(args, "registry", None), submission_id=args.submission_id)
        print(job_id, flush=True)
        if args.wait:
            record = jobs.wait_for_job(job_id, address=address, timeout_s=float("inf"))
            print(_line(record))
            return 0 if record.status == "SUCCEEDED" else 1
        return 0
    if action == "list":
        records = jobs.list_jobs(address=address, all_jobs=args.all_jobs)
        if args.json:
            print(json.dumps([r.to_dict() for r in records], indent=2))
        else:
            for record in records:
                print(_line(record))
        return 0
    if action == "status":
        record = jobs.job_status(args.job_id, address=address)
        print(json.dumps(record.to_dict(), indent=2) if args.json else _line(record))
        return 0
    if action == "logs":
        print(jobs.job_logs(args.job_id, address=address), end="")
        return 0
    stopped = jobs.stop_job(args.job_id, address=address)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def _line(record: Any) -> str:
    parts = [record.job_id, record.status, record.kind or "-", record.name or "-"]
    if record.registered:
        parts.append(f"registered {record.registered}")
    if record.message and record.status in ("FAILED", "PENDING"):
        parts.append(" ".join(record.message.split())[:200])
    return "  ".join(parts)


__all__ = ["add_jobs_parser", "run_jobs_command"]
