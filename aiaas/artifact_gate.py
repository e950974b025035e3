"""The artifact gate: what an uploaded model may contain, checked before anything is deserialized.

A model artifact is code. This module decides, per format, what is data and what is code, and
refuses the rest *before* any deserializer that could run code sees the bytes:

- ``torch_export`` (``.pt2``): a zip of a JSON graph plus raw tensor payloads. Refused: pickled
  weights or constants (``use_pickle``), torchbind custom objects, opaque (pickled) constants,
  legacy ``.pt`` weight files, ``aotinductor/`` shared objects, any entry not in the layout below,
  graph nodes calling anything but allowed operators (``torch.ops.aten.*`` minus file/IO ops,
  ``_operator.*`` arithmetic...), and symbolic-shape expressions outside a small grammar (torch
  parses them with ``sympy.sympify``, which evaluates Python). The pickled sample inputs that
  ``torch.export.save`` always writes are never read. `load_torch_export` then rebuilds the
  program from the checked JSON and the raw tensors, never through ``torch.export.load``.
- ``torchscript``: every ``code/`` source in the archive is scanned for the operators it calls
  (``torch.from_file``, ``torch.save``, ops outside the allowed namespaces are refused) before
  ``torch.jit.load`` runs any ``__setstate__``; after loading, every method graph is inlined and
  scanned again node by node. Operators can turn the format off entirely.
- ``onnx``: external data is refused (an initializer could otherwise name any file on the node,
  such as another version's artifact), and so are operator domains outside an allow-list.
- ``safetensors``: the header must be bounded JSON whose offsets stay inside the file.
- ``hf_causal_lm`` (a checkpoint directory): known file names only, safetensors weights only (no
  pickled ``*.bin``/``*.pt``), no code (``*.py``, ``auto_map``), a ``model_type`` that transformers
  ships as a decoder-only model, and every shard checked as ``safetensors``.

The same checks run at upload (registry, no torch deserializer at all), in ``aiaas convert`` /
``aiaas optimize``, and again at load in the inference worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from aiaas import formats, manifest
from aiaas.errors import InvalidArgument

# Every format the registry stores, each checked below (declared in aiaas.formats).
FORMATS = formats.FORMATS

MAX_ZIP_ENTRIES = 100_000
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_CODE_BYTES = 64 * 1024 * 1024
MAX_EXPR_CHARS = 4096
MAX_GRAPH_DEPTH = 64

# Operator namespaces a graph may call. Everything else (distributed c10d, profiler, inductor,
# test and debug namespaces, third-party custom ops) is refused.
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized", "quantized_decomposed"})
# Operators inside allowed namespaces that touch files, print, or alias raw storage.
DENIED_OPS = frozenset({
    "from_file", "save", "load", "_load_for_mobile", "set_", "_print", "PythonOp", "CallFunction",
    "_set_item_storage", "_set_data", "set_data",
})
ALLOWED_HIGHER_ORDER = frozenset({
    "cond", "while_loop", "map_impl", "scan", "associative_scan", "wrap_with_set_grad_enabled",
    "wrap_with_autocast", "invoke_subgraph", "auto_functionalized", "auto_functionalized_v2",
})
ALLOWED_PY_OPERATORS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
})
ALLOWED_MATH = frozenset({"ceil", "floor", "trunc", "sqrt"})
ALLOWED_TORCH_SYM = frozenset({
    "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_sym_sqrt",
})
# TorchScript's custom C++ classes (torchbind) that quantized models use; nothing else.
ALLOWED_TORCH_CLASS_NAMESPACES = frozenset({"quantized"})
# Standard ONNX domains plus the ones onnxruntime implements itself (its graph optimizer writes
# them); anything else is a custom op library.
ONNX_ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview",
                                  "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
                                  "com.microsoft.experimental", "com.ms.internal.nhwc"})

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_OP_TARGET_RE = re.compile(rf"torch\.ops\.({_IDENT})\.({_IDENT})(?:\.({_IDENT}))?")
_SYMBOL_NAME_RE = re.compile(r"[a-z]{1,8}[0-9]{1,9}")


class UnsafeArtifact(ValueError):
    """The artifact holds something that can run code, or is not a well-formed archive of its format."""


@dataclasses.dataclass(frozen=True)
class GateReport:
    """What the gate saw: the operators a graph calls (for audit and tests)."""

    format: str
    operators: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------------------------- entry


def check_artifact(source: str | os.PathLike[str] | bytes | Mapping[str, str | os.PathLike[str]], format: str, *,
                   allow_torchscript: bool = True) -> GateReport:
    """Refuse (UnsafeArtifact) anything in `source` that is not provably data, without deserializing it.

    Pure parsing: zip directories, JSON, protobuf and pickle opcodes are read, nothing is executed,
    so this is safe to run in the registry on every upload. A multi-file format's `source` is a
    directory, or {path inside the artifact: file on disk}.
    """
    if isinstance(source, Mapping) or format == "hf_causal_lm":
        return _check_multi_file(source, format)
    if format == "torch_export":
        return _check_pt2(source).report
    if format == "torchscript":
        if not allow_torchscript:
            raise UnsafeArtifact("TorchScript artifacts are turned off on this platform (its operators set "
                                 "the torchscript format off); export the model with torch.export or ONNX")
        return _check_torchscript(source)
    if format == "onnx":
        return _check_onnx(_read(source))[1]
    if format == "safetensors":
        return _check_safetensors(source)
    raise UnsafeArtifact(f"unknown artifact format {format!r}; expected one of {', '.join(FORMATS)}")


def check_file_names(paths: Iterable[str], format: str) -> None:
    """What the file names of a multi-file artifact alone tell: the registry checks them before any byte arrives."""
    if format != "hf_causal_lm":
        raise UnsafeArtifact(f"a {format} artifact is a single file, not a list of files")
    check_checkpoint_names(paths)


def _check_multi_file(source: str | os.PathLike[str] | bytes | Mapping[str, str | os.PathLike[str]],
                      format: str) -> GateReport:
    if format != "hf_causal_lm":
        raise UnsafeArtifact(f"a {format} artifact is a single file, not a list of files")
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise UnsafeArtifact(f"a {format} artifact is a directory of files, not bytes")
    if not isinstance(source, Mapping):
        try:
            source = manifest.files_in(source)
        except InvalidArgument as exc:
            raise UnsafeArtifact(exc.message) from None
    return check_checkpoint(source)


def _read(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def _open_zip(source: str | os.PathLike[str] | bytes, what: str) -> zipfile.ZipFile:
    try:
        handle = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnsafeArtifact(f"{what} is not a zip archive ({exc})") from None
    infos = handle.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise UnsafeArtifact(f"{what} has {len(infos)} entries; the limit is {MAX_ZIP_ENTRIES}")
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if (not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name
                or any(part in ("..", "") for part in name.rstrip("/").split("/"))):
            raise UnsafeArtifact(f"{what} has an entry with an unsafe path: {name[:200]!r}")
        if name in seen:
            raise UnsafeArtifact(f"{what} has the entry {name[:200]!r} twice")
        seen.add(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsafeArtifact(f"{what}: entry {name[:200]!r} uses compression method {info.compress_type}; "
                                 "only stored and deflated entries are read")
        if info.flag_bits & 0x1:
            raise UnsafeArtifact(f"{what}: entry {name[:200]!r} is encrypted")
    return handle


def _split_prefix(handle: zipfile.ZipFile, what: str) -> tuple[str, list[str]]:
    """Torch archives keep every entry under one top-level folder; return it and the inner names."""
    names = [n for n in handle.namelist() if not n.endswith("/")]
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or any("/" not in n for n in names):
        raise UnsafeArtifact(f"{what} must keep all its entries under one top-level folder, found "
                             f"{sorted(prefixes)[:5]}")
    prefix = prefixes.pop()
    return prefix, [n[len(prefix) + 1:] for n in names]


def _read_entry(handle: zipfile.ZipFile, name: str, limit: int, what: str) -> bytes:
    info = handle.getinfo(name)
    if info.file_size > limit:
        raise UnsafeArtifact(f"{what}: entry {name!r} is {info.file_size} bytes; the limit is {limit}")
    with handle.open(info) as entry:
        data = entry.read(limit + 1)
    if len(data) > limit:
        raise UnsafeArtifact(f"{what}: entry {name!r} is larger than {limit} bytes")
    return data


# ---------------------------------------------------------------------------------------------- operators


def check_operator_name(namespace: str, name: str, where: str) -> None:
    """A graph operator `namespace::name` must be in an allowed namespace and not a denied op."""
    if namespace not in ALLOWED_NAMESPACES:
        raise UnsafeArtifact(f"{where} calls operator {namespace}::{name}: the {namespace!r} namespace is not "
                             f"allowed (allowed: {', '.join(sorted(ALLOWED_NAMESPACES))})")
    if name in DENIED_OPS or name.rstrip("_") in DENIED_OPS:
        raise UnsafeArtifact(f"{where} calls operator {namespace}::{name}, which reads or writes files, prints "
                             "or aliases raw memory; models may not call it")


def _check_pt2_target(target: str, where: str) -> str:
    """A node target in a serialized exported program; returns its canonical name."""
    if not isinstance(target, str) or len(target) > 300:
        raise UnsafeArtifact(f"{where}: a node target is not a short string")
    match = _OP_TARGET_RE.fullmatch(target)
    if match:
        namespace, name, _overload = match.groups()
        if namespace == "higher_order":
            if name not in ALLOWED_HIGHER_ORDER:
                raise UnsafeArtifact(f"{where} calls higher-order operator {name!r}, which is not allowed")
        else:
            check_operator_name(namespace, name, where)
        return f"{namespace}::{name}"
    head, _, name = target.partition(".")
    if head == "_operator" and name in ALLOWED_PY_OPERATORS:
        return target
    if head == "math" and name in ALLOWED_MATH:
        return target
    if head == "torch" and name in ALLOWED_TORCH_SYM:
        return target
    raise UnsafeArtifact(f"{where} calls {target[:200]!r}, which is not an allowed operator (allowed: "
                         "torch.ops.<aten|prims|quantized...>.<op>, _operator arithmetic, torch.sym_*)")


# Symbolic shape expressions: torch parses them with sympy.sympify (Python eval), so only a
# small grammar of sympy constructors over integers and symbol names may reach it.
_EXPR_TOKEN_RE = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|"
                            r"'[A-Za-z0-9_.+\-]{0,64}'|\*\*|//|==|!=|<=|>=|[(),=+\-*/%<>]")
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Xor", "true", "false", "True", "False", "oo", "zoo", "nan", "int_oo",
    "Infinity", "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "floor", "ceiling", "sqrt",
    "positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "precision",
    "evaluate", "commutative", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
})


def check_sym_expr(expr: str, where: str) -> None:
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise UnsafeArtifact(f"{where}: a symbolic expression is not a string of at most {MAX_EXPR_CHARS} chars")
    position = 0
    while position < len(expr):
        match = _EXPR_TOKEN_RE.match(expr, position)
        if not match:
            raise UnsafeArtifact(f"{where}: symbolic expression {expr[:120]!r} has a character sympy would "
                                 f"evaluate as code at offset {position} ({expr[position:position + 10]!r})")
        token = match.group(0)
        if token[0].isalpha() or token[0] == "_":
            if token not in _EXPR_NAMES and not _SYMBOL_NAME_RE.fullmatch(token) \
                    and not token.startswith("OpaqueUnaryFn_"):
                raise UnsafeArtifact(f"{where}: symbolic expression {expr[:120]!r} names {token!r}, which is "
                                     "not a shape function or symbol")
            if "__" in token:
                raise UnsafeArtifact(f"{where}: symbolic expression {expr[:120]!r} names {token!r}")
        position = match.end()


# ---------------------------------------------------------------------------------------------- .pt2

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
              "models/model.json", "data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_PT2_WEIGHT_RE = re.compile(r"data/weights/weight_[0-9]{1,9}")
_PT2_CONSTANT_RE = re.compile(r"data/constants/tensor_[0-9]{1,9}")
_PT2_EXTRA_RE = re.compile(r"extra/[A-Za-z0-9_.\-]{1,200}")


@dataclasses.dataclass
class _Pt2:
    prefix: str
    program: dict[str, Any]
    weights: dict[str, Any]
    constants: dict[str, Any]
    report: GateReport


def _check_pt2(source: str | os.PathLike[str] | bytes) -> _Pt2:
    what = "the torch.export archive"
    with _open_zip(source, what) as handle:
        prefix, names = _split_prefix(handle, what)
        _check_pt2_names(names, what)

        def entry(name: str, limit: int = MAX_JSON_BYTES) -> bytes:
            return _read_entry(handle, f"{prefix}/{name}", limit, what)

        if "data/sample_inputs/model.pt" in names:
            # Never read by our loader, but other tools (torch.export.load) unpickle it: it may hold
            # tensors only, which an opcode scan proves without unpickling.
            check_tensor_pickle(entry("data/sample_inputs/model.pt"),
                                f"{what}: sample inputs (data/sample_inputs/model.pt)")
        if entry("archive_format", 64).strip() != b"pt2":
            raise UnsafeArtifact(f"{what}: archive_format is not 'pt2'")
        if "byteorder" in names and entry("byteorder", 64).strip() not in (b"little", b""):
            raise UnsafeArtifact(f"{what} was saved on a big-endian machine; only little-endian is read")
        weights = _payload_config(entry, names, "data/weights/model_weights_config.json", "weight_", what)
        constants = _payload_config(entry, names, "data/constants/model_constants_config.json", "tensor_", what)
        for config, folder in ((weights, "data/weights/"), (constants, "data/constants/")):
            for fqn, meta in config.items():
                if f"{folder}{meta['path_name']}" not in names:
                    raise UnsafeArtifact(f"{what}: {fqn!r} names the missing payload {meta['path_name']!r}")
                size = handle.getinfo(f"{prefix}/{folder}{meta['path_name']}").file_size
                _check_tensor_meta(meta.get("tensor_meta"), size, fqn, what)
        try:
            program = json.loads(entry("models/model.json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeArtifact(f"{what}: models/model.json is not JSON ({exc})") from None
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UnsafeArtifact(f"{what}: models/model.json is not a serialized ExportedProgram")
    operators: set[str] = set()
    _walk_program(program, operators, what, 0)
    # Guards are Python source that torch compiles into the module when sample inputs are loaded;
    # the gate never loads sample inputs and drops the guards (range constraints still check shapes).
    program["guards_code"] = []
    for key in (program.get("range_constraints") or {}):
        check_sym_expr(key, f"{what} range constraint")
    return _Pt2(prefix, program, weights, constants, GateReport("torch_export", frozenset(operators)))


def _check_pt2_names(names: list[str], what: str) -> None:
    """Every entry is one the loader knows to be data; the code-carrying kinds are named in the refusal."""
    refused = (
        ("aotinductor/", ("carries AOTInductor compiled code ({name!r}); shared objects are not loaded: save the "
                         "program with torch.export.save only")),
        ("data/constants/custom_obj_", ("carries a torchbind custom object ({name!r}), which is unpickled on load; "
                                       "it is refused")),
        ("data/constants/opaque_obj_", ("carries an opaque constant ({name!r}), which is a Python pickle; it is "
                                       "refused")),
    )
    for name in names:
        for start, reason in refused:
            if name.startswith(start):
                raise UnsafeArtifact(f"{what} {reason.format(name=name)}")
        if name.endswith(".pt") and name.startswith(("data/weights/", "data/constants/")):
            raise UnsafeArtifact(f"{what} stores tensors in the legacy pickled format ({name!r}); "
                                 "re-save it with a current torch.export.save")
        if not (name in _PT2_FIXED or _PT2_WEIGHT_RE.fullmatch(name) or _PT2_CONSTANT_RE.fullmatch(name)
                or _PT2_EXTRA_RE.fullmatch(name)):
            raise UnsafeArtifact(f"{what} has an unexpected entry {name!r}; only one program "
                                 "('model'), its raw weights and constants, and extra/ files are accepted")
    for required in ("archive_format", "models/model.json"):
        if required not in names:
            raise UnsafeArtifact(f"{what} has no {required!r} entry; save it with torch.export.save")


def _payload_config(entry: Any, names: list[str], name: str, file_prefix: str, what: str) -> dict[str, Any]:
    if name not in names:
        return {}
    try:
        config = json.loads(entry(name)).get("config", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise UnsafeArtifact(f"{what}: {name} is not a payload config ({exc})") from None
    if not isinstance(config, dict):
        raise UnsafeArtifact(f"{what}: {name} is not a payload config")
    for fqn, meta in config.items():
        if not isinstance(meta, dict):
            raise UnsafeArtifact(f"{what}: {name} entry {fqn!r} is malformed")
        if meta.get("use_pickle"):
            raise UnsafeArtifact(f"{what} stores {fqn!r} as a pickle (use_pickle), which runs code when "
                                 "loaded; store plain dense tensors instead")
        path_name = meta.get("path_name", "")
        if not isinstance(path_name, str) or not re.fullmatch(rf"{file_prefix}[0-9]{{1,9}}", path_name):
            raise UnsafeArtifact(f"{what}: {fqn!r} is stored as {str(path_name)[:80]!r}; only raw tensor "
                                 f"payloads ({file_prefix}N) are accepted")
    return config


_DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
                14: 1, 15: 1, 16: 1, 17: 1, 18: 2, 19: 4, 20: 8}


def _as_int(value: Any, what: str) -> int:
    if not isinstance(value, dict) or set(value) != {"as_int"} or not isinstance(value["as_int"], int):
        raise UnsafeArtifact(f"{what}: a stored tensor has a symbolic or malformed size/stride")
    return int(value["as_int"])


def _check_tensor_meta(meta: Any, nbytes: int, fqn: str, what: str) -> None:
    if not isinstance(meta, dict):
        raise UnsafeArtifact(f"{what}: {fqn!r} has no tensor metadata")
    dtype = meta.get("dtype")
    itemsize = _DTYPE_BYTES.get(dtype) if isinstance(dtype, int) else None
    if itemsize is None:
        raise UnsafeArtifact(f"{what}: {fqn!r} has unknown dtype code {meta.get('dtype')!r}")
    sizes = [_as_int(s, what) for s in meta.get("sizes", [])]
    strides = [_as_int(s, what) for s in meta.get("strides", [])]
    offset = _as_int(meta.get("storage_offset", {"as_int": 0}), what)
    if len(sizes) != len(strides) or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise UnsafeArtifact(f"{what}: {fqn!r} has inconsistent sizes/strides")
    if nbytes % itemsize:
        raise UnsafeArtifact(f"{what}: payload of {fqn!r} is {nbytes} bytes, not whole {itemsize}-byte items")
    if sizes and min(sizes) == 0:
        return
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    if nbytes and last >= nbytes // itemsize:
        raise UnsafeArtifact(f"{what}: {fqn!r} views element {last} of a payload holding {nbytes // itemsize}")


def _walk_program(value: Any, operators: set[str], what: str, depth: int) -> None:
    """Every node target and operator argument in every (sub)graph, and every symbolic expression."""
    if depth > MAX_GRAPH_DEPTH * 8:
        raise UnsafeArtifact(f"{what}: the program nests deeper than the gate reads")
    if isinstance(value, dict):
        nodes = value.get("nodes")
        if isinstance(nodes, list):
            for node in nodes:
                if isinstance(node, dict) and "target" in node:
                    operators.add(_check_pt2_target(node["target"], what))
                    metadata = node.get("metadata")
                    if isinstance(metadata, dict):
                        # Resolved with getattr on torch by the deserializer; not needed to serve.
                        metadata.pop("source_fn_stack", None)
                        metadata.pop("torch_fn", None)
        for key, item in value.items():
            if key == "as_custom_obj":
                raise UnsafeArtifact(f"{what} passes a torchbind custom object in its graph; it is refused")
            if key == "as_operator":
                operators.add(_check_pt2_target(item, what))
            elif key == "expr_str":
                check_sym_expr(item, what)
            else:
                _walk_program(item, operators, what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk_program(item, operators, what, depth + 1)


# What `torch.save` writes for plain tensors and containers: the globals of a weights-only pickle.
_TENSOR_PICKLE_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch.storage", "UntypedStorage"),
    ("torch._utils", "_rebuild_tensor"), ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    ("torch", "bfloat16"), ("torch", "float16"), ("torch", "float32"), ("torch", "float64"), ("torch", "int8"),
    ("torch", "int16"), ("torch", "int32"), ("torch", "int64"), ("torch", "uint8"), ("torch", "bool"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
})


_TORCH_DTYPE_RE = re.compile(r"u?int(?:8|16|32|64)|float(?:16|32|64)|bfloat16|half|double|float|long|int|short|"
                             r"bool|complex(?:32|64|128)|cfloat|cdouble|float8_[a-z0-9]+|q(?:u)?int[0-9x]+")


def check_tensor_pickle(data: bytes, where: str) -> None:
    """`data` (a torch.save zip) pickles only tensors, storages and plain containers; read by opcodes only."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UnsafeArtifact(f"{where} is not a torch.save archive (a plain pickle is refused)")
        for opcode, arg, _pos in pickletools.genops(archive.read(pickles[0])):
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                storage = module == "torch" and (name.endswith("Storage") or bool(_TORCH_DTYPE_RE.fullmatch(name)))
                if (module, name) not in _TENSOR_PICKLE_GLOBALS and not storage:
                    raise UnsafeArtifact(f"{where} pickles {module}.{name}, which is not a tensor; refused")
            elif opcode.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                raise UnsafeArtifact(f"{where} uses pickle opcode {opcode.name}, which names code indirectly")
    except UnsafeArtifact:
        raise
    except (zipfile.BadZipFile, ValueError, IndexError, struct.error, KeyError) as exc:
        raise UnsafeArtifact(f"{where} is not a torch.save archive ({str(exc)[:120]})") from None


