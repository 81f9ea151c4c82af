"""The proto descriptor Envoy's gRPC-JSON transcoder reads, built from the imported stubs.

The set is assembled at runtime from the generated ``conveyor.v1`` modules (which carry their
``google.api.http`` bindings in their serialized descriptors), plus ``google/rpc/status.proto`` and
``google/rpc/error_details.proto`` so Envoy can print the ``details`` of converted gRPC errors.
Building it from what the server itself imports means no protoc at runtime and no descriptor
file that can go stale against the stubs.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2

from conveyor.v1 import (
    audit_service_pb2,
    events_service_pb2,
    keys_service_pb2,
    secrets_service_pb2,
    step_runs_service_pb2,
    webhooks_service_pb2,
    workers_service_pb2,
    workflow_runs_service_pb2,
    workflows_service_pb2,
)

# The roots of the set; every transitive import is added on the way.
ROOT_FILES: tuple[FileDescriptor, ...] = (
    workflows_service_pb2.DESCRIPTOR,
    workflow_runs_service_pb2.DESCRIPTOR,
    step_runs_service_pb2.DESCRIPTOR,
    workers_service_pb2.DESCRIPTOR,
    keys_service_pb2.DESCRIPTOR,
    audit_service_pb2.DESCRIPTOR,
    webhooks_service_pb2.DESCRIPTOR,
    secrets_service_pb2.DESCRIPTOR,
    events_service_pb2.DESCRIPTOR,
    status_pb2.DESCRIPTOR,
    error_details_pb2.DESCRIPTOR,
)


def _in_dependency_order(roots: Iterable[FileDescriptor]) -> list[FileDescriptor]:
    """Each file once, every file after all the files it imports (depth-first post-order)."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for root in roots:
        visit(root)
    return ordered


def build_descriptor_set() -> bytes:
    """A serialized ``google.protobuf.FileDescriptorSet`` of the Conveyor protos and their imports."""
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    for file in _in_dependency_order(ROOT_FILES):
        # serialized_pb is the file exactly as protoc produced it: custom options such as
        # google.api.http survive byte for byte, whether or not their extension is loaded.
        descriptor_set.file.add().MergeFromString(file.serialized_pb)
    return descriptor_set.SerializeToString()
