"""Coalescing of concurrent identical calls."""

from __future__ import annotations

import asyncio

import pytest

from proxy.singleflight import SingleFlight

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_concurrent_calls_with_one_key_run_once_and_share_the_result() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    waiters = [asyncio.create_task(flights.run("k", fetch)) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*waiters) == [42] * 5
    assert calls == 1
    assert await flights.run("k", fetch) == 42 and calls == 2  # a later call runs again


async def test_an_error_reaches_every_waiter_and_is_not_remembered() -> None:
    flights: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def failing() -> int:
        await gate.wait()
        raise LookupError("upstream said no")

    waiters = [asyncio.create_task(flights.run("k", failing)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)

    async def working() -> int:
        return 7

    assert await flights.run("k", working) == 7
