"""Generate Python (messages, type stubs, gRPC) for every proto under protos/ into the repo root.

Run `python tools/gen_protos.py` after editing a .proto and commit the results;
`python tools/gen_protos.py --check` exits 1 when the committed stubs are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir; return the generated files relative to out_dir."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in committed_stubs() if (out_dir / p).exists())
    for rel in generated:
        # Generated modules live inside the `aiaas` package: make each folder a package.
        for parent in rel.parents:
            if parent == Path(".") or parent == Path("aiaas"):
                continue
            init = out_dir / parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from protos/; do not edit."""\n')
    return generated


def committed_stubs() -> set[Path]:
    found: set[Path] = set()
    for proto in proto_files():
        rel = proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in GENERATED_SUFFIXES:
            found.add(rel.parent / (rel.name + suffix))
    return found


def stale_files() -> list[str]:
    """Files whose committed content differs from what protos/ generates."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        problems = []
        for rel in generated:
            target = ROOT / rel
            if not target.exists():
                problems.append(f"{rel}: missing")
            elif not filecmp.cmp(out / rel, target, shallow=False):
                problems.append(f"{rel}: differs")
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        problems = stale_files()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("stubs are stale: run `python tools/gen_protos.py`", file=sys.stderr)
            return 1
        print("stubs match protos/")
        return 0
    for rel in generate(ROOT):
        print(f"generated {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
