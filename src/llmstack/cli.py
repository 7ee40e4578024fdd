"""The ``llmstack`` command: one verb per public function, ``--config FILE`` plus ``key=value`` overrides.

The model verbs (train, finetune, distill, sweep, quantize, validate, deploy) are generated from one table,
:data:`VERB_COMMANDS`, and share one shape: ``llmstack VERB [MODEL] [--config FILE] [key.path=value ...]``,
where ``MODEL`` sets the verb's model key (``llmstack._verbs.MODEL_KEYS``). Releases are top-level:
``llmstack promote REF`` and ``llmstack rollback NAME``.

User mistakes (anything raising :class:`LLMStackError`, bad arguments) print one line on stderr and
exit non-zero; only genuine bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from llmstack._console import VERBOSE_ENV, quiet_libraries, set_verbose, verbose
from llmstack.errors import LLMStackError

EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage plus message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.prog != "llmstack":
            # --registry is accepted after a verb too; SUPPRESS keeps a value given before it.
            self.add_argument("--registry", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"llmstack: error: {message} (see `{self.prog} --help`)\n")


def _registry(args: argparse.Namespace) -> Any:
    from llmstack.registry import Registry

    return Registry(args.registry)


def _config(cls: type, args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    from llmstack.config import load_config

    overrides = list(extra) + list(getattr(args, "overrides", []) or [])
    if getattr(args, "registry", None) and "registry" in cls.__dataclass_fields__:
        overrides.insert(0, f"registry={args.registry}")
    return load_config(cls, args.config, overrides)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- model verbs


@dataclass(frozen=True)
class VerbCommand:
    """One model verb of the CLI: ``llmstack NAME [MODEL] [--config FILE] [key.path=value ...]``.

    The command calls ``function(config, registry=..., overrides=[...])``; ``MODEL`` becomes the override of
    the function's model key (:data:`llmstack._verbs.MODEL_KEYS`), so every verb takes its model alike.
    """

    name: str  # the CLI verb
    function: str  # "module:function", imported when the verb runs
    summary: str  # one line for --help
    report: Callable[[Any, argparse.Namespace], int]  # prints the result; returns the exit status
    flags: tuple[tuple[str, str], ...] = ()  # boolean output options of the report: (--flag, help)

    @property
    def model_key(self) -> str:
        from llmstack._verbs import MODEL_KEYS

        return MODEL_KEYS[self.function.rpartition(":")[2]]


def _metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def _report_registered(result: Any, args: argparse.Namespace) -> int:
    print(f"registered {result.ref}  {_metrics(result.metrics)}")
    return 0


def _report_finetune(result: Any, args: argparse.Namespace) -> int:
    merged = f"  merged {result.merged_ref}" if result.merged_ref else ""
    print(f"registered {result.ref} ({result.method} on {result.base}){merged}  {_metrics(result.metrics)}")
    return 0


def _report_sweep(result: Any, args: argparse.Namespace) -> int:
    print(f"best trial registered as {result.ref}  {_metrics(result.best)}")
    return 0


def _report_quantize(result: Any, args: argparse.Namespace) -> int:
    print(result.table())
    print(f"registered {result.ref}")
    return 0


def _report_validate(report: Any, args: argparse.Namespace) -> int:
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.passed else EXIT_GATE_FAILED


def _report_deploy(deployment: Any, args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; both drain (503 to new requests, live streams finish within
    deployment.graceful_shutdown_timeout_s) and exit 0."""
    print(f"serving {deployment.config.model} at {deployment.url} (Ctrl-C or SIGTERM to drain and stop)", flush=True)
    deployment.wait()
    return 0


VERB_COMMANDS: tuple[VerbCommand, ...] = (
    VerbCommand("train", "llmstack.train:train", "pretrain a model on Ray Train (DDP or FSDP)", _report_registered),
    VerbCommand("finetune", "llmstack.finetune:finetune_lora",
                "fine-tune a base model: lora | qlora | dora | bitfit | full", _report_finetune),
    VerbCommand("distill", "llmstack.finetune:distill", "distil a teacher into a smaller student", _report_registered),
    VerbCommand("sweep", "llmstack.finetune:sweep", "Ray Tune search over learning rate, rank and alpha (ASHA)",
                _report_sweep),
    VerbCommand("quantize", "llmstack.quantize:quantize", "quantize a model and register the result",
                _report_quantize),
    VerbCommand("validate", "llmstack.validate:validate",
                "compare a candidate with a baseline (baseline=REF); exit 1 when the gate fails", _report_validate,
                flags=(("--json", "print the report as JSON"),)),
    VerbCommand("deploy", "llmstack.serve.deployments.builder:deploy",
                "serve a model with an OpenAI-compatible API on Ray Serve; SIGTERM or Ctrl-C drains it "
                "(new requests 503, live streams finish) and exits 0", _report_deploy),
)


