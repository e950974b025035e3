"""The deployment pipeline: export, transform (quantize, cast, convert, graph-optimize), parity gate,
publish to the registry. `aiaas.deploy` and `aiaas convert|optimize|promote` are built on it.

    signature.py   signatures from example tensors, generated samples
    artifacts.py   formats and runners (never unpickling)
    export.py      nn.Module -> TorchScript / torch.export / ONNX, batch dimension variable
    optimize.py    artifact -> artifact transformations
    parity.py      the gate: errors, cosine, top-1, size, latency; tolerances
    steps.py       export or transform, then gate: a Candidate
    publish.py     Candidate -> registry version (via RegistryClient), parent artifact <- registry
    routes.py      rollout weights through the gateway's admin API
    commands.py    what the CLI commands do
"""
