"""`aiaas evaluate` end to end: fetch the data set, fit it to the version, pick the path, run the version
and its baseline, and build the EvaluationResult (stored by the caller with `registry_io.put_evaluation`).

A version evaluates through the inference service when one is named and serves it (what is
evaluated is what serves), else in process through the serving loader; a pipeline candidate not
registered yet is evaluated in process from its bytes.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from aiaas import runtime
from aiaas.errors import FailedPrecondition, InvalidArgument, NotFound, error_from_rpc
from aiaas.eval import registry_io, runner
from aiaas.eval.formats import DatasetFormat
from aiaas.eval.predictors import IN_PROCESS, SERVING, InProcessPredictor, Predictor, ServingPredictor
from aiaas.eval.reader import DatasetReader, InputPlan
from aiaas.eval.schema import Fit, fit, inspect, row_shape
from aiaas.eval.spec import EvalSpec
from aiaas.identity import ClientIdentity
from aiaas.registry.v1 import evaluation_pb2 as epb
from aiaas.registry.v1 import registry_pb2 as pb
from aiaas.registry_client import RegistryClient, RegistryError

AUTO = "auto"
PATHS = (AUTO, SERVING, IN_PROCESS)


@dataclasses.dataclass(frozen=True)
class Subject:
    """What is evaluated: a registered version (`version` > 0), or a candidate given by its artifact."""

    model: str
    version: int
    format: str
    signature: pb.Signature
    serving_config: pb.ServingConfig
    artifact: bytes | None = None

    @classmethod
    def of(cls, version: pb.ModelVersion) -> Subject:
        from aiaas._registry_convert import format_name

        return cls(version.model, version.version, format_name(version.format), version.signature,
                   version.serving_config)

    @property
    def label(self) -> str:
        return f"{self.model} version {self.version}" if self.version else f"the {self.model} candidate"


@dataclasses.dataclass(frozen=True)
class LocalDataset:
    dataset: epb.Dataset
    path: Path
    format: DatasetFormat

    def label_column(self, spec: EvalSpec) -> str:
        if spec.label:
            return spec.label
        labels = [c.name for c in self.dataset.columns if c.role == epb.COLUMN_ROLE_LABEL]
        if len(labels) != 1:
            raise InvalidArgument(f"data set {self.dataset.name!r} has label columns {labels}: name one with "
                                  "`label:` in the spec")
        return labels[0]


def batch_rows(spec: EvalSpec, subject: Subject) -> int:
    """Examples per call: the spec's batch size within what the version accepts."""
    if all(s.shape and s.shape[0] == 1 for s in subject.signature.inputs):
        return 1
    limit = subject.serving_config.max_batch_size
    return min(spec.batch_size, limit) if limit > 0 else spec.batch_size


def _input_plans(found: Fit, subject: Subject) -> list[InputPlan]:
    plans = []
    for spec in subject.signature.inputs:
        dtype = np.dtype(np.float32) if spec.datatype == "BF16" else runtime.KSERVE_TO_NUMPY[spec.datatype]
        plans.append(InputPlan(spec.name, found.inputs[spec.name], dtype, row_shape(spec, subject.label)))
    return plans


