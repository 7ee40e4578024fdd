from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_is_fast_and_light():
    code = ("import sys, time; t = time.perf_counter(); import llmstack; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "print(dt, ','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0
    assert len(out) == 1, f"import llmstack pulled in heavy modules: {out[1:]}"


def test_public_surface():
    import llmstack

    for name in ("train", "finetune_lora", "quantize", "deploy", "validate", "Registry", "ArtifactRef",
                 "TrainConfig", "ServeConfig", "LLMStackError"):
        assert name in llmstack.__all__


# Each verb whose package shares its name, and a submodule of that package.
VERB_PACKAGES = [("train", "loop", "driver"), ("quantize", "_api", "_api"), ("validate", "_validate", "_validate")]


@pytest.mark.parametrize("first", ["submodule", "package", "llmstack"])
@pytest.mark.parametrize("verb, submodule, defined_in", VERB_PACKAGES)
def test_the_verb_is_the_function_whatever_was_imported_first(first: str, verb: str, submodule: str,
                                                              defined_in: str) -> None:
    """`llmstack.<verb>` is the plain function defined in the package, before and after any import of the package
    or its submodules (it used to be the package module with its class swapped, depending on import order)."""
    before = {"submodule": f"import llmstack.{verb}.{submodule}", "package": f"import llmstack.{verb}",
              "llmstack": "import llmstack"}[first]
    code = f"""
import types
{before}
import llmstack
first = llmstack.{verb}
import llmstack.{verb}.{submodule}
from llmstack.{verb} import {submodule}
from llmstack.{verb}.{defined_in} import {verb} as defined
assert isinstance(first, types.FunctionType), type(first)
assert llmstack.{verb} is first is defined, (llmstack.{verb}, first, defined)
assert isinstance({submodule}, types.ModuleType) and {submodule}.__name__ == "llmstack.{verb}.{submodule}"
import sys
assert sys.modules["llmstack.{verb}"].{verb} is defined  # the package keeps its own attribute
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_finetune_lora_and_deploy_are_functions_beside_their_packages() -> None:
    code = """
import types
import llmstack.finetune.lora, llmstack.serve.deployments.builder
import llmstack
assert isinstance(llmstack.finetune, types.ModuleType)
assert llmstack.finetune_lora is llmstack.finetune.lora.finetune_lora
assert llmstack.deploy is llmstack.serve.deployments.builder.deploy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
