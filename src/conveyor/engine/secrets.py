"""Project secrets: setting, listing and deleting them (admins), and loading the values the
steps of an attempt name (the lease machinery, engine/leases.py).

Values are sealed with the server's key (engine/cipher.py) before they reach storage and opened
only to start an attempt or to redact its report; they are never returned by the API. A key of
one project acts only on that project's secrets; another project answers NOT_FOUND, as if absent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from conveyor.domain.errors import ConveyorError, ErrorKind, not_found
from conveyor.domain.limits import Limits
from conveyor.domain.records import Caller, Page
from conveyor.domain.secrets import Secret, check_name, check_value
from conveyor.engine.cipher import Cipher
from conveyor.engine.clock import Clock
from conveyor.engine.ports import Repo, Store
from conveyor.engine.workflows import project_of

# What `load` gives: per project, per name, the value (None: it does not open with this key).
Found = dict[str, dict[str, str | None]]


class Secrets:
    """Use cases on project secrets, and the loader of their values."""

    def __init__(self, store: Store, clock: Clock, cipher: Cipher, limits: Limits) -> None:
        self.store = store
        self.clock = clock
        self.cipher = cipher
        self.limits = limits

    async def put(self, caller: Caller, project_id: str, name: str, value: str) -> Secret:
        """Create or replace a secret (its created_at kept on replace)."""
        project = _project(project_id, caller)
        check_name(name)
        check_value(value, self.limits)
        sealed = self.cipher.seal(project, name, value)
        async with self.store.write() as repo:
            secret = await repo.put_secret(project, name, sealed, self.clock.now(), self.limits.max_secrets)
        if secret is None:
            raise ConveyorError(ErrorKind.RESOURCE_EXHAUSTED, "TOO_MANY_SECRETS",
                                f"project {project!r} already holds {self.limits.max_secrets} secrets; "
                                "delete one first")
        return secret

    async def list(self, caller: Caller, project_id: str, limit: int, token: str) -> Page[Secret]:
        """A page of the project's secrets by name: names and dates."""
        project = _project(project_id, caller)
        async with self.store.read() as repo:
            return await repo.list_secrets(project, limit, token)

    async def delete(self, caller: Caller, project_id: str, name: str) -> None:
        project = _project(project_id, caller)
        async with self.store.write() as repo:
            if not await repo.delete_secret(project, name):
                raise not_found("secret", name)

    async def load(self, repo: Repo, wanted: Mapping[str, Collection[str]]) -> Found:
        """The values of the secrets `wanted` names, per project, within the caller's
        transaction; a name not set is absent. Nothing is read when nothing is wanted."""
        found: Found = {}
        for project, names in wanted.items():
            if names:
                sealed = await repo.sealed_secrets(project, sorted(names))
                found[project] = {name: self.cipher.open(project, name, s) for name, s in sealed.items()}
        return found


def _project(project_id: str, caller: Caller) -> str:
    """The project a secrets call acts on: the request's (a project's key may leave it empty).
    Another project than the key's answers NOT_FOUND, as if it held nothing."""
    project = project_id or caller.project or ""
    if caller.project is not None and project != caller.project:
        raise not_found("project", project)
    return project_of(project, caller)  # its spelling checked (empty: the default project)
