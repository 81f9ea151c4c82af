"""Background loops log a database outage as one line per pass, and anything else with its
traceback (an outage meets every pass of every loop until the database is back)."""

from __future__ import annotations

import logging

import pytest

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.engine.background import log_loop_failure

log = logging.getLogger("tests.background")


def test_an_outage_is_one_line_and_a_bug_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    outage = ConveyorError(ErrorKind.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database is unavailable")
    with caplog.at_level(logging.WARNING, logger="tests.background"):
        log_loop_failure(log, "claiming failed", outage)
        try:
            raise KeyError("bug")
        except KeyError as e:
            log_loop_failure(log, "claiming failed", e)

    quiet, loud = caplog.records
    assert quiet.levelno == logging.WARNING and quiet.exc_info is None
    assert quiet.getMessage() == "claiming failed: DATABASE_UNAVAILABLE: the database is unavailable"
    assert loud.levelno == logging.ERROR and loud.exc_info is not None and loud.exc_info[0] is KeyError
