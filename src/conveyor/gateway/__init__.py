"""The REST gateway: renders the Envoy config and proto descriptor, and runs Envoy as a child process.

Envoy's gRPC-JSON transcoder turns the REST contract of SPEC §1 into calls on the gRPC server;
this package owns everything about that process and nothing about the services themselves.
"""
