"""Conveyor: a durable workflow-run engine served over gRPC, with REST through Envoy."""