# ---------------------------------------------------------------------------------------------- TorchScript

_TS_FIXED = {"data.pkl", "constants.pkl", "version", ".data/version", ".data/serialization_id", "byteorder",
             "traced_inputs.pkl"}
_TS_ENTRY_RE = re.compile(r"(?:data|constants|traced_inputs)/[0-9]{1,9}|extra/[A-Za-z0-9_.\-]{1,200}|"
                          r"code/__torch__(?:/[A-Za-z0-9_]{1,200})*\.py(?:\.debug_pkl)?|"
                          r"code/__torch__(?:/[A-Za-z0-9_]{1,200})+/?")
_TS_CALL_RE = re.compile(rf"(?<![A-Za-z0-9_.])(?:torch\.ops\.|ops\.)({_IDENT})\.({_IDENT})|"
                         rf"(?<![A-Za-z0-9_.])torch\.({_IDENT})|__torch__\.torch\.classes\.({_IDENT})\.")
_TS_DENIED_TOKENS_RE = re.compile(r"\b(from_file|_load_for_mobile|PythonOp)\b")


def _check_torchscript(source: str | os.PathLike[str] | bytes) -> GateReport:
    what = "the TorchScript archive"
    operators: set[str] = set()
    with _open_zip(source, what) as handle:
        prefix, names = _split_prefix(handle, what)
        if "data.pkl" not in names:
            raise UnsafeArtifact(f"{what} has no data.pkl; save it with torch.jit.save")
        for name in names:
            if not (name in _TS_FIXED or _TS_ENTRY_RE.fullmatch(name)):
                raise UnsafeArtifact(f"{what} has an unexpected entry {name!r}")
            if name.endswith(".py"):
                code = _read_entry(handle, f"{prefix}/{name}", MAX_CODE_BYTES, what).decode("utf-8", "replace")
                _scan_torchscript_code(code, f"{what} ({name})", operators)
            elif name.endswith(".pkl") and not name.endswith(".debug_pkl"):
                _scan_torchscript_pickle(_read_entry(handle, f"{prefix}/{name}", MAX_JSON_BYTES, what),
                                         f"{what} ({name})")
    return GateReport("torchscript", frozenset(operators))


