"""`slam operator`: run the SLAMInference operator (kopf). The `slam` CLI calls `register(subparsers)`.

Nothing here imports kopf or kubernetes at module level, so `slam` works without the `operator` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("operator", help="run the Kubernetes operator of SLAMInference resources (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", metavar="NS",
                       help="serve resources of this namespace (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="serve resources of every namespace")
    p.add_argument("--peering", metavar="NAME", default=None,
                   help="kopf peering object shared by the operator's replicas (one acts, the others wait); "
                        "default: kopf's 'default' peering if its CRD exists, else standalone")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority: the replica with the highest acts (default: kopf's, 0)")
    p.add_argument("--liveness", metavar="URL", default=DEFAULT_LIVENESS,
                   help=f"liveness endpoint to serve (default {DEFAULT_LIVENESS}; 'none' to disable)")
    p.add_argument("--reconcile-seconds", type=float, default=2.0,
                   help="interval of the reconcile timer per resource (default 2)")
    p.add_argument("--dev", action="store_true", help="standalone (no peering) with debug logs")
    p.set_defaults(func=cmd_operator)


def check(args: argparse.Namespace) -> str | None:
    """The first flag problem as a message naming the flag, or None."""
    if not args.namespace and not args.all_namespaces:
        return "--namespace NS or --all-namespaces is required"
    for ns in args.namespace or []:
        if not ns or "/" in ns:
            return f"--namespace: invalid namespace {ns!r}"
    if not args.reconcile_seconds > 0:
        return f"--reconcile-seconds: must be positive, got {args.reconcile_seconds}"
    if args.liveness != "none":
        url = urllib.parse.urlsplit(args.liveness)
        if url.scheme != "http" or not url.hostname or url.port is None:
            return f"--liveness: expected http://HOST:PORT/PATH or 'none', got {args.liveness!r}"
    if args.dev and args.peering:
        return "--dev runs standalone and cannot be combined with --peering"
    return None


class _Quiet(logging.Filter):
    """kopf logs every successful handler run at INFO: the reconcile timer runs every few seconds per resource,
    and the pod and node watchers on every event. Their failures and our own messages still show."""

    ROUTINE = {f"{kind} '{name}' succeeded." for kind, name in
               (("Timer", "reconcile"), ("Handler", "pod_event"), ("Handler", "node_event"))}

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage() in self.ROUTINE)


def cmd_operator(args: argparse.Namespace) -> int:
    problem = check(args)
    if problem:
        print(f"slam operator: error: {problem}", file=sys.stderr)
        return 2
    import kopf
    import kubernetes

    from slam_operator.handlers import OperatorConfig
    from slam_operator.handlers import register as register_handlers
    from slam_operator.kube import load_configuration

    try:
        configuration = load_configuration()
    except (kubernetes.config.ConfigException, OSError) as e:
        print(f"slam operator: error: no Kubernetes credentials (in-cluster or kubeconfig): {e}", file=sys.stderr)
        return 1
    kopf.configure(debug=args.dev, verbose=args.dev)
    logging.getLogger("kopf.objects").addFilter(_Quiet())
    registry = kopf.OperatorRegistry()
    register_handlers(registry, OperatorConfig(kube=configuration, reconcile_seconds=args.reconcile_seconds))
    kopf.run(registry=registry, clusterwide=args.all_namespaces, namespaces=args.namespace or (),
             standalone=True if args.dev else None, peering_name=args.peering, priority=args.priority,
             liveness_endpoint=None if args.liveness == "none" else args.liveness)
    return 0
