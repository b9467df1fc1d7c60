"""TypeDispatcher: route decoded messages to async handlers by message type, never raise.

A service builds one dispatcher per subscription (or shares one), registers a handler per
message type it accepts, and subscribes with `make_callback(dispatcher)`:

    dispatcher = TypeDispatcher({GenerateCmd: on_generate, AbortCmd: on_abort})
    await nc.subscribe(subjects.instance_cmd(iid), cb=make_callback(dispatcher))

Contract (DESIGN.md §3: a bad message never crashes a service):
  * bytes that do not decode, a message type with no handler, and a handler that raises are
    logged (the last with its traceback) and dropped; `dispatch` returns None for them;
  * otherwise `dispatch` returns what the handler returned;
  * for request/reply (`msg.reply` set), the callback replies with the handler's return
    value if it is a registered message; a dropped request gets no reply, so the requester
    times out.

Handlers run inside the NATS client's callback task: they should be quick (decode, enqueue,
reply) and leave long work to the service's own loop (STYLE lesson 4).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from xllm.protocol.codec import DecodeError, decode, encode, registry

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]
"""An async function of one message; its return value becomes the reply, if any."""


class TypeDispatcher:
    """A table: message type -> async handler."""

    def __init__(self, handlers: Mapping[type, Handler] | None = None, *, name: str = ""):
        self.name = name or "dispatcher"
        """Shown in log lines, to tell subscriptions apart."""
        self._handlers: dict[type, Handler] = {}
        for msg_type, handler in (handlers or {}).items():
            self.register(msg_type, handler)

    def register(self, msg_type: type, handler: Handler) -> None:
        """Route `msg_type` to `handler`; one handler per type."""
        known = {cls for cls, _ in registry().values()}
        if msg_type not in known:
            raise TypeError(f"{msg_type!r} is not a registered message (@message)")
        if msg_type in self._handlers:
            raise ValueError(f"{self.name}: {msg_type.__qualname__} already has a handler")
        self._handlers[msg_type] = handler

    def handles(self, msg_type: type) -> bool:
        return msg_type in self._handlers

    async def dispatch(self, data: bytes, subject: str = "") -> Any:
        """Decode `data` and run its handler; None when the message was dropped."""
        try:
            msg = decode(data)
        except DecodeError as e:
            log.warning("%s: dropped undecodable message on %r: %s", self.name, subject, e)
            return None
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning("%s: dropped %s on %r: no handler", self.name, _name(msg), subject)
            return None
        try:
            return await handler(msg)
        except Exception:
            log.exception("%s: handler of %s on %r failed", self.name, _name(msg), subject)
            return None


def make_callback(dispatcher: TypeDispatcher) -> Callable[[Any], Awaitable[None]]:
    """A nats-py subscription callback that feeds `dispatcher` and answers requests."""

    name = dispatcher.name

    async def callback(msg: Any) -> None:
        result = await dispatcher.dispatch(msg.data, msg.subject)
        if result is None or not msg.reply:
            return
        try:
            payload = encode(result)
        except Exception:  # not a message, or a value msgpack cannot carry: a bug in the handler
            log.exception("%s: cannot encode the reply %s on %r", name, _name(result), msg.subject)
            return
        try:
            await msg.respond(payload)
        except Exception:  # connection closing, reply subject gone: the requester times out
            log.warning("%s: could not reply on %r", name, msg.subject, exc_info=True)

    return callback


def _name(obj: Any) -> str:
    return type(obj).__qualname__
