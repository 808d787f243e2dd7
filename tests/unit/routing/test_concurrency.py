"""Sync engine calls from asyncio: one thread and one context per request."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator

import pytest

from d2l_integrations.routing.concurrency import iterate_in_thread, run_in_thread

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="caller")


async def test_iterator_runs_in_one_thread_and_its_context_does_not_leak() -> None:
    def numbers() -> Iterator[tuple[int, int]]:
        MARK.set("worker")
        for i in range(5):
            yield i, threading.get_ident()

    items = [item async for item in iterate_in_thread(numbers)]
    assert [i for i, _ in items] == list(range(5))
    assert len({thread for _, thread in items}) == 1 and items[0][1] != threading.get_ident()
    assert MARK.get() == "caller"


async def test_errors_reach_the_consumer_and_early_stop_ends_the_worker() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        [item async for item in iterate_in_thread(failing)]

    produced: list[int] = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    async for item in iterate_in_thread(endless):
        if item == 2:
            break
    assert len(produced) <= 2 + 8 + 2  # the worker stopped within one buffer of where the consumer did


async def test_run_in_thread_copies_the_context() -> None:
    MARK.set("request")

    def read_and_set() -> str:
        seen = MARK.get()
        MARK.set("changed in worker")
        return seen

    assert await run_in_thread(read_and_set) == "request"
    assert MARK.get() == "request"