def run_verb(command: VerbCommand, args: argparse.Namespace) -> int:
    """Split ``MODEL`` from the ``key.path=value`` words, call the verb, print its result."""
    from llmstack._modules import import_object

    models = [word for word in args.overrides if "=" not in word]
    if len(models) > 1:
        raise LLMStackError(f"{command.name} takes one MODEL, got {len(models)} ({' '.join(models)}); "
                            "give every other setting as key.path=value")
    overrides = [f"{command.model_key}={word}" for word in models]
    overrides += [word for word in args.overrides if "=" in word]
    result = import_object(command.function)(args.config, registry=args.registry, overrides=overrides)
    return command.report(result, args)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmstack.quickstart import run_quickstart

    run_quickstart(registry=args.registry, workdir=args.workdir, method=args.method)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from llmstack.registry import format_history, format_list, format_manifest

    registry = _registry(args)
    action = args.registry_action
    if action == "list":
        manifests = registry.list(args.name)
        if not manifests:
            print(f"no versions in {registry.url}" + (f" named {args.name}" if args.name else ""))
        else:
            print(format_list(manifests, {n: registry.aliases(n) for n in {m.ref.name for m in manifests}}))
    elif action == "show":
        print(format_manifest(registry.show(args.ref)))
    elif action == "verify":
        ref = registry.resolve(args.ref)
        registry.verify(ref)
        print(f"{ref}: ok, every file matches its manifest")
    elif action == "alias":
        registry.set_alias(args.name, args.alias, args.version, reason=args.reason)
        print(f"{args.name}@{args.alias} -> {registry.resolve(f'{args.name}@{args.alias}')}")
    elif action == "promote":
        raise LLMStackError(f"`llmstack registry promote` is now `{MOVED['promote']}`")
    elif action == "history":
        events = registry.history(args.name)
        print(format_history(events) if events else f"no alias changes recorded for {args.name}")
    elif action == "import":
        from llmstack.models import import_model

        ref = import_model(args.source, name=args.name, registry=registry, dtype=args.dtype)
        print(f"{ref}  ({registry.manifest(ref).extra.get('source', args.source)})")
    return 0


# --------------------------------------------------------------------------- releases: promote, rollback

# Old spellings that now live elsewhere: each is a one-line error naming the new one.
MOVED = {"promote": "llmstack promote REF [--alias ALIAS] [--force] [--reason TEXT]"}