def _scan_torchscript_code(code: str, where: str, operators: set[str]) -> None:
    denied = _TS_DENIED_TOKENS_RE.search(code)
    if denied:
        raise UnsafeArtifact(f"{where} uses {denied.group(1)!r}, which reads files or runs Python; refused")
    for match in _TS_CALL_RE.finditer(code):
        namespace, name, aten_name, class_ns = match.groups()
        if class_ns is not None:
            if class_ns not in ALLOWED_TORCH_CLASS_NAMESPACES:
                raise UnsafeArtifact(f"{where} uses custom class namespace torch.classes.{class_ns}, which is "
                                     "not allowed")
            continue
        if aten_name is not None:
            namespace, name = "aten", aten_name
            if name == "ops":
                continue
        check_operator_name(namespace, name, where)
        operators.add(f"{namespace}::{name}")


def _scan_torchscript_pickle(data: bytes, where: str) -> None:
    """TorchScript's own unpickler reads these; check the classes they name without unpickling."""
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module = arg.split(" ", 1)[0]
                if module.startswith("__torch__.torch.classes."):
                    namespace = module.split(".")[3] if module.count(".") >= 3 else ""
                    if namespace not in ALLOWED_TORCH_CLASS_NAMESPACES:
                        raise UnsafeArtifact(f"{where} instantiates custom class {arg!r}, which is not allowed")
                elif not module.startswith(("__torch__", "torch", "collections", "builtins")):
                    raise UnsafeArtifact(f"{where} names {arg!r}, which is not a TorchScript type")
    except UnsafeArtifact:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise UnsafeArtifact(f"{where} is not a valid pickle stream ({exc})") from None


