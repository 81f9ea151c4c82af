"""The descriptor set handed to Envoy: complete, ordered, with the HTTP bindings intact."""

from __future__ import annotations

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from conveyor.gateway.descriptor import build_descriptor_set
from conveyor.v1 import workflow_runs_service_pb2


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(build_descriptor_set())


def test_contains_the_four_services_and_the_error_protos() -> None:
    files = _descriptor_set().file
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert {
        "conveyor.v1.WorkflowsService",
        "conveyor.v1.WorkflowRunsService",
        "conveyor.v1.StepRunsService",
        "conveyor.v1.WorkersService",
    } <= services
    names = {f.name for f in files}
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= names


def test_every_workflow_runs_method_keeps_its_http_rule() -> None:
    (file,) = [f for f in _descriptor_set().file if f.name == "conveyor/v1/workflow_runs_service.proto"]
    (service,) = file.service
    expected = workflow_runs_service_pb2.DESCRIPTOR.services_by_name["WorkflowRunsService"].methods
    assert [m.name for m in service.method] == [m.name for m in expected]
    for method in service.method:
        rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]
        assert rule.WhichOneof("pattern") is not None, method.name
    get = next(m for m in service.method if m.name == "GetWorkflowRun")
    assert get.options.Extensions[annotations_pb2.http].get == "/v1/workflow-runs/{workflow_run_id}"


def test_files_come_once_and_after_their_dependencies() -> None:
    files = _descriptor_set().file
    names = [f.name for f in files]
    assert len(names) == len(set(names))
    position = {name: i for i, name in enumerate(names)}
    for file in files:
        for dependency in file.dependency:
            assert dependency in position, f"{file.name} imports {dependency}, missing from the set"
            assert position[dependency] < position[file.name], f"{dependency} after {file.name}"
    transitive = ("google/api/annotations.proto", "google/api/http.proto", "google/protobuf/descriptor.proto")
    assert set(transitive) <= position.keys()



def test_strict_bodies_are_bound_raw_and_httpbody_is_in_the_set() -> None:
    # Create/Update/Trigger take their REST body as a google.api.HttpBody field (`body`), which
    # the server parses strictly (api/bodies.py); Envoy needs httpbody.proto to know the type.
    files = _descriptor_set().file
    assert "google/api/httpbody.proto" in [f.name for f in files]
    bodies = {}
    for file in files:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                if rule.body:
                    bodies[method.name] = rule.body
    assert bodies["CreateWorkflow"] == bodies["UpdateWorkflow"] == bodies["TriggerWorkflowRun"] == "body"
    assert bodies["ApproveStep"] == "*"
