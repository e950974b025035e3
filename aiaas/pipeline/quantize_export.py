"""int8 dynamic quantization of a `torch.export` program with torchao, the result again a `.pt2`
that the artifact gate accepts as it is.

torch 2.13 deprecates its own eager and graph-mode quantization (`torch.ao.quantization`) in
favour of torchao. torchao's `quantize_` swaps the weight of each `nn.Linear` for an int8 tensor
subclass (per-channel symmetric weights, activations quantized per row at run time, `aten._int_mm`
for the product). A stored program has no `nn.Linear` left, only `aten.linear` calls, so each
call whose weight and bias are stored tensors is lifted back into an `nn.Linear` first.

Then three steps keep the artifact inside the gate: `unwrap_tensor_subclass` stores the int8
data and scales as plain tensors (a tensor subclass would be saved as a pickle, which the gate
refuses); torchao's own operators (`torchao::choose_qparams_affine`, `quantize_affine`) are
decomposed into ATen, so neither the gate nor the serving side needs torchao; and each node's
provenance (`stack_trace`, `from_node`: paths of the building machine) is dropped, as it is most
of the graph's JSON.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from aiaas.errors import InvalidArgument
from aiaas.pipeline.export import batch_dynamic_shapes, exportable_batch, program_bytes, quiet_export

TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"
# Node metadata that only says where a node came from; torch.export.save writes it all.
_PROVENANCE_META = ("stack_trace", "from_node")


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    # torchao logs a warning per CUDA extension it cannot load on a CPU build, and registers an
    # enum with torch's pytree in a way torch 2.13 warns about.
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _stored_tensor(module: torch.nn.Module, node: object) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or not isinstance(node.target, str):
        return None
    owner, _, name = node.target.rpartition(".")
    value = getattr(module.get_submodule(owner), name, None)
    return value if isinstance(value, torch.Tensor) else None


def lift_linears(graph_module: torch.fx.GraphModule) -> int:
    """Replace each `aten.linear(x, W, b)` whose W (and b) are stored tensors with an `nn.Linear`
    submodule holding them; returns how many were lifted."""
    lifted = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, weight_node, *rest = node.args
        bias_node = rest[0] if rest else node.kwargs.get("bias")
        weight = _stored_tensor(graph_module, weight_node)
        bias = _stored_tensor(graph_module, bias_node) if bias_node is not None else None
        if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
            continue
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        name = f"aiaas_linear_{lifted}"
        graph_module.add_submodule(name, linear)
        with graph_module.graph.inserting_before(node):
            call = graph_module.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph_module.graph.erase_node(node)
        lifted += 1
    if lifted:
        _drop_unused_attributes(graph_module)
        graph_module.recompile()
    return lifted


def _drop_unused_attributes(graph_module: torch.fx.GraphModule) -> None:
    """Stored weights the lifted layers replaced would otherwise be exported (and stored) again."""
    for node in list(graph_module.graph.nodes):
        if node.op == "get_attr" and not node.users:
            owner, _, name = str(node.target).rpartition(".")
            graph_module.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == node.target for n in graph_module.graph.nodes):
                delattr(graph_module.get_submodule(owner), name)


def quantize_int8_dynamic(program: torch.export.ExportedProgram, example: Sequence[torch.Tensor]) -> bytes:
    """The `.pt2` bytes of `program` with every lifted Linear in int8 (dynamic activations)."""
    try:
        with _quiet_torchao_import():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            from torchao.utils import unwrap_tensor_subclass
    except ImportError as exc:
        raise InvalidArgument(f"int8-dynamic on torch.export versions needs torchao ({TORCHAO_REQUIREMENT}): "
                              f"{exc}") from None
    module = program.module()
    if not isinstance(module, torch.fx.GraphModule) or lift_linears(module) == 0:
        raise InvalidArgument("int8-dynamic found no Linear layer to quantize in this model")
    args = exportable_batch(example)
    with quiet_export(), torch.no_grad():
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
        unwrap_tensor_subclass(module)
        exported = torch.export.export(module, args, dynamic_shapes=batch_dynamic_shapes(args))
        torchao_ops = {op: fn for op, fn in torch.export.default_decompositions().items()
                       if op.namespace == "torchao"}
        exported = exported.run_decompositions(torchao_ops)
    for node in exported.graph.nodes:
        for key in _PROVENANCE_META:
            node.meta.pop(key, None)
    return program_bytes(exported)
