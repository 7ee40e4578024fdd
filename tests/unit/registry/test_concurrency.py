"""Racing writers: distinct complete versions, and exactly one winner per alias compare-and-swap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmstack.errors import AliasConflictError, ValidationFailedError
from llmstack.registry import Registry, validation_key


def _source(root: Path, writer: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"writer": writer}))
    (root / "model.safetensors").write_bytes(writer.encode().ljust(64, b"#") * 512)
    return root


def _assert_unmixed(reg: Registry, expected_writers: set[str]) -> None:
    """Every version is complete and all of its files come from one writer."""
    manifests = reg.list("tiny")
    assert [m.ref.version for m in manifests] == list(range(1, len(expected_writers) + 1))
    seen = set()
    for m in manifests:
        reg.verify(m.ref)
        directory = reg.fetch(m.ref)
        writer = json.loads((directory / "config.json").read_text())["writer"]
        assert (directory / "model.safetensors").read_bytes().startswith(writer.encode())
        seen.add(writer)
    assert seen == expected_writers


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted on by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.fixture(params=["local", "memory", "s3"])
def make(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Registry]:
    """A factory of independent Registry objects on one location, as separate programs would have.

    On S3 (moto) the exclusive creates and compare-and-swaps are the server's conditional writes;
    moto checks and stores non-atomically, so these runs also exercise the read-back that detects it.
    """
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return lambda: Registry(str(tmp_path / "registry"))
    if request.param == "memory":
        url = f"memory://race-{uuid.uuid4().hex}"
        return lambda: Registry(url)
    s3 = request.getfixturevalue("s3_server")
    url = f"s3://{s3['bucket']}/race-{uuid.uuid4().hex}"
    return lambda: Registry(url, storage_options=s3["storage_options"])


def test_threads_registering_one_name_get_distinct_complete_versions(make: Callable[[], Registry],
                                                                     tmp_path: Path) -> None:
    n = 8
    sources = [_source(tmp_path / f"src{i}", f"w{i}") for i in range(n)]
    results = _race(n, lambda i: make().register("tiny", sources[i], kind="model"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.version for r in results) == list(range(1, n + 1))
    reg = make()
    for i, ref in enumerate(results):  # each writer got the version holding its own files
        assert json.loads((reg.fetch(ref) / "config.json").read_text())["writer"] == f"w{i}"
    _assert_unmixed(reg, {f"w{i}" for i in range(n)})


def test_processes_registering_one_name_get_distinct_complete_versions(tmp_path: Path) -> None:
    url = str(tmp_path / "registry")
    procs, per_proc = 3, 3
    start_at = time.time() + 2.0  # all processes start registering at the same moment
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from llmstack.registry import Registry
        wid = sys.argv[1]
        reg = Registry({url!r})
        time.sleep(max(0.0, {start_at!r} - time.time()))
        refs = []
        for j in range({per_proc}):
            src = Path({str(tmp_path)!r}) / f"p{{wid}}-{{j}}"
            src.mkdir()
            (src / "config.json").write_text(json.dumps({{"writer": f"p{{wid}}-{{j}}"}}))
            (src / "model.safetensors").write_bytes(f"p{{wid}}-{{j}}".encode().ljust(64, b"#") * 512)
            refs.append(str(reg.register("tiny", src, kind="model")))
        print(json.dumps(refs))
    """)
    running = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(procs)]
    refs = []
    for proc in running:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        refs += json.loads(out.strip().splitlines()[-1])
    assert sorted(refs, key=lambda r: int(r.split("@v")[1])) == [f"tiny@v{i}" for i in range(1, 10)]
    _assert_unmixed(Registry(url), {f"p{i}-{j}" for i in range(procs) for j in range(per_proc)})


def test_racing_alias_swaps_have_one_winner(make: Callable[[], Registry], tmp_path: Path) -> None:
    reg = make()
    refs = [reg.register("tiny", _source(tmp_path / f"s{i}", f"w{i}"), kind="model") for i in range(6)]
    reg.set_alias("tiny", "production", refs[0])
    results = _race(5, lambda i: make().set_alias("tiny", "production", refs[i + 1], expected=1))
    winners = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, AliasConflictError) for i, r in enumerate(results) if i != winners[0])
    assert reg.aliases("tiny") == {"production": winners[0] + 2}
    history = reg.history("tiny")
    assert [(e["from"], e["to"]) for e in history] == [(None, 1), (1, winners[0] + 2)]


