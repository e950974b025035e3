"""The evaluation gate of `aiaas convert` / `aiaas optimize --evaluate`, beside the parity gate.

The candidate is evaluated in process from its bytes, before anything is registered, with the
evaluations its model's gate requires (or the `--eval-spec` on `--eval-dataset` given), against
its parent as the baseline. A failed evaluation refuses the candidate (nothing registered) unless
`--force`; the results are stored on the new version, so the promotion gate finds them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aiaas import serving
from aiaas.errors import InvalidArgument
from aiaas.eval import registry_io
from aiaas.eval.spec import EvalSpec, load_spec, parse_spec
from aiaas.eval.workflow import IN_PROCESS, EvaluationRefused, Evaluator, Subject
from aiaas.pipeline.publish import signature_to_pb
from aiaas.pipeline.steps import Candidate
from aiaas.registry.v1 import evaluation_pb2 as epb
from aiaas.registry_client import RegistryClient, RegistryError

__all__ = ["EvaluationRefused", "evaluate_candidate", "requested", "store_results"]


def requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "evaluate", False) or getattr(args, "eval_spec", None)
                or getattr(args, "eval_dataset", None))


def _plans(args: argparse.Namespace, client: RegistryClient, model: str) -> list[tuple[EvalSpec, str]]:
    if args.eval_spec or args.eval_dataset:
        if not (args.eval_spec and args.eval_dataset):
            raise InvalidArgument("--eval-spec and --eval-dataset go together")
        return [(load_spec(args.eval_spec), args.eval_dataset)]
    try:
        gate = registry_io.get_gate(client, model)
    except RegistryError as exc:
        raise InvalidArgument(f"--evaluate: cannot read the evaluation gate of {model!r}: {exc.details()}") from None
    if not gate.required:
        raise InvalidArgument(f"--evaluate: model {model!r} has no evaluation gate (aiaas eval-gate set); give "
                              "--eval-spec and --eval-dataset")
    return [(parse_spec(r.spec_yaml, f"the gate's spec {r.name!r}"), r.dataset) for r in gate.required]


def evaluate_candidate(args: argparse.Namespace, client: RegistryClient, model: str, candidate: Candidate,
                       baseline: str | None) -> list[epb.EvaluationResult]:
    """The candidate's results; EvaluationRefused when one failed and `--force` is not given."""
    if not requested(args):
        return []
    subject = Subject(model, 0, candidate.format.value, signature_to_pb(candidate.signature),
                      serving.to_pb(candidate.serving_config), artifact=candidate.data)
    with Evaluator(client, path=IN_PROCESS) as evaluator:
        results = [evaluator.evaluate(subject, dataset, spec, args.eval_baseline or baseline)
                   for spec, dataset in _plans(args, client, model)]
    failed = [r for r in results if not r.passed]
    if failed and not args.force:
        raise EvaluationRefused(failed)
    return results


def store_results(client: RegistryClient, version: int, results: Sequence[epb.EvaluationResult]) -> None:
    for result in results:
        result.version = version
        registry_io.put_evaluation(client, result)
