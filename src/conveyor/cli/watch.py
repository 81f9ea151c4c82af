"""`conveyor watch`: follow one run, or a project's runs, live until it ends (or Ctrl-C).

`watch RUN_ID` streams WatchWorkflowRun: the snapshot, then each event applied to the view
(conveyor.cli.live; the step list is re-fetched only when an event does not say enough). On a
terminal it draws with rich's Live; with stdout elsewhere it prints one plain line per change;
`--json` prints each stream message (snapshot, events, a final error) as one NDJSON line. It
exits 0 when the run completed and 1 when it ended otherwise. A connection lost mid-stream
(UNAVAILABLE, or a stream that ends before the run did) is resumed on a new channel with
`after_seq` = the last seq seen, retrying with a short backoff for up to RESUME_WITHIN seconds.

`watch --project P [--workflow W] [--status S]` lists the project's newest runs, then applies
WatchProjectRuns' changes; a server that answers UNIMPLEMENTED is polled with ListWorkflowRuns
every POLL_SECONDS instead (said once on stderr). It runs until Ctrl-C (exit 130). A lost
connection is resumed the same way, re-listing the runs so nothing changed meanwhile is missed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from conveyor.cli.errors import FAILURE, CliError
from conveyor.cli.runs import RUN_STATUSES

if TYPE_CHECKING:
    from conveyor.cli.client import Client
    from conveyor.cli.live import ProjectView, RunView

# How long a lost connection is retried before the command gives up.
RESUME_WITHIN = 30.0
# Backoff between attempts to resume: doubles from the first to the last.
FIRST_RETRY, LAST_RETRY = 0.1, 1.0
POLL_SECONDS = 1.0
# Runs a project view lists first (and each poll), newest first.
PROJECT_LIMIT = 50
# StreamError codes (gRPC's) after which the watch resumes instead of failing: the server went
# away, or this watcher fell behind and was told to resume.
_RESUMABLE = frozenset({14, 8, 10})  # UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED


@click.command()
@click.argument("run_id", metavar="[RUN_ID]", required=False)
@click.option("-p", "--project", default=None, help="Watch this project's runs instead of one run.")
@click.option("-w", "--workflow", multiple=True, help="With --project: runs of this workflow (id or name).")
@click.option("-s", "--status", multiple=True, type=click.Choice(RUN_STATUSES),
              help="With --project: runs in this status; repeatable.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each stream message as one JSON line (NDJSON) instead of drawing.")
@click.pass_context
def watch(ctx: click.Context, run_id: str | None, project: str | None, workflow: tuple[str, ...],
          status: tuple[str, ...], as_json: bool) -> None:
    """Follow RUN_ID live until it ends: its status and each step's status, attempt and duration
    in DAG order. Exits 0 when the run completed, 1 when it failed, timed out or was canceled.

    With --project instead, a live table of the project's runs (until Ctrl-C).

    On a terminal the view updates in place; otherwise one line is printed per change. A lost
    connection is resumed where it stopped (for up to 30 s).
    """
    from conveyor.cli.client import connect

    if (run_id is None) == (project is None):
        raise click.UsageError("name a RUN_ID or --project, not both")
    if run_id is not None and (workflow or status):
        raise click.UsageError("--workflow and --status filter a --project watch")
    mode = "json" if as_json else "live" if sys.stdout.isatty() else "lines"
    with connect(ctx) as api:
        if run_id is not None:
            if not _watch_run(api, run_id, mode):
                ctx.exit(FAILURE)
        else:
            _watch_project(api, project or "", workflow, status, mode)


class _Dropped(Exception):
    """The stream was lost before its end; resume it."""


def _unavailable(api: Client, error: BaseException) -> bool:
    """Whether a failure is a lost connection (worth resuming) rather than an answer."""
    import grpc

    if isinstance(error, _Dropped):
        return True
    if isinstance(error, grpc.RpcError):
        return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
    return isinstance(error, CliError) and error.reason == "UNAVAILABLE"


class _Resumer:
    """Backoff and give-up time of one lost connection at a time."""

    def __init__(self, api: Client, notice: Callable[[str], None]) -> None:
        self.api = api
        self.notice = notice
        self.lost_at: float | None = None
        self.delay = FIRST_RETRY

    def lost(self, error: BaseException) -> None:
        """Wait, then reconnect; a CliError once the connection has been lost for too long."""
        now = time.monotonic()
        if self.lost_at is None:
            self.lost_at = now
            self.delay = FIRST_RETRY
            self.notice(f"connection to conveyor at {self.api.address} lost; resuming...")
        elif now - self.lost_at > RESUME_WITHIN:
            raise CliError(f"lost the connection to conveyor at {self.api.address} and could not resume "
                           f"within {RESUME_WITHIN:.0f} s", FAILURE, "UNAVAILABLE") from None
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, LAST_RETRY)
        self.api.reconnect()

    def alive(self) -> None:
        """A message arrived: the connection is back."""
        if self.lost_at is not None:
            self.lost_at = None
            self.notice("")


def _emit_json(message: Any) -> None:
    from conveyor.cli.output import to_dict

    click.echo(json.dumps(to_dict(message), separators=(",", ":")))


@contextmanager
def _display(mode: str, renderable: Callable[[], Any]) -> Iterator[Callable[[], None]]:
    """In live mode, a rich Live drawing `renderable` (its final frame stays on the screen);
    yields a function that redraws at once."""
    if mode != "live":
        yield lambda: None
        return
    from rich.console import Console
    from rich.live import Live

    with Live(get_renderable=renderable, console=Console(), refresh_per_second=4) as live:
        yield live.refresh


# -- one run ---------------------------------------------------------------------------------------


def _watch_run(api: Client, run_id: str, mode: str) -> bool:
    """Follow a run until it ends; whether it completed."""
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    request = runs_pb.WatchWorkflowRunRequest(workflow_run_id=run_id)
    try:
        stream = iter(api.runs.WatchWorkflowRun(request, metadata=api.metadata))
        first = next(stream)
    except StopIteration:
        raise CliError(f"the watch of run {run_id} ended before it began", FAILURE) from None
    except Exception as e:
        import grpc

        if isinstance(e, grpc.RpcError):
            raise api.failure(e) from None
        raise
    if first.WhichOneof("message") != "snapshot":
        _raise_stream_error(first, run_id)
    view = _new_view(api, first.snapshot)
    state = _RunWatch(api, view, mode)
    with _display(mode, view.renderable) as redraw:
        state.redraw = redraw
        state.on_message(first)
        state.follow(stream)
    return view.completed


def _new_view(api: Client, snapshot: Any) -> RunView:
    from conveyor.cli.live import RunView, definition_deps
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    try:
        # The current definition's `depends_on` orders the steps; a step it no longer has (the
        # run is of an older version) keeps its place in the run's own list.
        workflow = api.call(api.workflows.GetWorkflow,
                            wf_pb.GetWorkflowRequest(workflow_id=snapshot.run.workflow_id))
        deps = definition_deps(workflow)
    except CliError:
        deps = {}
    return RunView(snapshot, deps)


def _raise_stream_error(message: Any, run_id: str) -> None:
    if message.WhichOneof("message") == "error":
        import grpc

        from conveyor.cli.client import EXIT_CODES

        codes = {c.value[0]: c for c in grpc.StatusCode}
        code = EXIT_CODES.get(codes.get(message.error.code, grpc.StatusCode.UNKNOWN), FAILURE)
        raise CliError(message.error.message, code, message.error.reason)
    raise CliError(f"the watch of run {run_id} began without a snapshot", FAILURE)


class _RunWatch:
    """One run's watch: applies each message to the view, prints it as the mode says, and
    resumes the stream when the connection is lost."""

    def __init__(self, api: Client, view: RunView, mode: str) -> None:
        self.api = api
        self.view = view
        self.mode = mode
        self.redraw: Callable[[], None] = lambda: None
        self.resumer = _Resumer(api, self._notice)

    def _notice(self, text: str) -> None:
        if self.mode == "live":
            self.view.notice = text
            self.redraw()
        elif text:
            click.echo(text, err=True)
        else:
            click.echo(f"resumed after seq {self.view.seq}", err=True)

    def follow(self, stream: Iterator[Any]) -> None:
        """Read the stream to the end of the run, resuming it as often as needed."""
        from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

        while True:
            try:
                for message in stream:
                    self.on_message(message)
                if self.view.finished:
                    return
                raise _Dropped  # ended before the run did: a server shutting down, a slow watcher
            except Exception as e:
                if not _unavailable(self.api, e):
                    import grpc

                    if isinstance(e, grpc.RpcError):
                        raise self.api.failure(e) from None
                    raise
                self.resumer.lost(e)
            request = runs_pb.WatchWorkflowRunRequest(workflow_run_id=self.view.run.id,
                                                      after_seq=self.view.seq)
            stream = iter(self.api.runs.WatchWorkflowRun(request, metadata=self.api.metadata))

    def on_message(self, message: Any) -> None:
        kind = message.WhichOneof("message")
        if kind == "heartbeat":
            self.resumer.alive()
            return
        if kind == "error":
            if self.mode == "json":
                _emit_json(message)
            if message.error.code in _RESUMABLE:
                raise _Dropped
            _raise_stream_error(message, self.view.run.id)
        self.resumer.alive()
        if self.mode == "json":
            _emit_json(message)
        if kind == "snapshot":
            self.view.reset(message.snapshot)
            if self.mode == "lines":
                for line in self.view.snapshot_lines():
                    click.echo(line)
        elif kind == "event":
            if not self.view.apply(message.event):
                self._refetch_steps()
            if self.mode == "lines":
                click.echo(self.view.event_line(message.event))
        self.redraw()

    def _refetch_steps(self) -> None:
        from conveyor.v1 import step_runs_service_pb2 as steps_pb

        request = steps_pb.ListStepRunsRequest(workflow_run_id=self.view.run.id)
        self.view.replace_steps(list(self.api.pages(self.api.steps.ListStepRuns, request)))


# -- a project -------------------------------------------------------------------------------------


def _set_filter(request: Any, name: str, values: list[Any]) -> None:
    """Set a filter field of the request when its message has one (the server may not know it)."""
    field = request.DESCRIPTOR.fields_by_name.get(name)
    if field is None or not values:
        return
    if field.is_repeated:
        getattr(request, name).extend(values)
    elif len(values) == 1:
        setattr(request, name, values[0])


def _watch_project(api: Client, project: str, workflows: tuple[str, ...], statuses: tuple[str, ...],
                   mode: str) -> None:
    """Show a project's runs as they change, until interrupted."""
    from conveyor.cli.live import ProjectView
    from conveyor.cli.runs import _list_request
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    view = ProjectView(project, workflows, statuses)
    listing = _list_request(workflows, statuses, project, (), "", "")
    request = runs_pb.WatchProjectRunsRequest(project_id=project)
    # The workflow filter goes to the server; the status filter stays here: the table must see
    # a run leave the statuses shown (a server filter sends only changes into them).
    _set_filter(request, "workflow_id", list(workflows))
    watch = _ProjectWatch(api, view, mode, listing, request)
    watch.relist()  # a first failure (not found, refused, unreachable) ends the command at once
    height = 24
    if mode == "live":
        from rich.console import Console

        height = Console().height
    with _display(mode, lambda: view.renderable(height)) as redraw:
        watch.redraw = redraw
        watch.run()


