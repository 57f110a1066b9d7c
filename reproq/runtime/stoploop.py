"""The start/stop shape of one long-running loop (the beat, the peers): `stop()` asks the loop to
end and waits, bounded, until its `run` has returned; the loop sleeps with `_sleep`, which a
`_poke` (a stop, a leadership change, a doubt) cuts short.

A subclass calls `_init_stop()` in its constructor, `_events()` when its `run` begins,
`_ended()` when it returns, and tests `_stopping` in its loop.
"""

from __future__ import annotations

import anyio


class StopLoop:
    _stopping: bool
    _wake: anyio.Event | None
    _exited: anyio.Event | None

    def _init_stop(self) -> None:
        self._stopping = False
        self._wake = None
        self._exited = None

    def _events(self) -> None:
        """A run begins: fresh events (already woken when a stop came first)."""
        self._wake, self._exited = anyio.Event(), anyio.Event()
        if self._stopping:
            self._wake.set()

    def _ended(self) -> None:
        if self._exited is not None:
            self._exited.set()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less when stopped or poked."""
        if seconds <= 0 or self._wake is None:
            return
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        if not self._stopping:
            self._wake = anyio.Event()

    async def _stop_and_wait(self, timeout: float) -> None:
        """Ask the loop to end; return once its `run` has returned (at most `timeout` s)."""
        self._stopping = True
        self._poke()
        if self._exited is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await self._exited.wait()
