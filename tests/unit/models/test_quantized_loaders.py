"""Quantized versions load through loaders their backend registers; llmstack.models never imports quantize."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmstack.errors import ModelLoadError
from llmstack.models import artifact as artifact_module
from llmstack.models import load_artifact, register_quantized_loader


@pytest.fixture
def no_loaders(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An empty loader table and no packages to import: only what a test registers."""
    table: dict[str, Any] = {}
    monkeypatch.setattr(artifact_module, "_QUANTIZED_LOADERS", table)
    monkeypatch.setattr(artifact_module, "QUANTIZED_LOADER_PACKAGES", ())
    return table


def _quantized_dir(tmp_path: Path, method: str) -> Path:
    (tmp_path / "quantization.json").write_text(json.dumps({"method": method}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path


def test_a_quantized_version_without_a_loader_says_so(no_loaders: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"is a quantized model \(fake-int3\) that no registered loader "
                                             r"rebuilds \(registered: none\)"):
        load_artifact(str(_quantized_dir(tmp_path, "fake-int3")), with_tokenizer=False)


def test_the_first_loader_that_recognises_the_directory_wins(no_loaders: dict[str, Any], tmp_path: Path) -> None:
    directory = _quantized_dir(tmp_path, "fake-int3")
    seen: list[tuple[str, Path, str]] = []
    built = torch.nn.Linear(2, 2).train()

    def other_format(path: Path, where: str) -> None:
        seen.append(("other", path, where))
        return None  # not its format

    def fake_backend(path: Path, where: str) -> Any:
        seen.append(("fake", path, where))
        return built

    register_quantized_loader("other", other_format)
    register_quantized_loader("fake", fake_backend)
    loaded = load_artifact(str(directory), with_tokenizer=False)
    assert loaded.model is built and not built.training  # handed back in eval mode
    assert loaded.artifact.kind == "quantized" and loaded.artifact.method == "fake-int3"
    assert seen == [("other", directory, str(directory)), ("fake", directory, str(directory))]


def test_importing_models_loads_no_quantization_backend_and_finds_the_quantize_loader() -> None:
    """``import llmstack`` binds the verbs, so ``llmstack.quantize`` (light) is there and registers its loader;
    the heavy backends (torchao, bitsandbytes) still load only when a quantized model is rebuilt."""
    code = ("import sys; import llmstack.models as m; from llmstack.models import artifact as a; "
            "print('torchao' in sys.modules, 'bitsandbytes' in sys.modules); a.quantized_loaders(); "
            "print('llmstack.quantize' in a._QUANTIZED_LOADERS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
