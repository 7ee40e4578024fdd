"""Admission by time on real Ray Serve: with a short request timeout and many concurrent streams, nothing
admitted waits into a 504, every admitted stream finishes, and each refusal is a 503 with Retry-After."""

from __future__ import annotations

import json
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import deploy_app

pytestmark = pytest.mark.ray

STREAMS = 48


def test_overload_sheds_by_time_and_admitted_streams_finish(serve_registry: dict, serve_port: int) -> None:
    # One replica decoding 4 sequences at a time; 48 streams of 48 tokens cannot all finish in 4 s.
    app = deploy_app(serve_registry, serve_port, app_name="admission", route_prefix="/admission",
                     request_timeout_s=4, max_batch_size=4, max_ongoing_requests=64, max_queued_requests=-1,
                     response_cache_size=0, prefix_cache_mb=0)
    try:
        body = {"prompt": "line 1:", "max_tokens": 48, "ignore_eos": True, "temperature": 0.8, "stream": True}

        def stream(_: int) -> tuple[int, Any, list]:
            with requests.post(app.url + "/v1/completions", json=body, stream=True, timeout=120) as response:
                if response.status_code != 200:
                    return response.status_code, response.headers, [response.json()]
                events = [line[6:] for line in response.iter_lines(decode_unicode=True)
                          if line.startswith("data: ")]
                return 200, response.headers, events

        with ThreadPoolExecutor(STREAMS) as pool:
            outcomes = list(pool.map(stream, range(STREAMS)))
        codes = [code for code, _, _ in outcomes]
        assert set(codes) <= {200, 503}, codes  # no 504: nothing admitted waited past the timeout
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        for code, headers, events in outcomes:
            if code == 503:
                assert int(headers["Retry-After"]) >= 1 and set(events[0]["error"]) >= {"message", "code"}
                continue
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert not any("error" in c for c in chunks), chunks[-1]  # no timeout cut a started stream
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        app.shutdown()
