"""The entrypoint of an llmstack Ray Job: ``python -m llmstack.fleet.job_entry train|finetune``.

The resolved config travels in the job's ``LLMSTACK_JOB_CONFIG`` environment variable (YAML), not as a
``working_dir`` package: a working_dir is unpacked again on every node that runs one of the job's workers,
and where nodes share a disk (the fake nodes of a local autoscaling cluster) each unpacking replaces the
directory the driver runs in. The driver writes the config to a file of its own and runs
``llmstack <kind> --config FILE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

JOB_CONFIG_ENV = "LLMSTACK_JOB_CONFIG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job's verb on the config in ``LLMSTACK_JOB_CONFIG``; the CLI's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = os.environ.get(JOB_CONFIG_ENV, "")
    if len(args) != 1 or args[0] not in ("train", "finetune") or not text.strip():
        print(f"llmstack: error: usage: python -m llmstack.fleet.job_entry train|finetune with the config in "
              f"{JOB_CONFIG_ENV} (got arguments {args}, {len(text)} characters of config); submit jobs with "
              "`llmstack jobs submit`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llmstack-job-") as directory:
        path = Path(directory) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        # the CLI in a child process (fleet sits below the CLI: it must not import it); its output and status pass
        return subprocess.run([sys.executable, "-m", "llmstack", args[0], "--config", str(path)]).returncode


if __name__ == "__main__":
    sys.exit(main())
