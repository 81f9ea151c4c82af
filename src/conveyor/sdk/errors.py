"""Exceptions a handler raises to steer how its failure is reported (the SDK's side of FailTask).

Any other exception fails the attempt as retryable: the step's retry policy decides what happens.
"""

from __future__ import annotations


class NonRetryableError(Exception):
    """Fail the step now, even when its retry policy has attempts left (FailTask non_retryable)."""


class RetryAfter(Exception):
    """Fail this attempt and ask that the next one start no sooner than `seconds` from now.

    The retry policy still counts the attempt: on the last attempt the step fails.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        if seconds < 0:
            raise ValueError("RetryAfter seconds must be >= 0")
        self.seconds = float(seconds)
        self.message = message or f"retry after {self.seconds:g}s"
        super().__init__(self.message)
