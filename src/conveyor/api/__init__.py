"""The gRPC API: servicers, conversion between protos and records, error mapping."""
