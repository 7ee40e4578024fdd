from __future__ import annotations

from pathlib import Path

import pytest

from llmstack.autoscale.trace import Trace, TraceError, read_trace, synthetic_trace

SHIPPED = Path(__file__).resolve().parents[3].parent / "shared" / "traces" / "azure_llm_2023_code.csv"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_azure_timestamps_with_seven_fraction_digits(tmp_path: Path) -> None:
    path = _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                            "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,8\n")
    trace = read_trace(path)
    assert trace.arrival_s[0] == 0.0
    assert trace.arrival_s[1] == pytest.approx(0.052, abs=1e-6)
    assert trace.context_tokens == [4808, 3180] and trace.generated_tokens == [10, 8]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shared trace not present")
def test_reads_the_shipped_hour() -> None:
    trace = read_trace(SHIPPED)
    assert len(trace) > 8000
    assert 3000 < trace.duration_s < 3700


@pytest.mark.parametrize(("body", "fragment"), [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,1\n", "missing column(s) GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,1,2\nyesterday,3,4\n", "row 2: unparsable TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,1,2\n2.0,5,-3\n", "row 2: GeneratedTokens must be >= 0, got -3"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,ten,2\n", "row 1: ContextTokens 'ten' is not a number"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n5.0,1,2\n4.0,1,2\n", "row 2: TIMESTAMP '4.0' is earlier"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
])
def test_bad_rows_name_the_row(tmp_path: Path, body: str, fragment: str) -> None:
    with pytest.raises(TraceError, match=None) as info:
        read_trace(_write(tmp_path, body))
    assert fragment in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(TraceError, match="not found"):
        read_trace("/nonexistent/trace.csv")


def test_window_compress_and_clip_report_what_changed() -> None:
    trace = Trace([0.0, 10.0, 20.0, 30.0], [100, 5000, 300, 10], [10, 20, 400, 5])
    part = trace.window(start_s=10.0, duration_s=20.0)
    assert part.arrival_s == [0.0, 10.0] and part.context_tokens == [5000, 300]
    assert part.compressed(10.0).arrival_s == [0.0, 1.0]
    clipped = trace.clipped(context_window=256, max_output_tokens=64)
    assert clipped.generated_tokens == [10, 20, 64, 5]
    assert all(c + g <= 256 for c, g in zip(clipped.context_tokens, clipped.generated_tokens))
    assert (clipped.clipped_context, clipped.clipped_generated) == (2, 1)
    with pytest.raises(TraceError, match="no requests in the window"):
        trace.window(start_s=100.0)


def test_thinned_keeps_every_kth_request_and_with_the_same_speedup_the_rate() -> None:
    trace = Trace([float(i) for i in range(10)], list(range(100, 110)), list(range(10)))
    thin = trace.thinned(3)
    assert thin.arrival_s == [0.0, 3.0, 6.0, 9.0] and thin.context_tokens == [100, 103, 106, 109]
    fitted = thin.compressed(3.0)
    assert fitted.duration_s == pytest.approx(trace.duration_s / 3)
    assert len(fitted) / fitted.duration_s == pytest.approx(len(thin) / thin.duration_s * 3)
    assert trace.thinned(1) == trace
    for bad in (0, -2, 1.5):
        with pytest.raises(TraceError, match="keep_one_in must be an integer >= 1"):
            trace.thinned(bad)  # type: ignore[arg-type]


def test_synthetic_trace_follows_its_segments() -> None:
    trace = synthetic_trace([(60, 1.0), (30, 10.0), (60, 0.0), (30, 2.0)], seed=3)
    in_burst = sum(60 <= t < 90 for t in trace.arrival_s)
    in_gap = sum(90 <= t < 150 for t in trace.arrival_s)
    assert 200 < in_burst < 400 and in_gap == 0
