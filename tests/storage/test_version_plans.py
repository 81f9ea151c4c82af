"""A workflow's versions are read by index, in list order, on both dialects: one version by
number and a page newest first (with and without a cursor) are ranges of
ux_workflow_versions_wf_version — the plan of the very statement the Repository runs, checked
as tests/storage/test_list_plans.py checks the other lists."""

from __future__ import annotations

import pytest

from conveyor.domain.records import WorkflowRecord
from conveyor.domain.spec import parse_workflow
from conveyor.storage.paging import encode_cursor
from conveyor.storage.store import SqlStore
from tests.storage.test_list_plans import AT, Statements, _assert_indexed, _plan, store  # noqa: F401

INDEX = "ux_workflow_versions_wf_version"
W1 = WorkflowRecord(id="w1", project_id="acme", name="w1", version=3, version_id="w1-v3",
                    spec=parse_workflow({"name": "w1", "steps": [{"ref": "a", "kind": "noop"}]}),
                    created_by="t", created_at=AT, updated_at=AT)


@pytest.mark.parametrize("token", ["", encode_cursor(2)], ids=["first page", "after a cursor"])
async def test_a_page_of_versions_is_an_index_range_newest_first(store: SqlStore, token: str) -> None:  # noqa: F811
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_workflow_versions(W1, 50, token)

    sql, params = await seen.of(page)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, INDEX)


async def test_one_version_is_an_index_lookup(store: SqlStore) -> None:  # noqa: F811
    seen = Statements(store.db)

    async def one() -> None:
        async with store.read() as repo:
            assert await repo.workflow_version(W1, 1) is None

    sql, params = await seen.of(one)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, INDEX, ordered=False)
