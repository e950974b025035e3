"""`aiaas k8s`: render the kustomize overlays, apply them to the current kube context, show pods."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aiaas.k8s.render import NAMESPACE, OVERLAYS


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `k8s render`, `k8s apply`, `k8s status` and `k8s dev-certs`."""
    k8s = subparsers.add_parser("k8s", help="run aiaas on Kubernetes (deploy/k8s overlays)")
    commands = k8s.add_subparsers(dest="k8s_command", metavar="COMMAND")
    k8s.set_defaults(func=lambda args: _help(k8s))

    render = commands.add_parser("render", help="print the manifests of an overlay")
    render.add_argument("overlay", metavar="OVERLAY", help=f"{', '.join(OVERLAYS)} or a kustomization directory")
    render.add_argument("--json", action="store_true", help="a JSON list instead of YAML")
    render.add_argument("--check", action="store_true",
                        help="only check probes, resources, security and Services; exit 1 on a problem")
    render.set_defaults(func=cmd_render)

    apply = commands.add_parser("apply", help="server-side apply an overlay and wait for the rollouts")
    apply.add_argument("overlay", metavar="OVERLAY", help=f"{', '.join(OVERLAYS)} or a kustomization directory")
    apply.add_argument("--context", help="kube context (default: the current one)")
    apply.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for rollouts (600)")
    apply.add_argument("--no-wait", action="store_true", help="do not wait for the rollouts")
    apply.add_argument("--dry-run", action="store_true", help="let the API server validate, change nothing")
    apply.add_argument("--no-generate-secrets", action="store_true",
                       help="do not create missing Secrets with random values")
    apply.set_defaults(func=cmd_apply)

    status = commands.add_parser("status", help="list the services' pods and their readiness")
    status.add_argument("--context", help="kube context (default: the current one)")
    status.add_argument("--namespace", "-n", default=NAMESPACE, help=f"namespace ({NAMESPACE})")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    status.set_defaults(func=cmd_status)

    certs = commands.add_parser(
        "dev-certs", help="write a development CA, every pod's and operator's certificate, and their Secrets",
        description="Writes OUTDIR/ca.crt and ca.key (kept and reused when present), OUTDIR/<name>/"
                    "{tls.crt,tls.key,ca.crt} for each pod Secret and for the admin and deployer identities, "
                    "and OUTDIR/secrets.yaml for `kubectl apply -f`. Development only: production "
                    "certificates come from cert-manager.")
    certs.add_argument("outdir", metavar="OUTDIR", help="folder to write into (created; keep it private)")
    certs.add_argument("--namespace", "-n", default=NAMESPACE, help=f"namespace in names and Secrets ({NAMESPACE})")
    certs.add_argument("--days", type=int, default=90, help="validity of each certificate (90)")
    certs.add_argument("--ca-days", type=int, default=365, help="validity of a new CA (365)")
    certs.set_defaults(func=cmd_dev_certs)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_render(args: argparse.Namespace) -> int:
    from aiaas.k8s.checks import audit
    from aiaas.k8s.render import KustomizeError, render, to_yaml

    try:
        objects = render(args.overlay)
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        problems = audit(objects)
        for problem in problems:
            print(problem)
        print(f"{len(objects)} objects, {len(problems)} problems", file=sys.stderr)
        return 1 if problems else 0
    sys.stdout.write(json.dumps(objects, indent=2) + "\n" if args.json else to_yaml(objects))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from aiaas.k8s import cluster
    from aiaas.k8s.render import KustomizeError, render

    try:
        objects = render(args.overlay)
        dyn = cluster.connect(args.context)
        cluster.apply(dyn, objects, _progress, generate_secrets=not args.no_generate_secrets,
                      dry_run=args.dry_run)
        if args.no_wait or args.dry_run:
            return 0
        _progress(f"waiting up to {args.timeout:g} s for the rollouts")
        late = cluster.wait_for_rollouts(dyn, objects, _progress, args.timeout)
    except (KustomizeError, ApiException, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if late:
        print(f"error: not rolled out after {args.timeout:g} s: {', '.join(late)}", file=sys.stderr)
        return 1
    _progress(f"{args.overlay}: all rollouts complete")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from aiaas.k8s import cluster

    try:
        rows = cluster.list_pods(cluster.connect(args.context), args.namespace)
    except (ApiException, cluster.ClusterUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{**vars(row), "is_ready": row.is_ready} for row in rows], indent=2))
    else:
        print(format_table(["SERVICE", "POD", "READY", "STATUS", "RESTARTS", "NODE"],
                           [[r.service, r.name, r.ready, r.phase, str(r.restarts), r.node] for r in rows]))
    return 0 if rows and all(row.is_ready for row in rows) else 1


def cmd_dev_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aiaas.identity import spiffe_id
    from aiaas.k8s.certs import OPERATOR_CERTIFICATES, POD_CERTIFICATES, dns_names, write_dev_certs

    outdir = Path(args.outdir)
    try:
        result = write_dev_certs(outdir, args.namespace, args.days, args.ca_days)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'created' if result.ca_created else 'kept'} the CA {outdir / 'ca.crt'}")
    rows = [[spec.name, spiffe_id(spec.identity, args.namespace) if spec.identity else "-",
             ", ".join(dns_names(spec.services, args.namespace)[:1] + (["localhost"] if spec.localhost else []))
             or "-"]
            for spec in (*POD_CERTIFICATES, *OPERATOR_CERTIFICATES)]
    print(format_table(["CERTIFICATE", "IDENTITY", "SERVES"], rows))
    print(f"next: kubectl create namespace {args.namespace} (unless it exists); kubectl apply -f {result.secrets}")
    return 0


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *rows])


def _progress(message: str) -> None:
    print(message, flush=True)