def cmd_promote(args: argparse.Namespace) -> int:
    from llmstack.registry import format_history

    print(format_history([_registry(args).promote(args.ref, alias=args.alias, force=args.force, reason=args.reason)]))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from llmstack.registry import format_history

    if args.app:  # a running app: routing switches back at once, then the registry alias follows
        from llmstack.serve.canary import rollback_app

        _print_json(rollback_app(app_name=args.app, reason=args.reason))
        return 0
    if not args.name:
        raise LLMStackError("rollback needs a registry NAME, or --app APP for a running canary app")
    registry = _registry(args)
    print(format_history([registry.rollback(args.name, alias=args.alias, reason=args.reason)]))
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    from llmstack.serve import canary

    action = args.canary_action
    if action == "status":
        print(canary.format_status(canary.canary_status(app_name=args.app)))
        return 0
    if action == "start":
        result = canary.canary_start(args.candidate, app_name=args.app, force=args.force)
    elif action == "promote":
        result = canary.canary_promote(app_name=args.app, force=args.force, reason=args.reason)
    else:
        result = canary.canary_abort(app_name=args.app, reason=args.reason)
    _print_json(result)
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from llmstack.serve.routing.cost import app_cost, format_cost

    report = app_cost(args.url, api_key=args.api_key)
    if args.json:
        _print_json(report)
    else:
        print(format_cost(report))
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    from llmstack.k8s import manifest_yaml, render_manifest, write_manifest

    overrides = ([f"registry={args.registry}"] if getattr(args, "registry", None) else []) + list(args.overrides)
    manifest = render_manifest(args.kind, args.config, image=args.image, namespace=args.namespace,
                               overrides=overrides, options=args.k8s_config)
    if args.output:
        path = write_manifest(manifest, args.output)
        print(f"wrote {manifest['kind']} {manifest['metadata']['name']} to {path} (kubectl apply -f {path})")
    else:
        print(manifest_yaml(manifest), end="")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from llmstack.autoscale import read_trace
    from llmstack.autoscale.plots import plot_runs, replay_series, simulation_series
    from llmstack.config import ReplicaAutoscalingConfig

    defaults = [] if args.config else ["max_replicas=8"]
    if args.policy in ("reactive", "predictive"):
        defaults.append(f"policy={args.policy}")
    auto = _config(ReplicaAutoscalingConfig, args, defaults)
    trace = read_trace(args.trace).window(start_s=args.start, duration_s=args.duration,
                                          max_requests=args.max_requests).thinned(args.thin)
    out = Path(args.out)
    if args.simulate:
        from llmstack.autoscale.calibration import utilisation_ceiling
        from llmstack.autoscale.simulator import DEFAULT_REPLICA_MODEL, ReplicaModel, simulate

        model = None
        if args.replica_model:
            model = ReplicaModel(**json.loads(Path(args.replica_model).read_text(encoding="utf-8")))
        if args.capacity_scale is not None or args.startup_s is not None:
            model = (model or DEFAULT_REPLICA_MODEL).scaled(args.capacity_scale or 1.0, startup_s=args.startup_s)
        if args.context_window:
            trace = trace.clipped(context_window=args.context_window)
        trace = trace.compressed(args.speedup)
        result = simulate(trace, auto, policy=args.policy or auto.policy,
                          replica_model=model, static_replicas=args.static_replicas, progress=True)
        # The most any policy could use of a fleet kept at min_replicas on this trace (1.0: no floor).
        ceiling = utilisation_ceiling(trace, model or DEFAULT_REPLICA_MODEL, ttft_slo_s=auto.predictive.ttft_slo_s,
                                      min_replicas=auto.min_replicas)
        result.metrics["utilisation_ceiling"] = ceiling["ceiling"]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"simulate-{result.policy}.json").write_text(
            json.dumps({"metrics": result.metrics, "timeline": result.timeline}, indent=1), encoding="utf-8")
        plot_runs([simulation_series(result)], out / f"simulate-{result.policy}.png",
                  ttft_slo_s=auto.predictive.ttft_slo_s,
                  title=f"{Path(args.trace).name}: simulated, {result.policy}")
        _print_json(result.metrics)
        return 0
    if not args.url:
        raise LLMStackError("replay needs --url URL of a running app, or --simulate")
    from llmstack.autoscale import replay, serve_replica_probe

    probe = None
    if args.app:
        from llmstack._ray import connect

        connect(require_running=True)
        probe = serve_replica_probe(args.app)
    result = replay(trace, args.url, model=args.model, speedup=args.speedup, ttft_slo_s=auto.predictive.ttft_slo_s,
                    max_requests=args.max_requests, max_duration_s=args.max_duration,
                    request_timeout_s=args.request_timeout, api_key=args.api_key, replica_probe=probe)
    result.to_json(out / "replay.json")
    plot_runs([replay_series(result, "replay")], out / "replay.png", ttft_slo_s=auto.predictive.ttft_slo_s,
              title=f"{Path(args.trace).name} replayed at {args.url} (x{args.speedup:g})")
    _print_json(dataclasses.asdict(result)["metrics"])
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmstack", description="Train, fine-tune, quantize, validate and deploy language models on Ray.")
    parser.add_argument("--registry", default=None, help="registry URL (default: $LLMSTACK_REGISTRY or ~/.llmstack/registry)")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    def verb(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, *,
             config: bool = False) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--verbose", action="store_true",
                         help=f"print Ray's, Serve's and the libraries' logs and warnings here (or {VERBOSE_ENV}=1)")
        if config:
            sub.add_argument("--config", default=None, help="YAML config file")
            with_overrides.append(sub)
        return sub

    with_overrides: list[argparse.ArgumentParser] = []

    for command in VERB_COMMANDS:  # one shape: VERB [MODEL] [--config FILE] [key.path=value ...]
        sub = verb(command.name, functools.partial(run_verb, command), command.summary)
        sub.set_defaults(takes_model=True)
        sub.add_argument("--config", default=None, help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="MODEL | key.path=value",
                         help=f"the model (sets {command.model_key}), then config settings")
        sub.usage = f"llmstack {command.name} [MODEL] [--config FILE] [key.path=value ...]"
        sub.epilog = (f"MODEL sets `{command.model_key}` (the same as {command.model_key}=MODEL); key.path=value "
                      f"words override the config, e.g. `llmstack {command.name} --config FILE a.b=1`")
        for flag, help_text in command.flags:
            sub.add_argument(flag, action="store_true", help=help_text)
    sub = verb("quickstart", cmd_quickstart, "run the whole lifecycle on the built-in corpus")
    sub.add_argument("--workdir", default=None, help="where runs and plots go (default: ./runs/quickstart)")
    sub.add_argument("--method", default="int8-weight-only",
                     help="quantization method of stage 4 (default int8-weight-only; smoothquant, nf4, ...)")

    sub = verb("registry", cmd_registry, "inspect and manage the artifact registry")
    actions = sub.add_subparsers(dest="registry_action", metavar="ACTION", required=True, parser_class=_Parser)
    act = actions.add_parser("list", help="list complete versions")
    act.add_argument("name", nargs="?")
    actions.add_parser("show", help="print a version's manifest").add_argument("ref")
    actions.add_parser("verify", help="re-hash a version's files against its manifest").add_argument("ref")
    act = actions.add_parser("alias", help="point NAME@ALIAS at a version")
    act.add_argument("name")
    act.add_argument("alias")
    act.add_argument("version", help="a version like v3 or 3")
    act.add_argument("--reason", default=None)
    act = actions.add_parser("promote", help=f"moved: {MOVED['promote']}", add_help=False)
    act.add_argument("moved", nargs=argparse.REMAINDER)
    actions.add_parser("history", help="promotions, forced promotions and rollbacks").add_argument("name")
    act = actions.add_parser("import", help="register an outside model (HF directory, hub id or .gguf file)")
    act.add_argument("source", metavar="FILE_OR_DIR", help="model directory, hub id or .gguf file (dequantized)")
    act.add_argument("--name", default=None, help="registry name (default: the file stem or directory name)")
    act.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="GGUF only: float type of the imported weights (default auto: the file's own)")

    sub = verb("promote", cmd_promote, "move an alias (default production) to a version that passed validation")
    sub.add_argument("ref", help="the version to promote, e.g. tiny-lm@v3")
    sub.add_argument("--alias", default="production")
    sub.add_argument("--force", action="store_true", help="promote without a passing report (recorded)")
    sub.add_argument("--reason", default=None)
    sub = verb("rollback", cmd_rollback, "point an alias (or a running app's routing) back to the previous version")
    sub.add_argument("name", nargs="?", help="registry name whose alias moves back")
    sub.add_argument("--app", default=None, help="roll back a running canary app's routing (no restarts)")
    sub.add_argument("--alias", default="production")
    sub.add_argument("--reason", default=None)
    sub = verb("replay", cmd_replay, "replay a request trace against an app (--url) or in the simulator "
               "(--simulate); ReplicaAutoscalingConfig fields as key=value", config=True)
    sub.add_argument("trace", help="CSV of TIMESTAMP,ContextTokens,GeneratedTokens")
    sub.add_argument("--url", default=None, help="base URL of a running app")
    sub.add_argument("--simulate", action="store_true", help="run the policy in the simulator instead")
    sub.add_argument("--policy", choices=("static", "reactive", "predictive"), default=None,
                     help="default: the config's policy")
    sub.add_argument("--speedup", type=float, default=1.0, help="divide inter-arrival times by this")
    sub.add_argument("--start", type=float, default=0.0, help="window start (s into the trace)")
    sub.add_argument("--duration", type=float, default=None, help="window length (s); default: to the end")
    sub.add_argument("--max-requests", type=int, default=None, help="cap on requests sent or simulated")
    sub.add_argument("--thin", type=int, default=1, metavar="K",
                     help="keep one request in K (the load's shape at 1/K of its rate; with --speedup K the trace's "
                          "own rate in 1/K of the time)")
    sub.add_argument("--max-duration", type=float, default=600.0, help="replay wall-clock bound (s)")
    sub.add_argument("--request-timeout", type=float, default=60.0, help="per-request bound (s)")
    sub.add_argument("--model", default=None, help="served model id (default: the first listed)")
    sub.add_argument("--api-key", default=None)
    sub.add_argument("--app", default=None, help="Serve app name: record its replica count (needs Ray)")
    sub.add_argument("--static-replicas", type=int, default=None, help="static fleet size (default max_replicas)")
    sub.add_argument("--replica-model", default=None, help="JSON file of ReplicaModel fields (simulator)")
    sub.add_argument("--context-window", type=int, default=None, help="simulator: clip prompts to this window")
    sub.add_argument("--capacity-scale", type=float, default=None,
                     help="simulator: the replica's prefill/decode rates x this (0.25: a replica 4x slower, e.g. a "
                          "larger model); pair with predictive.capacity_tokens_per_s measured for that replica")
    sub.add_argument("--startup-s", type=float, default=None, help="simulator: the replica's start-up time (s)")
    sub.add_argument("--out", default="runs/replay", help="where the JSON and PNG go")
    for sub in with_overrides:  # after each verb's own positionals
        sub.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")

    sub = verb("canary", cmd_canary, "progressive rollout on a running canary app (serve_configs/canary.yaml)")
    actions = sub.add_subparsers(dest="canary_action", metavar="ACTION", required=True, parser_class=_Parser)
    start = actions.add_parser("start", help="start the rollout plan for a candidate")
    start.add_argument("candidate", help="registry ref, or a version the app already serves")
    actions.add_parser("status", help="weights, live KPIs and the plan in progress")
    promote = actions.add_parser("promote", help="send all traffic to the candidate and move the alias")
    abort = actions.add_parser("abort", help="drop the candidate to 0%% now")
    for act in (start, actions.choices["status"], promote, abort):
        act.add_argument("--app", default="llmstack-canary", help="Serve application name")
    for act in (start, promote):
        act.add_argument("--force", action="store_true", help="override a failed validation (recorded)")
    for act in (promote, abort):
        act.add_argument("--reason", default=None)

    sub = verb("cost", cmd_cost, "cost of a running multi-region app by region: tokens per dollar, $ per 1k tokens")
    sub.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL (it serves /metrics)")
    sub.add_argument("--api-key", default=None, help="the app's bearer key, if it has one")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")

    sub = verb("k8s", cmd_k8s, "KubeRay manifests from the same configs: a RayJob (train, finetune) or a RayService")
    actions = sub.add_subparsers(dest="k8s_action", metavar="ACTION", required=True, parser_class=_Parser)
    render = actions.add_parser("render", help="print the manifest of a config (or write it with -o)")
    render.add_argument("kind", choices=("train", "finetune", "serve", "canary"))
    render.add_argument("--config", default=None, help="the stage's YAML config (serve, canary: a serve_configs file)")
    render.add_argument("--image", default=None, help="container image with llmstack installed (required)")
    render.add_argument("--namespace", default=None, help="metadata.namespace (default: default)")
    render.add_argument("--k8s-config", default=None, help="YAML of manifest options (pod sizes, GPUs, Secrets)")
    render.add_argument("-o", "--output", default=None, help="write the manifest here instead of stdout")
    render.add_argument("overrides", nargs="*", metavar="key.path=value", help="config and k8s.* overrides")
    from llmstack.fleet.cli import add_jobs_parser  # `llmstack jobs submit|list|status|logs|stop`

    add_jobs_parser(verbs, parser_class=_Parser)
    return parser


def _settings_hint(args: argparse.Namespace, extra: Sequence[str]) -> str:
    """For a model verb given ``--key value``: how to say it as a setting."""
    flag = next((e for e in extra if e.startswith("--")), None)
    if not getattr(args, "takes_model", False) or flag is None:
        return ""
    key, _, value = flag[2:].partition("=")
    following = extra[extra.index(flag) + 1] if not value and extra.index(flag) + 1 < len(extra) else "VALUE"
    return f"; settings are key.path=value words, e.g. {key.replace('-', '_')}={value or following}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling positionals at the first option, so `quantize REF --config F k=v` leaves
    # k=v over: such leftovers are config overrides (or a model verb's MODEL); anything else is an error.
    if extra:
        words = isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra)
        if words and (getattr(args, "takes_model", False) or all("=" in e for e in extra)):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}{_settings_hint(args, extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    set_verbose(getattr(args, "verbose", False) or verbose())
    if not verbose():
        quiet_libraries()
    try:
        return args.handler(args)
    except LLMStackError as exc:
        if args.traceback:
            raise
        message = " ".join(str(exc).split())
        print(f"llmstack: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("llmstack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
