"""Runnable examples; `hello_worker` is the one the README walks through."""