class _ProjectWatch:
    def __init__(self, api: Client, view: ProjectView, mode: str, listing: Any, request: Any) -> None:
        self.api = api
        self.view = view
        self.mode = mode
        self.listing = listing
        self.request = request
        self.redraw: Callable[[], None] = lambda: None
        self.resumer = _Resumer(api, self._notice)
        self.polling = False

    def _notice(self, text: str) -> None:
        if self.mode == "live":
            self.view.notice = text
            self.redraw()
        elif text:
            click.echo(text, err=True)

    def relist(self) -> None:
        listed = self.api.pages(self.api.runs.ListWorkflowRuns, self.listing, PROJECT_LIMIT)
        changed = self.view.replace(listed)
        for run in sorted(changed, key=lambda r: r.created_at.ToMicroseconds()):
            self._show(run)
        self.redraw()

    def _show(self, run: Any) -> None:
        if self.mode == "json":
            from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

            _emit_json(runs_pb.WatchProjectRunsResponse(run=run))
        elif self.mode == "lines":
            from conveyor.cli.live import run_line

            click.echo(run_line(run))

    def _remember_cursor(self, message: Any) -> None:
        """Resume after this change, when the server gives changes a cursor (the listing made
        again on every resume covers a server that does not)."""
        cursor = getattr(message, "cursor", "")
        if cursor and "cursor" in self.request.DESCRIPTOR.fields_by_name:
            self.request.cursor = cursor

    def run(self) -> None:
        import grpc

        listed = True
        while True:
            try:
                if not listed:
                    self.relist()
                    self.resumer.alive()
                listed = False
                if self.polling:
                    time.sleep(POLL_SECONDS)
                    continue
                for message in self.api.runs.WatchProjectRuns(self.request, metadata=self.api.metadata):
                    self.resumer.alive()
                    kind = message.WhichOneof("message")
                    if kind == "run":
                        self._remember_cursor(message)
                        if self.view.update(message.run):
                            self._show(message.run)
                            self.redraw()
                    elif kind == "error":
                        if message.error.code in _RESUMABLE:
                            raise _Dropped
                        raise CliError(message.error.message, FAILURE, message.error.reason)
                raise _Dropped
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.polling = True
                    click.echo(f"this server does not stream project runs (WatchProjectRuns: UNIMPLEMENTED); "
                               f"polling ListWorkflowRuns every {POLL_SECONDS:g} s", err=True)
                    continue
                if not _unavailable(self.api, e):
                    raise self.api.failure(e) from None
                self.resumer.lost(e)
            except (CliError, _Dropped) as e:
                if not _unavailable(self.api, e):
                    raise
                self.resumer.lost(e)