def test_racing_promotions_one_wins_history_consistent(make: Callable[[], Registry], tmp_path: Path) -> None:
    reg = make()
    base, *cands = [reg.register("tiny", _source(tmp_path / f"s{i}", f"w{i}"), kind="model") for i in range(5)]
    reg.promote(base)
    for cand in cands:
        reg.annotate(cand, validation_key(base), {"passed": True, "summary": "ok", "baseline": str(base)})
    results = _race(len(cands), lambda i: make().promote(cands[i], reason=f"racer {i}"))
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if not isinstance(r, dict)]
    assert len(won) == 1 and len(lost) == len(cands) - 1
    # A loser that read the alias before the winner's swap gets a conflict; one that read it after
    # sees the winner as the holder and, lacking a report against it, is refused by the gate.
    for r in lost:
        assert isinstance(r, AliasConflictError) or (
            isinstance(r, ValidationFailedError) and f"holds tiny@v{won[0]['to']}" in str(r)), r
    assert reg.resolve("tiny@production").version == won[0]["to"]
    history = reg.history("tiny")
    assert [(e["action"], e["from"], e["to"]) for e in history] == [("promote", None, 1),
                                                                     ("promote", 1, won[0]["to"])]
    assert reg.rollback("tiny")["to"] == 1


def test_promotion_that_loses_the_swap_gets_a_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic interleaving: both read the holder, then both swap; the second is refused."""
    reg = Registry(str(tmp_path / "registry"))
    base, a, b = [reg.register("tiny", _source(tmp_path / f"s{i}", f"w{i}"), kind="model") for i in range(3)]
    reg.promote(base)
    for cand in (a, b):
        reg.annotate(cand, validation_key(base), {"passed": True, "summary": "ok", "baseline": str(base)})
    real_aliases = Registry.aliases
    barrier = threading.Barrier(2)

    def aliases_then_wait(self: Registry, name: str) -> dict[str, int]:
        held = real_aliases(self, name)
        barrier.wait(timeout=10)  # both promoters have read v1 before either swaps
        return held

    monkeypatch.setattr(Registry, "aliases", aliases_then_wait)
    results = _race(2, lambda i: Registry(str(tmp_path / "registry")).promote((a, b)[i]))
    monkeypatch.setattr(Registry, "aliases", real_aliases)
    assert sorted(type(r).__name__ for r in results) == ["AliasConflictError", "dict"]
    conflict = next(r for r in results if isinstance(r, AliasConflictError))
    assert "expected v1" in str(conflict)
    assert [(e["from"], e["to"]) for e in reg.history("tiny")] == [(None, 1), (1, reg.aliases("tiny")["production"])]


def test_s3_alias_compare_and_swap_uses_conditional_writes(s3_server: dict, tmp_path: Path) -> None:
    """On S3 a stale writer is refused by If-Match, not by a client-side check."""
    reg = Registry(f"s3://{s3_server['bucket']}/cas-{uuid.uuid4().hex}",
                   storage_options=s3_server["storage_options"])
    v1 = reg.register("tiny", _source(tmp_path / "a", "a"), kind="model")
    v2 = reg.register("tiny", _source(tmp_path / "b", "b"), kind="model")
    reg.set_alias("tiny", "production", v1)
    key = "tiny/aliases/production.json"
    calls = {"n": 0}

    def stale_then_real(current: bytes | None) -> bytes:
        # Another writer moves the alias after we read it but before our conditional write.
        calls["n"] += 1
        if calls["n"] == 1:
            Registry(reg.url, storage_options=reg.storage_options).set_alias("tiny", "production", v2)
        state = json.loads(current)
        if state["version"] != 1:
            raise AliasConflictError("moved")
        return current

    with pytest.raises(AliasConflictError):
        reg._store.update(key, stale_then_real)
    assert calls["n"] == 2  # the first write was refused by the server and re-decided on fresh data
    assert reg.aliases("tiny") == {"production": 2}
    # Exclusive create of a manifest is refused by the server too.
    with pytest.raises(FileExistsError):
        reg._store.create("tiny/versions/v000001.json", b"{}")
