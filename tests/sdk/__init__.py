"""Tests of the worker SDK against a real server and real worker processes."""
