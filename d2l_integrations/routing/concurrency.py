"""Run the synchronous engine from asyncio without sharing adapter state between requests.

The engine applies adapters through a ContextVar for the whole of a decode. A request must
therefore run start to finish in ONE thread and ONE context: ``run_in_thread`` runs a call in a
worker thread inside a copy of the caller's context; ``iterate_in_thread`` drives a whole sync
iterator in one worker thread and hands its items to the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


async def run_in_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``await`` ``func(*args, **kwargs)`` run in the default executor, in a copy of this context."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(None, partial(context.run, func, *args, **kwargs))


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]], *, buffer: int = 8) -> AsyncIterator[T]:
    """Yield the items of ``make_iterator()``, which runs entirely in one worker thread.

    The worker runs at most ``buffer`` items ahead of the consumer; stopping early (``break`` or
    cancellation) makes it stop after its current item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=buffer)
    stop = threading.Event()

    def put(kind: str, value: Any) -> None:
        asyncio.run_coroutine_threadsafe(queue.put((kind, value)), loop).result()  # blocks while the buffer is full

    def produce() -> None:
        try:
            for item in make_iterator():
                if stop.is_set():
                    break
                put("item", item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put("error", exc)
        finally:
            put("done", None)

    context = contextvars.copy_context()
    worker = loop.run_in_executor(None, context.run, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "done":
                break
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while not worker.done():  # drain so a worker blocked on a full buffer can see `stop`
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.005)
        await worker


__all__ = ["iterate_in_thread", "run_in_thread"]
