"""Generate the Python stubs of protos/welfare/v1/*.proto into one flat package.

Run by the build (CMakeLists.txt: the stubs are generated at build time, never committed), or by
hand: python scripts/gen_protos.py --out DIR. grpc_tools' protoc writes modules that import each
other as `welfare.v1.X_pb2`; they are rewritten to `welfare_server.server.proto.X_pb2`, the
package they are installed as, so no top-level `welfare` package is needed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = "welfare_server.server.proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / "welfare" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'welfare' / 'v1'}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}"] + [str(p.relative_to(PROTO_ROOT)) for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(map(str, protos)))
        for generated in sorted((Path(tmp) / "welfare" / "v1").iterdir()):
            text = re.sub(r"\bfrom welfare\.v1 import\b", f"from {PACKAGE} import", generated.read_text())
            target = out / generated.name
            target.write_text(text)
            written.append(target)
    init = out / "__init__.py"
    init.write_text('"""Stubs of protos/welfare/v1, generated at build time by scripts/gen_protos.py."""\n')
    return written + [init]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
