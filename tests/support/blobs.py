"""Small but real artifacts for tests that only need distinct, valid bytes.

The registry runs the artifact gate on every upload, so placeholder bytes are no longer accepted:
these build a valid ONNX model (one Identity node) whose content is made unique by `tag`, padded
with an unused initializer up to `min_size` bytes when a test needs several upload chunks.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def onnx_blob(tag: bytes | str, min_size: int = 0) -> bytes:
    text = tag.decode("latin-1") if isinstance(tag, bytes) else tag
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "blob",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    graph.doc_string = text
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    if len(data) < min_size:
        pad = min_size - len(data)
        model.graph.initializer.append(helper.make_tensor("pad", TensorProto.UINT8, [pad], b"\x07" * pad, raw=True))
        data = model.SerializeToString()
    onnx.load_model_from_string(data)  # well-formed
    return data
