"""The dead letters of an instance over HTTP, for embedded mode (whose storage is in the process):
what ``krules dlq list|show|purge --url`` reads and deletes.  In Redis mode the same routes read the
deployment's Redis, which ``krules dlq`` reads directly.

Routes (behind ``KRULES_INGRESS_TOKEN`` when it is set, like the rest of the ingress):

* ``GET /dead-letters?handler=&type=&reason=&since=&until=``: ``{"dead_letters": [...]}``, oldest
  first, each as :meth:`~krules.dead_letters.DeadLetter.to_dict` (``since``/``until``: epoch seconds;
  ``handler``/``type``: names or globs);
* ``GET /dead-letters/{id}``: one dead letter (its id, name, or an unambiguous start of its id);
* ``DELETE /dead-letters/{id}``: delete it, ``{"deleted": [name]}``;
* ``DELETE /dead-letters?older_than=SECONDS``: purge (all without ``older_than``),
  ``{"deleted": [names]}``.

An unknown id is 404, an ambiguous one 409, a bad query parameter 400, a storage failure 503; every
error is ``{"error": "<one sentence>"}``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from krules.dead_letters.admin import DeadLetters
from krules.engine import Engine
from krules.errors import DeadLetterError, StorageError

__all__ = ["dead_letter_routes"]

_Endpoint = Callable[[Request], Awaitable[Response]]
_FILTERS: Final = {"handler": "handler", "type": "event_type", "reason": "reason"}


class _BadQuery(Exception):
    """A query parameter the routes cannot use (400)."""


def _seconds(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _BadQuery(f"The query parameter {name}={raw!r} is not a number of seconds.")
    return value


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status)


def _guarded(work: _Endpoint) -> _Endpoint:
    async def endpoint(request: Request) -> Response:
        try:
            return await work(request)
        except _BadQuery as exc:
            return _error(400, str(exc))
        except DeadLetterError as exc:
            return _error(409 if "ambiguous" in str(exc) else 404, str(exc))
        except StorageError as exc:
            return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": "1"})

    return endpoint


def dead_letter_routes(engine: Engine) -> list[Route]:
    """The ``/dead-letters`` routes over ``engine``'s storage (see the module docstring)."""
    dead = DeadLetters(engine.storage, clock=engine.clock.now)

    async def listing(request: Request) -> Response:
        filters: dict[str, Any] = {
            keyword: request.query_params.get(param) or None for param, keyword in _FILTERS.items()
        }
        since, until = _seconds(request, "since"), _seconds(request, "until")
        records = await dead.list(**filters, since=since, until=until)
        return JSONResponse({"dead_letters": [record.to_dict() for record in records]})

    async def one(request: Request) -> Response:
        return JSONResponse((await dead.find(request.path_params["ident"])).to_dict())

    async def delete_one(request: Request) -> Response:
        record = await dead.find(request.path_params["ident"])
        return JSONResponse({"deleted": await dead.delete_many([record.name])})

    async def purge(request: Request) -> Response:
        older_than = _seconds(request, "older_than")
        if older_than is not None and older_than < 0:
            raise _BadQuery(f"The query parameter older_than={older_than:g} is negative.")
        return JSONResponse({"deleted": await dead.purge(older_than)})

    return [
        Route("/dead-letters", _guarded(listing), methods=["GET"]),
        Route("/dead-letters", _guarded(purge), methods=["DELETE"]),
        Route("/dead-letters/{ident}", _guarded(one), methods=["GET"]),
        Route("/dead-letters/{ident}", _guarded(delete_one), methods=["DELETE"]),
    ]
