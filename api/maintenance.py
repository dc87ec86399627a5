"""Background upkeep of a serving process, run from the app's lifespan.

Every ``ServerState.maintenance_interval_s``:

* ``SessionManager.enforce_policy_async``: paused sessions whose keep TTL expired (or all,
  longest idle first, under device pressure) are offloaded, so a session paused for a client
  tool that never comes back does not stay pinned;
* ``SessionManager.expire_idle``: sessions untouched for ``--session-idle-timeout-s`` are
  evicted, and their python sandboxes (interpreter and directory) closed;
* KV tiers that reported Redis unavailable are pinged, so ``/health`` shows a recovery without
  waiting for traffic (session records and ownership recover on their own threads).

An error in one round is logged and the next round runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from api.state import ServerState

logger = logging.getLogger("tarry.maintenance")


async def maintenance_round(state: ServerState) -> None:
    """One round of upkeep (see the module docstring)."""
    manager = state.sessions
    await manager.enforce_policy_async()
    for session_id in await manager.expire_idle():
        await asyncio.to_thread(state.tools.close_sandbox, session_id)
    await asyncio.to_thread(manager.probe_unhealthy_tiers)


async def maintain(state: ServerState) -> None:
    """Run ``maintenance_round`` forever (until cancelled)."""
    while True:
        await asyncio.sleep(state.maintenance_interval_s)
        try:
            await maintenance_round(state)
        except Exception:
            logger.exception("maintenance round failed")


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Starlette lifespan: the maintenance task runs while the app serves; cancelled at
    shutdown."""
    task = asyncio.create_task(maintain(app.state.tarry), name="tarry-maintenance")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
