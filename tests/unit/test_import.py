from __future__ import annotations

import subprocess
import sys


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
