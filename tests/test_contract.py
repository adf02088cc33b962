"""Each of our scripts works beside peers that know only the original contract."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fakes import PlainAgent, PlainStorage, plain_supervisor
from helpers import WAIT_TIMEOUT_S, Process, Services, write_config


def test_our_agent_and_storage_with_a_plain_supervisor(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    storage = services.service(config, "storage")
    agent = services.service(config, "agent-3")

    async def supervise() -> None:
        supervisor = asyncio.ensure_future(plain_supervisor(config, "supervisor-2", confidence=0.5))
        heard = asyncio.get_running_loop().run_in_executor(
            None, agent.wait_for, r"^Remainder: \d+$", WAIT_TIMEOUT_S, 0, 10
        )
        try:
            done, _ = await asyncio.wait([supervisor, heard], return_when=asyncio.FIRST_COMPLETED)
            assert supervisor not in done, supervisor.exception()
            await heard
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)

    asyncio.run(supervise())
    storage.wait_for(r"^Storage: \d+/500 \(\d+ remaining\)$", count=10)


def test_our_supervisor_with_a_plain_agent_and_storage(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    values = [0.9, 0.1, 0.8, 0.7, 0.2]

    async def scenario() -> tuple[Process, int, list[int]]:
        async with PlainStorage(config, "storage", max_storage=500) as storage, PlainAgent(config, "agent-3") as agent:
            # Started inside: it must find storage and the agent, which have no /residual.
            supervisor = services.service(config, "supervisor-2")
            await asyncio.wait_for(agent.publish(values), WAIT_TIMEOUT_S)
            for _ in range(int(WAIT_TIMEOUT_S / 0.1)):
                if any(residual.value == 497 for _, residual in agent.residuals):
                    break
                await asyncio.sleep(0.1)  # readiness-free: polls what the agent heard, bounded by WAIT_TIMEOUT_S
            return supervisor, storage.count, [residual.value for _, residual in agent.residuals]

    supervisor, stored, residuals = asyncio.run(scenario())
    supervisor.wait_for(r"^Residual: value: 497$")
    assert stored == 3
    # The newest residual reaches the agent; an older one may have been replaced by it
    # while the agent answered the call before (one call to an agent at a time).
    assert 497 in residuals, supervisor.output
    assert set(residuals) <= {499, 498, 497}, residuals