def check_torchscript_module(module: Any) -> frozenset[str]:
    """After `torch.jit.load`: inline every method of every submodule and check each node's operator."""
    import torch

    operators: set[str] = set()
    seen: set[int] = set()
    for submodule in module.modules():
        scripted = getattr(submodule, "_c", None)
        if scripted is None or id(scripted) in seen:
            continue
        seen.add(id(scripted))
        for method_name in scripted._method_names():
            graph = scripted._get_method(method_name).graph.copy()
            torch._C._jit_pass_inline(graph)
            for node in _graph_nodes(graph.nodes(), 0):
                kind = node.kind()
                namespace, _, name = kind.partition("::")
                check_operator_name(namespace, name, f"the TorchScript method {method_name!r}")
                operators.add(kind)
    return frozenset(operators)


def _graph_nodes(nodes: Any, depth: int) -> Iterator[Any]:
    if depth > MAX_GRAPH_DEPTH:
        raise UnsafeArtifact("the TorchScript graph nests deeper than the gate reads")
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _graph_nodes(block.nodes(), depth + 1)


# ---------------------------------------------------------------------------------------------- ONNX


def _check_onnx(data: bytes, allowed_domains: frozenset[str] = ONNX_ALLOWED_DOMAINS) -> tuple[Any, GateReport]:
    try:
        import onnx
    except ImportError:
        raise UnsafeArtifact("ONNX artifacts need the 'onnx' package to be checked; install aiaas[onnx]") \
            from None
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UnsafeArtifact(f"the ONNX model is not a valid ModelProto ({str(exc)[:200]})") from None
    if model.graph is None or not model.ByteSize():
        raise UnsafeArtifact("the ONNX model is empty")
    local_domains = {f.domain for f in model.functions}
    domains = set(allowed_domains) | local_domains
    # Opset imports only declare versions (onnxruntime's optimizer writes many); what runs is what
    # the nodes name, so the nodes' domains are what is checked.
    operators: set[str] = set()
    graphs: list[tuple[str, Any]] = [("graph", model.graph)]
    for function in model.functions:
        for node in function.node:
            _check_onnx_node(node, domains, operators, graphs)
    while graphs:
        where, graph = graphs.pop()
        for tensor in list(graph.initializer) + [s.values for s in graph.sparse_initializer] \
                + [s.indices for s in graph.sparse_initializer]:
            _check_onnx_tensor(tensor, f"{where} initializer {tensor.name!r}")
        for node in graph.node:
            _check_onnx_node(node, domains, operators, graphs)
    return model, GateReport("onnx", frozenset(operators))


