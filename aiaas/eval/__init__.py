"""Model quality: labeled data sets, evaluation specs, metrics per slice, thresholds, and reports.

`aiaas evaluate` runs a registered version on a registered data set (through the inference
service or through the loader inference uses), computes the spec's metrics per slice with
scikit-learn, checks its thresholds (absolute and against a baseline version) and stores an
`EvaluationResult` on the version; the registry's promotion gate reads those results.

Needs the `eval` extra (pyarrow, scikit-learn, matplotlib); modules import them when used.
"""
