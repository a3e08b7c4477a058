"""WuKongIM's official Python EasySDK (`wukong-easy-sdk`) driven from trio tests: the SDK runs as shipped, on
asyncio in a thread of its own (`SdkLoop`), and every event it emits is kept for the test (`Sdk`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wukong_easy_sdk import WKIM, AuthOptions, WKIMDeviceFlag, WKIMEvent, WKIMOptions

SDK_OPTIONS = WKIMOptions(
    connect_timeout=5,
    request_timeout=10,
    reconnect_delay=0.2,
    max_reconnect_delay=1,
    max_reconnect_attempts=40,
)


class SdkLoop:
    """An asyncio loop in a thread of its own, for the SDK: trio awaits its coroutines in worker threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="easysdk", daemon=True)
        self.thread.start()

    async def run(self, make: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
        async def wrapped() -> Any:
            return await make()

        future = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        return await trio.to_thread.run_sync(future.result, timeout_s)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Sdk:
    """One WKIM client and the events it emitted (appended on the SDK's loop, read from trio)."""

    def __init__(self, loop: SdkLoop, url: str, uid: str) -> None:
        self.loop = loop
        self.events: list[tuple[WKIMEvent, Any]] = []

        def make() -> WKIM:
            client = WKIM(url, AuthOptions(uid, "any-token", device_flag=WKIMDeviceFlag.APP), SDK_OPTIONS)
            for event in WKIMEvent:
                client.on(event, lambda value, event=event: self.events.append((event, value)))
            return client

        self.client = make()

    def of(self, event: WKIMEvent) -> list[Any]:
        return [value for kind, value in list(self.events) if kind == event]

    async def connect(self) -> Any:
        return await self.loop.run(self.client.connect)

    async def send(self, channel_id: str, payload: dict[str, Any]) -> Any:
        return await self.loop.run(lambda: self.client.send(channel_id, 1, payload))

    async def destroy(self) -> None:
        await self.loop.run(self.client.destroy)