def _check_onnx_tensor(tensor: Any, where: str) -> None:
    import onnx

    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
        raise UnsafeArtifact(f"the ONNX model's {where} uses external data (a file named by the model); "
                             "external data is refused: save the model with all tensors inside the file")


def _check_onnx_node(node: Any, domains: set[str], operators: set[str], graphs: list[tuple[str, Any]]) -> None:
    import onnx

    if node.domain not in domains:
        raise UnsafeArtifact(f"the ONNX node {node.name or node.op_type!r} uses operator domain {node.domain!r} "
                             "(a custom op library), which is not allowed (allowed: "
                             f"{', '.join(repr(d) for d in sorted(ONNX_ALLOWED_DOMAINS))})")
    operators.add(f"{node.domain or 'ai.onnx'}::{node.op_type}")
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append((attribute.name, attribute.g))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend((attribute.name, g) for g in attribute.graphs)
        elif attribute.type == onnx.AttributeProto.TENSOR:
            _check_onnx_tensor(attribute.t, f"node {node.name!r} attribute {attribute.name!r}")
        elif attribute.type == onnx.AttributeProto.TENSORS:
            for tensor in attribute.tensors:
                _check_onnx_tensor(tensor, f"node {node.name!r} attribute {attribute.name!r}")
        elif attribute.type == onnx.AttributeProto.SPARSE_TENSOR:
            _check_onnx_tensor(attribute.sparse_tensor.values, f"node {node.name!r} attribute {attribute.name!r}")


