"""Where a client command finds its server and token, and `conveyor login`, which saves them.

Precedence, first found wins:
  address: --address, CONVEYOR_ADDRESS, the config file, 127.0.0.1:50051;
  token:   --token, CONVEYOR_TOKEN, the config file, ./.conveyor/admin.token (the admin key a
           server writes there on its first start, so `make run` needs no setup).
The config file is $XDG_CONFIG_HOME/conveyor/config.json (~/.config/... by default), written
with mode 0600 since it holds a credential. A token holding anything but visible ASCII (a line
break, a NUL, a space) cannot travel in a header: it is a usage error naming where it came from,
before any call is made (and never quoted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from conveyor.cli.errors import USAGE, CliError

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Relative to the current directory, as `make run` (and `conveyor serve` by default) writes it.
ADMIN_TOKEN_FILE = Path(".conveyor") / "admin.token"


def config_path() -> Path:
    """$XDG_CONFIG_HOME/conveyor/config.json, or ~/.config/conveyor/config.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "conveyor" / "config.json"


def load_config() -> dict[str, Any]:
    """The saved config; {} when there is none. A damaged file is a usage error, not a crash."""
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}", USAGE) from e
    if not isinstance(data, dict):
        raise CliError(f"{path} is not a JSON object", USAGE)
    return data


@dataclass
class Target:
    """The root options a client command resolves into an address and a token."""

    address_flag: str | None = None
    token_flag: str | None = None

    def address(self) -> str:
        if self.address_flag:
            return self.address_flag
        return str(load_config().get("address") or DEFAULT_ADDRESS)

    def token(self) -> str | None:
        if self.token_flag:
            return _checked(self.token_flag, "--token (or CONVEYOR_TOKEN)")
        saved = load_config().get("token")
        if saved:
            return _checked(str(saved), str(config_path()))
        try:
            token = ADMIN_TOKEN_FILE.read_text().strip()
        except OSError:
            return None
        return _checked(token, str(ADMIN_TOKEN_FILE)) if token else None


def _checked(token: str, source: str) -> str:
    from conveyor.domain.access import well_formed_token

    if not well_formed_token(token):
        raise CliError(f"the token from {source} holds characters no API key has (only printable "
                       f"ASCII, no spaces, line breaks or NUL)", USAGE, "MALFORMED_TOKEN")
    return token


@click.command(help="Save the server address and token for later commands (in "
                    "$XDG_CONFIG_HOME/conveyor/config.json, mode 0600). Without --token, asks for it.")
@click.option("--address", metavar="HOST:PORT", help="gRPC address of the server")
@click.option("--token", metavar="TOKEN", help="API key")
def login(address: str | None, token: str | None) -> None:
    token_given = token is not None
    if address is None and token is None:
        token = click.prompt("token", hide_input=True, err=True).strip()
    config = load_config()
    if address is not None:
        config["address"] = address
    if token is not None:
        config["token"] = _checked(token, "--token" if token_given else "the prompt")
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before anything is written to it: the token is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    click.echo(f"saved {', '.join(k for k in ('address', 'token') if k in config)} to {path}")
