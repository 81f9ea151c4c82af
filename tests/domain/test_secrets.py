"""Secrets in the domain (SPEC §11): names, values, the key's spelling, which secrets a step names,
and redaction of every spelling of a value from what a step gives back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.domain.errors import ConveyorError
from conveyor.domain.limits import Limits
from conveyor.domain.secrets import MASK, Redactor, check_name, check_value, key_bytes, missing
from conveyor.domain.spec import parse_workflow


@pytest.mark.parametrize("name", ["A", "_", "API_TOKEN", "x1", "a" * 64])
def test_identifier_names_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a.b", "a b", "a" * 65, "null", "in", "é"])
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ConveyorError) as refused:
        check_name(name)
    assert refused.value.reason == "INVALID_SECRET_NAME"


@pytest.mark.parametrize("value", ["", "a\x00b", "\ud800", "é" * 40])
def test_bad_values_are_refused_without_being_quoted(value: str) -> None:
    with pytest.raises(ConveyorError) as refused:
        check_value(value, Limits(max_secret_bytes=64))
    assert refused.value.reason == "INVALID_SECRET_VALUE"
    assert not value or value not in refused.value.message


def test_the_key_is_32_bytes_of_url_safe_base64_and_a_bad_one_is_not_quoted() -> None:
    assert len(key_bytes("A" * 43)) == 32
    for bad in ("", "short", "A" * 44 + "AAAA", "not base64 at all!!"):
        with pytest.raises(ValueError) as refused:
            key_bytes(bad)
        assert bad not in str(refused.value) or not bad


def test_a_step_names_its_secrets_and_only_http_and_task_steps_may() -> None:
    spec = parse_workflow({"name": "w", "steps": [
        {"ref": "a", "kind": "http", "config": {"url": "https://x.example/{{ secrets.PATH }}",
                                                 "headers": {"A": "{{ secrets.TOKEN + secrets.TOKEN }}"}}},
        {"ref": "b", "kind": "task", "queue": "q", "config": {"n": "{{ payload.n }}"}}]})
    assert spec.step("a").secrets == {"PATH", "TOKEN"} and spec.step("b").secrets == frozenset()
    assert spec.secret_names == {"PATH", "TOKEN"}
    assert missing({"TOKEN"}, {"TOKEN": None}, "p") is not None
    assert missing({"TOKEN"}, {}, "p") == ("SECRET_NOT_FOUND", "SECRET_NOT_FOUND: secret 'TOKEN' is not set "
                                                               "in project 'p'")
    assert missing({"TOKEN"}, {"TOKEN": "v"}, "p") is None


def test_every_spelling_is_masked_in_strings_and_keys_longest_first() -> None:
    value = 'ab"c\\d e/f'
    redact = Redactor([value, "ab"])
    document = {value: [value, f"x {json.dumps(value)} y", f"url?k={'ab%22c%5Cd%20e%2Ff'}",
                        f"repr {value!r}", 3, None]}
    assert redact(document) == {MASK: [MASK, f'x "{MASK}" y', f"url?k={MASK}", f"repr '{MASK}'", 3, None]}
    assert redact.text("nothing here") == "nothing here"
    assert not Redactor([]) and Redactor([]).text("ab") == "ab"


@given(st.text(min_size=1, max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_no_value_survives_redaction(value: str, before: str, after: str) -> None:
    text = Redactor([value]).text(before + value + after)
    assert value not in text or value in MASK