class Evaluator:
    """Evaluations against one registry, sharing downloaded data sets and artifacts in a work folder."""

    def __init__(self, client: RegistryClient, *, inference_url: str | None = None, path: str = AUTO,
                 identity: ClientIdentity | None = None, concurrency: int = 4, device: str = "cpu",
                 threads: int | None = None, progress: runner.Progress | None = None) -> None:
        if path not in PATHS:
            raise InvalidArgument(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        if path == SERVING and not inference_url:
            raise InvalidArgument("evaluating through the serving path needs --inference URL")
        self.client = client
        self.inference_url = inference_url
        self.path = path
        self.identity = identity
        self.concurrency = concurrency
        self.device = device
        self.threads = threads
        self.progress = progress
        self.workdir = Path(tempfile.mkdtemp(prefix="aiaas-eval-"))
        self._datasets: dict[str, LocalDataset] = {}

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dataset(self, name: str) -> LocalDataset:
        if name not in self._datasets:
            found = registry_io.get_dataset(self.client, name)
            path = self.workdir / f"dataset-{found.sha256}"
            found = registry_io.download_dataset(self.client, name, path)
            self._datasets[name] = LocalDataset(found, path, DatasetFormat.from_pb(found.format))
        return self._datasets[name]

    def _predictor(self, subject: Subject) -> Predictor:
        inputs, outputs = list(subject.signature.inputs), list(subject.signature.outputs)
        if subject.version and self.inference_url and self.path != IN_PROCESS:
            served = ServingPredictor(self.inference_url, subject.model, subject.version, inputs, outputs,
                                      identity=self.identity, concurrency=self.concurrency)
            if self.path == SERVING:
                served.require_ready()
                return served
            if served.ready():
                return served
            served.close()
        artifact: bytes | Path
        if subject.artifact is not None:
            artifact = subject.artifact
        else:
            artifact = self.workdir / f"artifact-{subject.model}-{subject.version}"
            self.client.download_artifact(subject.model, subject.version, artifact)
        return InProcessPredictor(artifact, subject.format, inputs, outputs, device=self.device,
                                  threads=self.threads)

    def resolve_baseline(self, model: str, selector: str | None) -> tuple[Subject | None, str]:
        """(the baseline version, a note when there is none)."""
        if not selector:
            return None, ""
        try:
            found = self.client.get_version(model, selector)
        except RegistryError as exc:
            error = error_from_rpc(exc, f"baseline {selector!r}")
            if isinstance(error, NotFound):
                return None, f"no baseline: {error.message}"
            raise error from None
        return Subject.of(found), ""

    def evaluate(self, subject: Subject, dataset_name: str, spec: EvalSpec,
                 baseline: str | None = None) -> epb.EvaluationResult:
        """Run `subject` (and the baseline: `baseline`, else the spec's) over the data set; nothing is stored."""
        local = self.dataset(dataset_name)
        schema = inspect(local.path, local.format)
        label = local.label_column(spec)
        found = fit(schema, subject.signature.inputs, [label], subject.label)
        self._check_spec(spec, subject, found)
        base, note = self.resolve_baseline(subject.model, baseline or spec.baseline)
        same = base is not None and subject.version and base.version == subject.version
        if base is not None and not same:
            fit(schema, base.signature.inputs, [label], f"the baseline, {base.label}")
            self._check_spec(spec, base, found)
        output = spec.output or subject.signature.outputs[0].name
        reader = DatasetReader(local.path, local.format, found, _input_plans(found, subject))
        predictors = [self._predictor(subject)]
        try:
            if base is not None and not same:
                predictors.append(self._predictor(base))
            runs = runner.run(spec, reader, runner.Scorer(spec, output, label), predictors,
                              batch_rows=batch_rows(spec, subject), total_rows=local.dataset.num_rows,
                              progress=self.progress)
        finally:
            for predictor in predictors:
                predictor.close()
        if same:
            runs.baseline = runs.candidate
        described = f"version {base.version} ({baseline or spec.baseline})" if base is not None else ""
        result = runner.evaluate(spec, runs, baseline=described)
        result.model, result.version = subject.model, subject.version
        result.dataset, result.dataset_sha256 = local.dataset.name, local.dataset.sha256
        result.baseline = (baseline or spec.baseline or "") if base is not None else ""
        result.baseline_version = base.version if base is not None else 0
        result.path = predictors[0].path
        if note:
            result.notes.append(note)
        if same:
            result.notes.append("the baseline is the evaluated version itself")
        return result

    @staticmethod
    def _check_spec(spec: EvalSpec, subject: Subject, found: Fit) -> None:
        outputs = [o.name for o in subject.signature.outputs]
        if spec.output and spec.output not in outputs:
            raise InvalidArgument(f"the spec scores output {spec.output!r}; {subject.label} has {', '.join(outputs)}")
        features = {c.name for c in found.features}
        for cut in spec.slicings:
            for feature in cut.features:
                if feature.feature not in features:
                    raise InvalidArgument(f"the spec slices by {feature.feature!r}, which is not a slicing "
                                          f"feature of the data set ({', '.join(sorted(features)) or 'none'})")


def gate_requirement(spec: EvalSpec, dataset: str) -> epb.RequiredEvaluation:
    return epb.RequiredEvaluation(name=spec.name, dataset=dataset, spec_yaml=spec.text, spec_sha256=spec.sha256)


def failed_lines(result: epb.EvaluationResult, limit: int = 5) -> list[str]:
    failed = runner.failures(result)
    lines = [t.message for t in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more")
    return lines


def refuse_unless_passed(results: Sequence[epb.EvaluationResult]) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        raise EvaluationRefused(failed)


class EvaluationRefused(FailedPrecondition):
    """A candidate failed an evaluation of its gate: nothing was registered."""

    def __init__(self, results: Sequence[epb.EvaluationResult]) -> None:
        lines = [f"evaluation {r.name!r} failed: " + "; ".join(failed_lines(r, 3)) for r in results]
        super().__init__("; ".join(lines))
        self.results = list(results)


def as_dict(result: epb.EvaluationResult) -> dict[str, Any]:
    """The result as JSON values, with false and zero fields spelled out (`passed: false`)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(result, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