# ---------------------------------------------------------------------------------------------- safetensors


def _check_safetensors(source: str | os.PathLike[str] | bytes) -> GateReport:
    data = source if isinstance(source, (bytes, bytearray)) else None
    size = len(data) if data is not None else os.path.getsize(source)  # type: ignore[arg-type]
    if data is None:
        with open(source, "rb") as handle:  # type: ignore[arg-type]
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = handle.read(min(max(length, 0), MAX_JSON_BYTES))
    else:
        length = struct.unpack("<Q", data[:8])[0] if size >= 8 else -1
        header = bytes(data[8:8 + min(max(length, 0), MAX_JSON_BYTES)])
    if length < 2 or length > MAX_JSON_BYTES or 8 + length > size or len(header) != length:
        raise UnsafeArtifact("the safetensors file has no valid header length")
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeArtifact(f"the safetensors header is not JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise UnsafeArtifact("the safetensors header is not a JSON object")
    body = size - 8 - length
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise UnsafeArtifact(f"the safetensors tensor {name[:100]!r} has offsets outside the file")
    return GateReport("safetensors")


# ---------------------------------------------------------------------------------------------- checkpoints

# Decoder-only architectures that transformers ships (config.json `model_type`): their code comes
# from the installed transformers, never from the checkpoint (tests check each against transformers).
CAUSAL_LM_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gpt2", "gpt_neox",
    "gptj", "gpt_bigcode", "gemma", "gemma2", "gemma3_text", "falcon", "opt", "bloom", "olmo", "olmo2",
    "stablelm", "starcoder2", "granite", "smollm3", "cohere",
})
# What a checkpoint directory may hold besides its *.safetensors shards: configuration, tokenizer
# data (read by the tokenizers library, never unpickled), chat templates (rendered by transformers
# in a sandboxed jinja environment) and documentation.
CHECKPOINT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "README.md", "README", "LICENSE",
    "LICENSE.md", "LICENSE.txt", "NOTICE", "USE_POLICY.md",
})
_SHARD_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}\.safetensors")
_EXTRA_TEMPLATE_RE = re.compile(r"additional_chat_templates/[A-Za-z0-9_][A-Za-z0-9._-]{0,200}\.jinja")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".sh")
# Configuration files the gate parses (tokenizer.json and vocab.json are data for the tokenizers library).
_CHECKPOINT_CONFIGS = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.json", "model.safetensors.index.json")
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def check_checkpoint(files: Mapping[str, str | os.PathLike[str]]) -> GateReport:
    """A Hugging Face causal-LM checkpoint, given as {path inside the checkpoint: file on disk}.

    Only known file names; weights in safetensors only (pickled *.bin/*.pt refused); no code (*.py)
    and no `auto_map` (which would make transformers import code shipped with the checkpoint); a
    `model_type` transformers ships as a decoder-only model; every shard's header in bounds.
    """
    shards = check_checkpoint_names(files)
    configs = {name: _checkpoint_json(files[name], name) for name in _CHECKPOINT_CONFIGS if name in files}
    for name, document in configs.items():
        _refuse_auto_map(document, name, 0)
    config = configs["config.json"]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CAUSAL_LM_MODEL_TYPES:
        raise UnsafeArtifact(f"config.json: model_type {str(model_type)[:60]!r} is not a decoder-only architecture "
                             f"transformers ships; allowed: {', '.join(sorted(CAUSAL_LM_MODEL_TYPES))}")
    if "model.safetensors.index.json" in configs:
        _check_shard_index(configs["model.safetensors.index.json"], set(shards))
    for shard in shards:
        try:
            _check_safetensors(files[shard])
        except UnsafeArtifact as exc:
            raise UnsafeArtifact(f"{shard}: {exc}") from None
    return GateReport("hf_causal_lm")


