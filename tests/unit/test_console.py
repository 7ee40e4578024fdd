"""Quiet by default: Ray's worker logs stay in their files unless LLMSTACK_VERBOSE / --verbose asks for them."""

from __future__ import annotations

import logging

import pytest

from llmstack import _console, _ray
from llmstack.cli import build_parser


def test_quiet_by_default_and_verbose_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_console.VERBOSE_ENV, "")  # recorded, so set_verbose cannot leak past the test
    assert _console.ray_init_options() == {"log_to_driver": False, "logging_level": logging.WARNING}
    _console.set_verbose(False)
    assert logging.getLogger("ray.serve").level == logging.WARNING
    assert logging.getLogger("bitsandbytes").level == logging.ERROR
    _console.set_verbose(True)
    assert _console.ray_init_options() == {"log_to_driver": True, "logging_level": logging.INFO}
    monkeypatch.setenv(_console.VERBOSE_ENV, "0")
    assert not _console.verbose()


@pytest.mark.parametrize("argv", [["quickstart", "--verbose"], ["train", "--verbose"], ["deploy", "--verbose"]])
def test_every_verb_takes_verbose(argv: list[str]) -> None:
    assert build_parser().parse_known_args(argv)[0].verbose is True


def test_the_log_folder_is_named_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(_console.VERBOSE_ENV, "")  # recorded, so set_verbose cannot leak past the test
    monkeypatch.setattr(_ray, "_announced", False)
    _ray.announce_ray_logs()
    _ray.announce_ray_logs()
    err = capsys.readouterr().err
    assert err.count("Ray and Serve logs go to") == 1 and "--verbose" in err
