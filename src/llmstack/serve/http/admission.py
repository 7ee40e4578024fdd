"""Admission by time: refuse (503 + Retry-After) a request this ingress could not finish within the timeout.

A fluid model of one ingress's share of the backend: the tokens its live requests may still generate
(``max_tokens`` x choices each) wait in one queue served at the decode throughput this ingress measured
(tokens received per second while it had requests live, decayed so it follows load changes). A request
is predicted to finish after the work ahead of it has drained, plus its own decode steps (``max_tokens``
times the measured time per step of a stream: batched decoding runs a sequence no faster); when that is past ``request_timeout_s``
it is refused at once, and a request still waiting to start is re-checked as the estimate improves (a
burst arrives before any throughput is measured), so it is shed with 503 + Retry-After rather than
waiting into a 504. Nothing is refused before a throughput has been measured.

Behind a router whose backend attempts have their own limit (a multi-region app's ``attempt_timeout_s``: a
whole answer, or a stream's first chunk, must arrive within it), ``attempt_timeout_s`` bounds the predicted
answer (non-streamed) or start (streamed) too: past it the router would time the attempt out as the
region's failure and the client would get a 504.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from llmstack.errors import RequestError

DECAY_S = 30.0  # time constant of the throughput estimate (busy seconds)
MIN_SAMPLE_TOKENS = 32  # tokens measured before the estimate is trusted
SAFETY = 0.9  # a request must be predicted to finish within this share of the timeout


@dataclass
class Ticket:
    """One admitted request: its token budget and the work ahead of it when it arrived."""

    tokens: int
    steps: int  # decode steps the request needs at most (its max_tokens): its own time once started
    arrived: float
    ahead: float  # tokens queued before this request when it arrived
    done_at_arrival: float  # the estimator's token counter then
    streamed: bool = False  # answered as a stream: only its first chunk is bound by the attempt timeout
    finished: bool = False


class Admission:
    """Time-based admission of one ingress (single event loop; not thread-safe)."""

    def __init__(self, *, request_timeout_s: float, retry_after_s: float = 1.0,
                 attempt_timeout_s: float | None = None) -> None:
        self.request_timeout_s = request_timeout_s
        self.attempt_timeout_s = attempt_timeout_s  # the backend router's limit per attempt (None: none)
        self.retry_after_s = retry_after_s
        self.pending_tokens = 0.0  # budgets of live requests
        self.live = 0
        self.tokens_done = 0.0  # every token received, ever (tickets measure progress against it)
        self._rate_tokens = 0.0  # decayed tokens received while busy
        self._rate_busy_s = 0.0  # decayed seconds with at least one live request
        self._last = time.monotonic()
        self.step_s: float | None = None  # measured seconds per decode step of one stream (moving average)

    # ------------------------------------------------------------------ measurement
    def _advance(self) -> None:
        now = time.monotonic()
        dt = now - self._last
        self._last = now
        if self.live > 0 and dt > 0:
            keep = math.exp(-dt / DECAY_S)
            self._rate_tokens *= keep
            self._rate_busy_s = self._rate_busy_s * keep + dt

    def throughput(self) -> float | None:
        """Tokens per second while busy; None until enough has been measured."""
        if self._rate_tokens < MIN_SAMPLE_TOKENS or self._rate_busy_s <= 0:
            return None
        return self._rate_tokens / self._rate_busy_s

    def received(self, tokens: int) -> None:
        """``tokens`` generated tokens reached this ingress (a streamed chunk, or a whole answer)."""
        self._advance()
        self.tokens_done += tokens
        self._rate_tokens += tokens

    def observed_steps(self, seconds: float, steps: int) -> None:
        """A stream took ``seconds`` from its first to its last chunk over ``steps`` decode steps."""
        if steps >= 2 and seconds > 0:
            sample = seconds / (steps - 1)
            self.step_s = sample if self.step_s is None else 0.8 * self.step_s + 0.2 * sample

    # ------------------------------------------------------------------ admission
    def admit(self, tokens: int, steps: int = 1, *, streamed: bool = False) -> Ticket:
        """A ticket for a request of ``tokens`` token budget needing up to ``steps`` decode steps, or the 503
        when it could not finish in time."""
        self._advance()
        ticket = Ticket(tokens=max(1, tokens), steps=max(1, steps), arrived=time.monotonic(),
                        ahead=self.pending_tokens, done_at_arrival=self.tokens_done, streamed=streamed)
        refusal = self.refusal(ticket)
        if refusal is not None:
            raise refusal
        self.pending_tokens += ticket.tokens
        self.live += 1
        return ticket

    def predicted_finish_s(self, ticket: Ticket) -> float | None:
        """Seconds from the ticket's arrival to its predicted end (None: no throughput measured yet)."""
        predicted = self._predicted(ticket)
        return None if predicted is None else predicted[1]

    def _predicted(self, ticket: Ticket) -> tuple[float, float] | None:
        """Seconds from the ticket's arrival to its predicted start and end (None: no throughput measured yet)."""
        rate = self.throughput()
        if rate is None:
            return None
        ahead = max(0.0, ticket.ahead - (self.tokens_done - ticket.done_at_arrival))
        own = ticket.steps * self.step_s if self.step_s is not None else ticket.tokens / rate  # batched: per step
        start = (time.monotonic() - ticket.arrived) + ahead / rate
        return start, start + own

    def refusal(self, ticket: Ticket) -> RequestError | None:
        """The 503 for ``ticket`` when it is predicted to end past the timeout (or to answer past the attempt
        timeout: its first chunk when streamed), else None."""
        predicted = self._predicted(ticket)
        if predicted is None:
            return None
        start, finish = predicted
        limits = [(finish, self.request_timeout_s, "finish", "request timeout")]
        if self.attempt_timeout_s is not None:
            limits.append((start if ticket.streamed else finish, self.attempt_timeout_s,
                           "start answering" if ticket.streamed else "finish", "router's attempt timeout"))
        for at, limit, what, timeout in limits:
            if at > SAFETY * limit:
                retry = max(self.retry_after_s, min(at - SAFETY * limit, limit))
                return RequestError(f"The server is overloaded: this request would {what} in about {at:.0f} s, "
                                    f"past the {limit:g} s {timeout}. Retry shortly.", status_code=503,
                                    type="server_overloaded", code="overloaded",
                                    headers={"Retry-After": str(max(1, math.ceil(retry)))})
        return None

    def finish(self, ticket: Ticket) -> None:
        """The request is answered (or failed): its budget leaves the queue."""
        if ticket.finished:
            return
        ticket.finished = True
        self._advance()
        self.pending_tokens = max(0.0, self.pending_tokens - ticket.tokens)
        self.live -= 1
