"""Experiment tracking: a training or fine-tuning run mirrored to MLflow when ``tracking.mlflow_uri`` is set.

One MLflow run per llmstack run: the config as params (flattened key paths such as
``training.max_steps``), every per-step record as metrics at its step (logged from the driver as records
arrive, so it works the same for DDP, FSDP, elastic and restarted runs), the final metrics, and the
registry version produced as the tag ``llmstack.registry_version``. A sweep is a parent run whose trials are
nested child runs (MLflow's ``mlflow.parentRunId`` tag). A path is an MLflow file store; any
``http(s)://`` (or other MLflow) URI is a tracking server. A server that does not answer costs one
warning: the run goes on and its metrics stay where they always are (``metrics.jsonl`` in the run
directory and the registry manifest).

Ray Train's own MLflow hook is a Ray Tune callback that needs the per-worker reports; the driver already
holds every step's record, so logging from there needs no extra reports and no MLflow on the workers.

Example:
    >>> with track_run(TrackingConfig(), run_name="lm", params={}, kind="train") as tracker:
    ...     tracker.log_step({"step": 1, "loss": 2.5})  # tracking off: nothing happens
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from llmstack.config import TrackingConfig

REGISTRY_VERSION_TAG = "llmstack.registry_version"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for a nested run (the UI shows it under its parent)
_SKIPPED_RECORD_KEYS = ("step", "time", "event")
_PROBE_TIMEOUT_S = 3.0
_PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value
_BATCH_LIMIT = 100  # params per log_batch call


class MlflowUnavailableWarning(RuntimeWarning):
    """The MLflow tracking server did not answer; the run went on without it."""


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"max_steps": 3}}`` -> ``{"training.max_steps": "3"}`` (lists and None as text)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{path}."))
        else:
            flat[path] = str(value)[:_PARAM_VALUE_LIMIT]
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Tracker:
    """Tracking switched off: every call does nothing (what :func:`track_run` yields without a URI)."""

    run_id: str | None = None

    def log_step(self, record: Mapping[str, Any]) -> None:
        """One per-step record (called from the driver's metrics thread)."""

    def finish(self, metrics: Mapping[str, Any], *, registry_version: str | None = None) -> None:
        """Final metrics and the registry version the run produced."""

    def settle_children(self, tags_by_name: Mapping[str, Mapping[str, str]]) -> None:
        """Tag this run's child runs by run name; end those still running as KILLED (stopped from outside)."""


class MlflowTracker(Tracker):
    """One MLflow run; after the first failed call it warns once and stops calling MLflow."""

    def __init__(self, uri: str, *, experiment: str, run_name: str, params: Mapping[str, Any], kind: str,
                 parent_run_id: str | None = None) -> None:
        self.uri = uri
        self.run_id: str | None = None
        self._failed = False  # one warning, then no more MLflow calls
        self._lock = threading.Lock()
        self._last_step = 0
        if not is_server_uri(uri) and "://" not in uri:
            # MLflow 3 keeps its file store behind this opt-in; a path here asks for exactly that store.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if is_server_uri(uri) and not self._answers():
            return
        self._call(lambda: self._start(experiment, run_name, params, kind, parent_run_id))

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _answers(self) -> bool:
        """A quick probe: MLflow's own client retries an unanswering server for minutes."""
        import requests

        try:
            requests.get(f"{self.uri.rstrip('/')}/health", timeout=_PROBE_TIMEOUT_S)
            return True
        except requests.RequestException as exc:
            self._give_up(exc)
            return False

    def _give_up(self, exc: BaseException) -> None:
        self.run_id, self._failed = None, True
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        warnings.warn(f"MLflow at {self.uri} does not answer ({reason}); the run goes on without MLflow and its "
                      "metrics stay in the run directory's metrics.jsonl and the registry manifest",
                      MlflowUnavailableWarning, stacklevel=3)

    def _call(self, action: Any) -> None:
        with self._lock:
            if self._failed:
                return
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - tracking must never fail the run
                self._give_up(exc)

    def _start(self, experiment: str, run_name: str, params: Mapping[str, Any], kind: str,
               parent_run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
        self._experiment_id = experiment_id
        tags = {"llmstack.kind": kind, **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})}
        run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), _BATCH_LIMIT):
            self._client.log_batch(self.run_id, params=items[start:start + _BATCH_LIMIT])

    def log_step(self, record: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        stamp = int(float(record.get("time", time.time())) * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in record.items()
                   if key not in _SKIPPED_RECORD_KEYS and _is_number(value)]
        self._last_step = max(self._last_step, step)
        if metrics:
            self._call(lambda: self._client.log_batch(self.run_id, metrics=metrics))

    def finish(self, metrics: Mapping[str, Any], *, registry_version: str | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        step = int(metrics.get("step", self._last_step) or 0)
        final = [Metric(f"final.{key}", float(value), stamp, step) for key, value in metrics.items()
                 if _is_number(value)]
        tags = [RunTag(REGISTRY_VERSION_TAG, registry_version)] if registry_version else []
        self._call(lambda: self._client.log_batch(self.run_id, metrics=final, tags=tags))
        self._end("FINISHED")

    def settle_children(self, tags_by_name: Mapping[str, Mapping[str, str]]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        def settle() -> None:
            children = self._client.search_runs([self._experiment_id],
                                                filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}'")
            for child in children:
                tags = [RunTag(k, v) for k, v in tags_by_name.get(child.info.run_name, {}).items()]
                if tags:
                    self._client.log_batch(child.info.run_id, tags=tags)
                if child.info.status == "RUNNING":
                    self._client.set_terminated(child.info.run_id, "KILLED")

        self._call(settle)

    def _end(self, status: str) -> None:
        if self.active:
            run_id = self.run_id
            self._call(lambda: self._client.set_terminated(run_id, status))
            self.run_id = None


@contextlib.contextmanager
def track_run(tracking: TrackingConfig, *, run_name: str, params: Mapping[str, Any], kind: str,
              parent_run_id: str | None = None) -> Iterator[Tracker]:
    """A :class:`Tracker` for one run: MLflow when ``tracking.mlflow_uri`` is set, else one that does nothing.

    The MLflow run ends FINISHED after :meth:`Tracker.finish`, FAILED if the block raises. ``parent_run_id``
    nests it under another run (a sweep's trial under the sweep).
    """
    if not tracking.mlflow_uri:
        yield Tracker()
        return
    tracker = MlflowTracker(tracking.mlflow_uri, experiment=tracking.experiment, run_name=run_name, params=params,
                            kind=kind, parent_run_id=parent_run_id)
    try:
        yield tracker
    except BaseException:
        tracker._end("FAILED")
        raise
    tracker._end("FINISHED")  # a block that returned without finish(): still a finished run


__all__ = ["PARENT_RUN_TAG", "REGISTRY_VERSION_TAG", "MlflowTracker", "MlflowUnavailableWarning", "Tracker",
           "flatten_params", "track_run"]
