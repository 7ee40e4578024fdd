"""What reaches the console: progress bars, results and errors by default; Ray's own logs on request.

Ray, Serve and Train write their logs to files under the Ray session directory either way; by default
they are not also copied to this console (their INFO lines would bury the progress bars), and the path
is printed once instead. ``LLMSTACK_VERBOSE=1`` (the CLI's ``--verbose``) copies them here again and
keeps the libraries' warnings. The variable, not a module flag, so that Ray jobs and subprocesses agree.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_ENV = "LLMSTACK_VERBOSE"
_announced = False

# Loggers whose INFO lines repeat what the progress bars already say, and library warnings that a user
# can do nothing about (bitsandbytes' optional `kernels` package, transformers' renamed attributes).
_CHATTY_LOGGERS = {"ray": logging.WARNING, "ray.serve": logging.WARNING, "ray.train": logging.WARNING,
                   "ray.tune": logging.WARNING, "ray.data": logging.WARNING, "bitsandbytes": logging.ERROR,
                   "filelock": logging.WARNING,
                   # torchao (imported by peft when installed) on its optional CUDA extensions, and the pytree
                   # registrations it makes: nothing a CPU user acts on
                   "torchao": logging.ERROR, "torch.utils._pytree": logging.ERROR,
                   # "token authentication is enabled": Ray's default, and every llmstack command works either way
                   "ray._private.authentication.authentication_token_setup": logging.ERROR}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Choose for this process and the Ray jobs and subprocesses it starts; quietens the libraries now."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if not on:
        quiet_libraries()


def quiet_libraries() -> None:
    for name, level in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|ray|peft)(\.|$)")


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` keywords: worker logs copied to the driver only when verbose."""
    return {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.WARNING}


def announce_ray_logs() -> None:
    """Once per process, when quiet: say where Ray's logs went."""
    global _announced
    if _announced or verbose():
        return
    _announced = True
    quiet_libraries()
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 - the only way to this session's log dir
        where = node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a remote cluster: its logs are on its head node
        where = None
    where = where or "the Ray head node's session directory (/tmp/ray/session_latest/logs)"
    print(f"llmstack: Ray and Serve logs go to {where} (--verbose or {VERBOSE_ENV}=1 prints them here)",
          file=sys.stderr, flush=True)


__all__ = ["VERBOSE_ENV", "announce_ray_logs", "quiet_libraries", "ray_init_options", "set_verbose", "verbose"]
