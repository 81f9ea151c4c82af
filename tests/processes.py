"""Child processes the tests start: what the SDK and the crash tests share about a worker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerProc:
    """A `conveyor worker` child process and the file its output goes to."""

    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def wait_exit(self, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.proc.wait()
