"""Generates the Python stubs of switchboard's gRPC service from ../../proto into ./_gen.

    python3 examples/python/gen.py

Needs grpcio-tools (pip install grpcio grpcio-tools). demo.py runs this itself when the stubs
are missing or older than the proto files.
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
OUT = HERE / "_gen"
FILES = ["switchboard/v1/envelope.proto", "switchboard/v1/switchboard.proto"]


def stale() -> bool:
    stamp = OUT / "switchboard" / "v1" / "switchboard_pb2_grpc.py"
    if not stamp.exists():
        return True
    newest = max((PROTO / f).stat().st_mtime for f in FILES)
    return stamp.stat().st_mtime < newest


def generate() -> None:
    from grpc_tools import protoc  # imported here: a clear error names the missing package

    OUT.mkdir(exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        *[str(PROTO / f) for f in FILES],
    ]
    if protoc.main(args) != 0:
        sys.exit("stub generation failed: " + " ".join(args))
    for pkg in [OUT / "switchboard", OUT / "switchboard" / "v1"]:
        (pkg / "__init__.py").touch()


def ensure() -> None:
    """Generates the stubs if needed and puts them on the import path."""
    if stale():
        generate()
    if str(OUT) not in sys.path:
        sys.path.insert(0, str(OUT))


if __name__ == "__main__":
    generate()
    print(f"stubs written to {OUT}")
