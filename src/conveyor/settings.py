"""The one settings object: read once at start (flags, then environment), passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.domain.egress import EgressPolicy
from conveyor.domain.limits import Limits
from conveyor.domain.secrets import key_bytes

DEFAULT_DATA_DIR = Path(".conveyor")


def default_db_url(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """The embedded default: a SQLite file under the data directory."""
    return f"sqlite+aiosqlite:///{data_dir / 'conveyor.db'}"


# The dashboard's files (README "Dashboard"): the checkout's top-level ui/ folder. The project
# runs from its checkout through an editable install (`pip install -e`), so this file sits at
# <checkout>/src/conveyor/settings.py; CONVEYOR_UI_DIR names another folder (empty: none).
DEFAULT_UI_DIR = Path(__file__).resolve().parents[2] / "ui"


# The outage bounds' environment variables: (field, variable, type).
_OUTAGE_ENV: tuple[tuple[str, str, type], ...] = (
    ("db_busy_timeout_ms", "CONVEYOR_DB_BUSY_TIMEOUT_MS", int),
    ("db_pool_timeout_seconds", "CONVEYOR_DB_POOL_TIMEOUT_SECONDS", float),
    ("db_connect_timeout_seconds", "CONVEYOR_DB_CONNECT_TIMEOUT_SECONDS", float),
    ("db_command_timeout_seconds", "CONVEYOR_DB_COMMAND_TIMEOUT_SECONDS", float),
    ("trigger_queue_limit", "CONVEYOR_TRIGGER_QUEUE_LIMIT", int),
    ("report_queue_limit", "CONVEYOR_REPORT_QUEUE_LIMIT", int),
    ("max_in_flight", "CONVEYOR_MAX_IN_FLIGHT", int),
)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know to start; no module reads the environment itself."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Not in the repr (nor is any secret below): a password in the URL must not reach a log line.
    db_url: str = field(default_factory=default_db_url, repr=False)
    data_dir: Path = DEFAULT_DATA_DIR
    envoy_enabled: bool = True
    envoy_admin_port: int = 0
    # Envoy that exits while the server runs is restarted (gateway/supervisor.py) after a wait
    # that starts at the first and doubles up to the max; one that stayed up `reset` seconds
    # starts over at the first (CONVEYOR_ENVOY_RESTART_FIRST_SECONDS, _MAX_, _RESET_).
    envoy_restart_first_seconds: float = 0.1
    envoy_restart_max_seconds: float = 10.0
    envoy_restart_reset_seconds: float = 30.0
    # REST request bodies above this size are answered 413 by Envoy; gRPC messages above it
    # RESOURCE_EXHAUSTED by grpc.
    max_request_bytes: int = 4 * 1024 * 1024
    # Engine: how many runs one engine pass advances in one transaction.
    engine_batch_size: int = 256
    # Engine: longest wait between sweeps when nothing signals new work.
    engine_idle_seconds: float = 1.0
    # Trigger group commit: most requests written in one transaction.
    trigger_batch_size: int = 256
    # -- database outages (storage/db.py, storage/store.py; README "Database outages") --
    # Each bounds how long a request can wait on a database that is gone before it is answered
    # UNAVAILABLE DATABASE_UNAVAILABLE, so an outage is answered in about a second, not minutes.
    # SQLite: how long a writer waits for another process's lock (busy_timeout).
    db_busy_timeout_ms: int = 1000
    # How long a unit of work waits for a pooled connection (all of them busy or hung).
    db_pool_timeout_seconds: float = 2.0
    # PostgreSQL: opening a connection (a refused one fails at once; a black-holed one waits this).
    db_connect_timeout_seconds: float = 1.0
    # PostgreSQL: one statement's answer (asyncpg command_timeout). The engine's statements are
    # indexed and bounded (milliseconds); one that takes this long means the server or the
    # network is gone, and its connection is dropped.
    db_command_timeout_seconds: float = 2.0
    # Requests waiting for the trigger and report group commits; beyond, RESOURCE_EXHAUSTED
    # QUEUE_FULL with a retry-after (a few batches' worth: during an outage each batch waits
    # a timeout, so a longer queue only makes its last requests wait longer for the same answer).
    trigger_queue_limit: int = 2048
    report_queue_limit: int = 2048
    # Unary RPCs handled at once; beyond, RESOURCE_EXHAUSTED SERVER_BUSY with a retry-after.
    # Streams (watches, worker streams) are long-lived and not counted. 0: no bound.
    max_in_flight: int = 1024
    # Idempotency keys are kept this long (SPEC §3: 24 h).
    idempotency_ttl_seconds: int = 24 * 3600
    # -- retention (engine/retention.py; README "Retention and backup") --
    # Days a finished run is kept when its workflow sets no retention_days (CONVEYOR_RETENTION_DAYS).
    retention_days: int = 30
    # Days the audit log is kept: longer than runs, it answers who did what (CONVEYOR_AUDIT_RETENTION_DAYS).
    audit_retention_days: int = 365
    # Days a published event is kept, and with it the answer a repeated publish of its id gets
    # (SPEC §9; CONVEYOR_EVENT_RETENTION_DAYS).
    event_retention_days: int = 7
    # Runs (with their families) deleted per transaction, so the sweep never holds the writer
    # long (CONVEYOR_RETENTION_BATCH_SIZE).
    retention_batch_size: int = 500
    # Child workflow nesting cap (SPEC §3).
    max_nesting_depth: int = 10
    # -- http steps (engine/http_steps.py, engine/egress.py) --
    # Requests the engine has in flight at once.
    http_max_concurrency: int = 64
    # A response body larger than this fails the attempt, not retried (a retry gets it again).
    http_max_body_bytes: int = 256 * 1024
    # An attempt's timeout when neither its config nor its step sets one.
    http_default_timeout_seconds: float = 30.0
    # The special-purpose destinations (loopback, private, link-local, CGNAT...: domain/egress.py)
    # http steps and notifications may reach after all (CONVEYOR_HTTP_ALLOW, comma-separated):
    # addresses or networks ("10.0.0.0/8"), host names ("localhost", "*.internal.example"),
    # either on one port ("127.0.0.1:9000"). Public addresses need no entry; empty: none.
    http_allow: tuple[str, ...] = ()
    # -- access (api/access.py, engine/keys.py) --
    # False only behind something else that authenticates (CONVEYOR_AUTH=disabled): every call
    # is then an admin of every project.
    auth_enabled: bool = True
    # Requests per second a key may make unless the key sets its own limit; 0: no limit.
    rate_limit: int = 3000
    # How long a token's key is remembered: a key revoked on another replica stops working
    # within this time.
    key_cache_seconds: float = 5.0
    # Calls without a valid key (none, malformed, unknown) a client address may make per second,
    # and webhook deliveries per second from one address (api/access.py; README "Anonymous
    # traffic"); beyond, RESOURCE_EXHAUSTED RATE_LIMITED. 0: no limit.
    anonymous_rate_limit: int = 10
    webhook_rate_limit: int = 50
    # What Envoy adds to every request it forwards (x-conveyor-gateway) so the gRPC server knows
    # the x-forwarded-for beside it is Envoy's: generated at each start (app.py), never configured.
    gateway_secret: str = field(default="", repr=False)
    # Where REST clients reach this server (webhook URLs are shown under it); default
    # http://<http_host>:<http_port>.
    public_url: str = ""
    # -- outbound notifications (engine/notify.py; README "Notifications") --
    # The HMAC-SHA256 key deliveries are signed with (CONVEYOR_NOTIFY_SECRET); empty: the server
    # keeps a generated one in <data_dir>/notify.secret. Replicas must share it.
    notify_secret: str = field(default="", repr=False)
    # -- project secrets (engine/secrets.py, engine/cipher.py; README "Secrets") --
    # The key secrets are sealed with: 32 random bytes in URL-safe base64 (CONVEYOR_SECRET_KEY);
    # empty: the server keeps a generated one in <data_dir>/secret.key. Replicas must share it.
    secret_key: str = field(default="", repr=False)
    # Attempts of one delivery before it is given up, and the backoff between them (doubling).
    notify_max_attempts: int = 10
    notify_initial_backoff_seconds: float = 2.0
    notify_max_backoff_seconds: float = 600.0
    # One attempt's time limit (connect, send, response).
    notify_timeout_seconds: float = 10.0
    # Deliveries in flight at once, and to one URL (a slow endpoint delays only its own).
    notify_max_concurrency: int = 16
    notify_per_url_concurrency: int = 4
    # -- operators (health.py, engine/metrics.py, logs.py) --
    # /metrics, /ready and /healthz over plain HTTP (0 picks a free port, printed at start).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    # "text" lines, or "json": one object per line (CONVEYOR_LOG_FORMAT).
    log_format: str = "text"
    # The dashboard's folder, served by Envoy under /ui/ (gateway/ui.py); None, or a folder
    # that does not exist: no /ui/ routes.
    ui_dir: Path | None = DEFAULT_UI_DIR
    # Sizes, lengths, counts and expression cost bounds (domain/limits.py has the defaults).
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then CONVEYOR_* environment variables, then explicit overrides (flags)."""
        env: dict[str, object] = {}
        if "CONVEYOR_DB_URL" in os.environ:
            env["db_url"] = os.environ["CONVEYOR_DB_URL"]
        if "CONVEYOR_GRPC_PORT" in os.environ:
            env["grpc_port"] = int(os.environ["CONVEYOR_GRPC_PORT"])
        if "CONVEYOR_HTTP_PORT" in os.environ:
            env["http_port"] = int(os.environ["CONVEYOR_HTTP_PORT"])
        for old in ("CONVEYOR_HTTP_ALLOWED_HOSTS", "CONVEYOR_HTTP_DENIED_NETWORKS"):
            if old in os.environ:
                # Not read as the new setting: the old one restricted egress, the new one widens
                # it; an operator must say which destinations to allow (README "Egress").
                raise ValueError(f"{old} is no longer read: special-purpose destinations are denied "
                                 f"unless CONVEYOR_HTTP_ALLOW allows them; unset it")
        if "CONVEYOR_HTTP_ALLOW" in os.environ:
            allow = tuple(v.strip() for v in os.environ["CONVEYOR_HTTP_ALLOW"].split(",") if v.strip())
            EgressPolicy.parse(allow)  # a malformed entry stops the start, named
            env["http_allow"] = allow
        if "CONVEYOR_HTTP_MAX_CONCURRENCY" in os.environ:
            env["http_max_concurrency"] = int(os.environ["CONVEYOR_HTTP_MAX_CONCURRENCY"])
        for name in ("envoy_restart_first_seconds", "envoy_restart_max_seconds",
                     "envoy_restart_reset_seconds"):
            if (key := f"CONVEYOR_{name.upper()}") in os.environ:
                env[name] = float(os.environ[key])
        if "CONVEYOR_AUTH" in os.environ:
            value = os.environ["CONVEYOR_AUTH"].strip().lower()
            if value not in ("enabled", "disabled"):
                raise ValueError("CONVEYOR_AUTH must be 'enabled' or 'disabled'")
            env["auth_enabled"] = value == "enabled"
        for name in ("rate_limit", "anonymous_rate_limit", "webhook_rate_limit"):
            if (key := f"CONVEYOR_{name.upper()}") in os.environ:
                env[name] = int(os.environ[key])
        if "CONVEYOR_PUBLIC_URL" in os.environ:
            env["public_url"] = os.environ["CONVEYOR_PUBLIC_URL"].rstrip("/")
        if "CONVEYOR_SECRET_KEY" in os.environ:
            key_bytes(os.environ["CONVEYOR_SECRET_KEY"])  # refused at start, not at first use
            env["secret_key"] = os.environ["CONVEYOR_SECRET_KEY"]
        if "CONVEYOR_NOTIFY_SECRET" in os.environ:
            env["notify_secret"] = os.environ["CONVEYOR_NOTIFY_SECRET"]
        if "CONVEYOR_METRICS_PORT" in os.environ:
            env["metrics_port"] = int(os.environ["CONVEYOR_METRICS_PORT"])
        if "CONVEYOR_LOG_FORMAT" in os.environ:
            env["log_format"] = os.environ["CONVEYOR_LOG_FORMAT"].strip().lower()
        for name, key, kind in _OUTAGE_ENV:
            if key in os.environ:
                env[name] = kind(os.environ[key])
        for name in ("retention_days", "audit_retention_days", "event_retention_days",
                     "retention_batch_size"):
            if (key := f"CONVEYOR_{name.upper()}") in os.environ:
                env[name] = int(os.environ[key])
        if "CONVEYOR_DATA_DIR" in os.environ:
            env["data_dir"] = Path(os.environ["CONVEYOR_DATA_DIR"])
        if "CONVEYOR_UI_DIR" in os.environ:
            ui_dir = os.environ["CONVEYOR_UI_DIR"].strip()
            env["ui_dir"] = Path(ui_dir) if ui_dir else None
        env.update({k: v for k, v in overrides.items() if v is not None})
        if "db_url" not in env and "data_dir" in env:
            env["db_url"] = default_db_url(Path(str(env["data_dir"])))
        return cls(**env)  # type: ignore[arg-type]

    @property
    def rest_base_url(self) -> str:
        """Where REST clients reach this server."""
        return self.public_url or f"http://{self.http_host}:{self.http_port}"

    @property
    def notify_secret_path(self) -> Path:
        """Where the server keeps its generated notification signing secret (mode 0600)."""
        return self.data_dir / "notify.secret"

    @property
    def secret_key_path(self) -> Path:
        """Where the server keeps its generated secret key (mode 0600)."""
        return self.data_dir / "secret.key"

    @property
    def admin_token_path(self) -> Path:
        """Where the first start writes the admin key's token (mode 0600)."""
        return self.data_dir / "admin.token"