def check_checkpoint_names(paths: Iterable[str]) -> list[str]:
    """What the file names alone tell (the registry checks them before any byte arrives); returns the shards."""
    listed = sorted(paths)
    for path in listed:
        _check_checkpoint_name(path)
    shards = [p for p in listed if _SHARD_RE.fullmatch(p)]
    if "config.json" not in listed:
        raise UnsafeArtifact("the checkpoint has no config.json; save it with save_pretrained")
    if not shards:
        raise UnsafeArtifact("the checkpoint has no *.safetensors weights; save it with save_pretrained "
                             "(transformers writes safetensors)")
    return shards


def _check_checkpoint_name(path: str) -> None:
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(_PICKLE_SUFFIXES):
        raise UnsafeArtifact(f"{path}: pickled (or non-safetensors) weights are refused; save the model with "
                             "safetensors (save_pretrained does) and leave *.bin/*.pt files out")
    if name.endswith(_CODE_SUFFIXES):
        raise UnsafeArtifact(f"{path}: a checkpoint may not carry code (models load with trust_remote_code=False); "
                             "use an architecture transformers ships")
    if not (path in CHECKPOINT_FILES or _SHARD_RE.fullmatch(path) or _EXTRA_TEMPLATE_RE.fullmatch(path)):
        raise UnsafeArtifact(f"{path}: not a file a checkpoint may hold (configuration, tokenizer and chat template "
                             "files, *.safetensors shards, README/LICENSE); leave it out")


