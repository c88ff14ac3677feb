"""Generated gRPC stubs of `kvstrata.v1` (proto/kvstrata/v1/kvstrata.proto).

`kvstrata_pb2`, `kvstrata_pb2_grpc` and the `.pyi` type stubs are written here by the
package build (setup.py) from the repository's proto/ files; they are not kept in the
repository.
"""
