"""What reaches the console: progress bars, results and errors by default; Ray's own logs on request.

Ray, Serve and Train write their logs to files under the Ray session directory either way; by default
they are not also copied to this console (their INFO lines would bury the progress bars), and the path
is printed once instead (:func:`llmstack._ray.announce_ray_logs`). ``LLMSTACK_VERBOSE=1`` (the CLI's
``--verbose``) copies them here again and keeps the libraries' warnings. The variable, not a module flag,
so that Ray jobs and subprocesses agree.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

VERBOSE_ENV = "LLMSTACK_VERBOSE"

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


__all__ = ["VERBOSE_ENV", "quiet_libraries", "ray_init_options", "set_verbose", "verbose"]