def _checkpoint_json(source: str | os.PathLike[str], name: str) -> Any:
    with open(source, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise UnsafeArtifact(f"{name} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UnsafeArtifact(f"{name} is not JSON ({str(exc)[:200]})") from None


def _refuse_auto_map(value: Any, name: str, depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise UnsafeArtifact(f"{name} nests deeper than {MAX_GRAPH_DEPTH} levels")
    if isinstance(value, dict):
        if "auto_map" in value:
            raise UnsafeArtifact(f"{name} has an auto_map, which points transformers at code shipped with the "
                                 "checkpoint (remote code is refused); use an architecture transformers ships")
        for item in value.values():
            _refuse_auto_map(item, name, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _refuse_auto_map(item, name, depth + 1)


def _check_shard_index(index: Any, shards: set[str]) -> None:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UnsafeArtifact("model.safetensors.index.json has no weight_map of tensor names to shard files")
    missing = sorted(set(weight_map.values()) - shards)
    if missing:
        raise UnsafeArtifact(f"model.safetensors.index.json names shard {missing[0][:200]!r}, which the checkpoint "
                             "does not hold")


# ---------------------------------------------------------------------------------------------- loaders


def load_torch_export(source: str | os.PathLike[str] | bytes, *, device: str = "cpu") -> Any:
    """A `torch.export.ExportedProgram` rebuilt from a checked archive, without any pickle.

    Weights and constants come from their raw payloads; the program from the checked JSON; the
    pickled sample inputs are never read. Then every call_function node is checked once more.
    """
    import torch

    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader, _build_file_map
    except ImportError as exc:  # pragma: no cover - depends on the installed torch
        raise UnsafeArtifact(f"this torch ({torch.__version__}) has no pickle-free way to read .pt2 archives "
                             f"({exc}); export to ONNX instead") from None
    checked = _check_pt2(source)
    reader_source: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    reader = PT2ArchiveReader(reader_source)
    state_dict = _tensors(reader, checked.weights, "data/weights", schema, _build_file_map, device)
    constants = _tensors(reader, checked.constants, "data/constants", schema, _build_file_map, device)
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, checked.program)
        exported = ExportedProgramDeserializer(None).deserialize(program, state_dict, constants, None)
    except UnsafeArtifact:
        raise
    except Exception as exc:  # noqa: BLE001 - any deserializer failure is a refusal with its reason
        raise UnsafeArtifact(f"the torch.export program does not deserialize: {str(exc)[:300]}") from None
    check_exported_program(exported)
    return exported


def _tensors(reader: Any, config: dict[str, Any], folder: str, schema: Any, build_file_map: Any,
             device: str) -> dict[str, Any]:
    import torch
    from torch._export.serde.serialize import _dict_to_dataclass

    if not config:
        return {}
    payload = _dict_to_dataclass(schema.PayloadConfig, {"config": config})
    files = build_file_map(reader, payload, folder)
    out: dict[str, Any] = {}
    for fqn, meta in config.items():
        tensor_meta = meta["tensor_meta"]
        tensor = torch.as_strided(
            files[meta["path_name"]],
            [s["as_int"] for s in tensor_meta["sizes"]],
            [s["as_int"] for s in tensor_meta["strides"]],
            tensor_meta.get("storage_offset", {"as_int": 0})["as_int"],
        )
        if meta.get("is_param"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(tensor_meta.get("requires_grad")))
        out[fqn] = tensor
    return out


def check_exported_program(exported: Any) -> frozenset[str]:
    """Every call_function node of a deserialized program is an allowed operator."""
    import math
    import operator

    import torch

    python_ok = {getattr(operator, n) for n in ALLOWED_PY_OPERATORS} | {getattr(math, n) for n in ALLOWED_MATH}
    python_ok |= {getattr(torch, n) for n in ALLOWED_TORCH_SYM if hasattr(torch, n)}
    operators: set[str] = set()
    modules = [exported.graph_module]
    while modules:
        graph_module = modules.pop()
        for child in graph_module.children():
            if isinstance(child, torch.fx.GraphModule):
                modules.append(child)
        for node in graph_module.graph.nodes:
            if node.op == "call_function":
                target = node.target
                if isinstance(target, torch._ops.OpOverload):
                    namespace = target.namespace
                    check_operator_name(namespace, target._schema.name.split("::")[-1], "the exported program")
                    operators.add(target._schema.name)
                elif isinstance(target, torch._ops.HigherOrderOperator):
                    if target.name() not in ALLOWED_HIGHER_ORDER:
                        raise UnsafeArtifact(f"the exported program calls higher-order op {target.name()!r}")
                elif target not in python_ok:
                    raise UnsafeArtifact(f"the exported program calls {target!r}, which is not an allowed operator")
            elif node.op in ("call_module", "call_method"):
                raise UnsafeArtifact(f"the exported program has a {node.op} node ({node.target}); refused")
    return frozenset(operators)


def load_torchscript(source: str | os.PathLike[str] | bytes, *, map_location: Any = "cpu",
                     allow_torchscript: bool = True) -> Any:
    """`torch.jit.load` behind the gate: the archive's code is scanned first, every graph after."""
    import warnings

    import torch

    check_artifact(source, "torchscript", allow_torchscript=allow_torchscript)
    with warnings.catch_warnings():
        # torch.jit.load is deprecated in torch 2.13, and quantized weights warn as they are rebuilt.
        warnings.simplefilter("ignore")
        handle: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        module = torch.jit.load(handle, map_location=map_location)
    check_torchscript_module(module)
    module.eval()
    return module


def onnx_model_bytes(source: str | os.PathLike[str] | bytes,
                     allowed_domains: frozenset[str] = ONNX_ALLOWED_DOMAINS) -> bytes:
    """The checked bytes of an ONNX model: hand exactly these to onnxruntime (never the path)."""
    data = _read(source)
    _check_onnx(data, allowed_domains)
    return data
