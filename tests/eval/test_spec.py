"""The evaluation spec: what parses, and refusals that say where the mistake is."""

from __future__ import annotations

import pytest

from aiaas.errors import InvalidArgument
from aiaas.eval.spec import SliceFeature, Slicing, parse_spec

FULL = """
name: holdout
task: classification
label: label
output: logits
metrics: [accuracy, top_3_accuracy, f1_macro, latency]
slices:
  - overall
  - feature: country
  - {feature: age, buckets: [18, 30, 50]}
  - cross: [country, {feature: age, buckets: [30]}]
thresholds:
  - {metric: accuracy, min: 0.9, min_examples: 50}
  - {metric: accuracy, max_decrease: 0.01, slices: [overall]}
  - {metric: latency_ms_p95, max: 20, slices: overall}
baseline: production
batch_size: 64
"""


def test_a_full_spec_parses() -> None:
    spec = parse_spec(FULL)
    assert spec.name == "holdout" and spec.task == "classification" and spec.batch_size == 64
    assert spec.top_k == (3,) and spec.needs_scores
    assert [s.name for s in spec.slicings] == ["overall", "country", "age", "country x age"]
    assert spec.slicings[3] == Slicing((SliceFeature("country"), SliceFeature("age", (30.0,))))
    first, relative, latency = spec.thresholds
    assert first.describe() == "accuracy >= 0.9" and first.min_examples == 50 and first.slicings is None
    assert relative.relative and relative.describe() == "accuracy drop <= 0.01 vs baseline"
    assert latency.slicings == ("overall",)
    assert spec.baseline == "production"
    assert len(spec.sha256) == 64 and spec.sha256 != parse_spec(FULL + "\n# edited\n").sha256


def test_defaults_add_the_overall_slice() -> None:
    spec = parse_spec("name: r\ntask: regression\nslices: [country]\n")
    assert spec.metrics == ("mse", "mae", "r2", "example_count")
    assert [s.name for s in spec.slicings] == ["overall", "country"]


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ntask: ranking\n", "task must be classification or regression"),
    ("task: classification\n", "name None is required"),
    ("name: x\ntask: classification\nmetrics: [acc]\n", r"metrics\[0\]: unknown classification metric 'acc'"),
    ("name: x\ntask: regression\nmetrics: [accuracy]\n", "unknown regression metric 'accuracy'"),
    ("name: x\ntask: classification\nthresholds: [{metric: accuracy}]\n", "give exactly one of min, max"),
    ("name: x\ntask: classification\nthresholds: [{metric: accuracy, min: 0.9, max: 1}]\n", "exactly one"),
    ("name: x\ntask: classification\nthresholds: [{metric: log_loss, max: 1}]\n",
     r"metric 'log_loss' is not computed by this spec"),
    ("name: x\ntask: classification\nthresholds: [{metric: accuracy, min: 0.9, slices: [country]}]\n",
     r"slices \['country'\] are not slicings of this spec"),
    ("name: x\ntask: classification\nslices: [{feature: age, buckets: [30, 18]}]\n", "increasing boundaries"),
    ("name: x\ntask: classification\nslices: [{cross: [a]}]\n", "exactly two features"),
    ("name: x\ntask: classification\nscores: class\nmetrics: [accuracy, log_loss]\n", "log_loss need class scores"),
    ("name: x\ntask: classification\nbatchsize: 3\n", "unknown key"),
    ("name: x\ntask: classification\nthresholds: [{metric: accuracy, min: yes}]\n", "must be a number"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_refusals_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_spec(text)
