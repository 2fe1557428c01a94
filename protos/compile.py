"""Regenerate the committed gRPC stubs: ``python -m protos.compile [--out DIR]``.

The repository root is the proto path, so generated modules import as
``from protos import inference_pb2`` with no rewriting.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
SOURCES = ("inference.proto", "mesh.proto")


def compile_protos(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    for source in SOURCES:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(Path("protos") / source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for protos/{source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT,
                        help="output root; modules land in OUT/protos/ (default: the repository)")
    args = parser.parse_args(argv)
    compile_protos(args.out)
    print(f"generated stubs for {', '.join(SOURCES)} under {args.out / 'protos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
