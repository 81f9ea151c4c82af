"""Pure domain: states and transitions, workflow specs, expressions, retry math, run planning.

No I/O, no clock, no SQLAlchemy/gRPC/protobuf imports (enforced by import-linter).
"""
