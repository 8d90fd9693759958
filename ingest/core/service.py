"""The shape every long-lived component shares: explicit start and stop, and `async with`."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Base of the components (server, producer, loader, pool, broker, database process).

    ``async with component:`` starts it and, whatever happens inside, stops it;
    ``stop`` drains the component's work in flight.
    """

    async def start(self) -> None:
        """Start the component."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the component, draining its work in flight."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
