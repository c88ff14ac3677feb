"""Build hook: generates kvstrata/v1/kvstrata_pb2*.py(i) from the repository's proto/.

No generated code is kept in the repository: every build (`pip install ./python`,
`pip wheel ./python`) runs grpcio-tools' protoc on ../proto/kvstrata/v1/kvstrata.proto,
so the stubs always match the daemon's schema. The generated modules import
`kvstrata.v1.kvstrata_pb2`, which is this package's `kvstrata.v1` subpackage.
"""

import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "proto")
PROTO_FILE = os.path.join("kvstrata", "v1", "kvstrata.proto")
GENERATED = ("kvstrata_pb2.py", "kvstrata_pb2.pyi", "kvstrata_pb2_grpc.py")


def generate(out_dir: str) -> None:
    """Runs protoc on proto/kvstrata/v1/kvstrata.proto into out_dir/kvstrata/v1/."""
    from grpc_tools import protoc  # build requirement (pyproject.toml)
    import grpc_tools

    src = os.path.join(PROTO_ROOT, PROTO_FILE)
    if not os.path.isfile(src):
        raise SystemExit(
            f"kvstrata: {src} not found; build the package from a kvstrata checkout "
            "(pip install ./python from the repository root)"
        )
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            src,
        ])
        if rc != 0:
            raise SystemExit(f"kvstrata: protoc failed on {src} (exit {rc})")
        dest = os.path.join(out_dir, "kvstrata", "v1")
        os.makedirs(dest, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(os.path.join(tmp, "kvstrata", "v1", name), os.path.join(dest, name))


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(self.build_lib)


setup(cmdclass={"build_py": BuildPyWithStubs})
