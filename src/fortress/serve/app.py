"""The prediction API: ``create_app(settings)`` builds a FastAPI app over a saved defense (DESIGN §2).

Routes: ``POST /v1/predict`` (one query per image, charged to the caller's key, answered in the
key's output mode), ``GET /v1/info``, ``GET /v1/health``, ``GET /metrics`` (admin keys) and the
OpenAPI schema at ``/openapi.json``. It is the HTTP face of the oracle contract (DESIGN §3): a
batch that would pass the key's budget is refused whole (429) before it runs, nothing is charged
for a refused or failed batch, and the answers equal a :class:`~fortress.oracle.LocalOracle`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
import torch
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.responses import Response as HttpResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from fortress.defenses import DNF, Defense, DefenseOutput, load_defense
from fortress.errors import ArtifactError, BudgetExceeded, ConfigError, FortressError, InvalidInput
from fortress.monitor import Response, create_monitor
from fortress.monitor.service import Answer, Watch, first_exit_probs
from fortress.monitor.store import ProfileStore
from fortress.oracle import OutputMode, apply_output_mode
from fortress.serve.body import (
    BodyBudget,
    BodyTimeout,
    BodyTooLarge,
    Busy,
    ClientGone,
    declared_length,
    read_body,
    split_multipart,
)
from fortress.serve.decode import TooLarge, decode_json_body, decode_pngs
from fortress.serve.edge import EdgeMiddleware
from fortress.serve.keys import ApiKey, KeyRejected, KeyStore, Reservation
from fortress.serve.metrics import Metrics
from fortress.serve.schemas import (
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    PredictResponse,
    ProfileResponse,
    json_request_schema,
    multipart_schema,
)
from fortress.serve.settings import ServeSettings
from fortress.serve.timing import FullPathClock, PaddedCompute

__all__ = ["Unavailable", "create_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Unavailable(FortressError):
    """The batch could not be answered in time (HTTP 503; nothing charged)."""


class UnsupportedMedia(InvalidInput):
    """The body's content type is not one the route reads (HTTP 415)."""


_ERRORS: dict[int, str] = {
    400: "Malformed request (bad Content-Length, unreadable HTTP).",
    401: "Missing, malformed or unknown API key.",
    403: "Revoked API key, or not allowed.",
    408: "The request body arrived too slowly.",
    413: "Body, batch or upload over the server's limits (the message names the limit).",
    415: "Unsupported content type.",
    422: "Invalid input: the message names the first offending element.",
    429: "The batch would pass the key's query budget; nothing was charged.",
    431: "Request line and headers over the server's limit.",
    503: "Not answered in time, or the server is busy; nothing was charged.",
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


class _Service:
    """The loaded defense, the key ledger and the metrics, shared by every request."""

    def __init__(self, settings: ServeSettings, defense: Defense) -> None:
        self.settings = settings
        self.defense = defense
        self.store = KeyStore(settings.keys_path)  # an existing, readable ledger (`fortress keys init`)
        try:
            self.watch = _watch(settings, defense) if settings.profiles else None
        except BaseException:
            self.store.close()
            raise
        self.metrics = Metrics()
        self.slots = threading.BoundedSemaphore(settings.inference_workers)
        self.bodies = BodyBudget(settings.buffered_bodies * settings.max_body_bytes)
        self.padded = (
            PaddedCompute(defense, FullPathClock(quantile=settings.pad_quantile, window=settings.pad_window))
            if settings.compute == "padded" and defense.num_exits
            else None
        )

    def close(self) -> None:
        """Close the ledger (this process's open reservations are released) and the profile store."""
        self.store.close()
        if self.watch is not None:
            self.watch.close()

    def respond(
        self, x: Tensor, deadline: float, key_id: str | None = None
    ) -> tuple[DefenseOutput, float, Answer | None]:
        """Answer ``x`` on a worker thread, unless no slot frees up before ``deadline``.

        With profiles on, the key's monitoring step runs on the same thread right after the answer
        (outside the inference slot), so monitoring costs no extra thread hop per request; its
        record is committed later, with the batch's charge.
        """
        if not self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Unavailable("server busy: no inference slot freed up in time; nothing was charged")
        try:
            if time.monotonic() > deadline:  # the client has been answered 503 already
                raise Unavailable("request timed out while queued; nothing was charged")
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.defense.respond(x) if self.padded is None else self.padded.respond(x)
            seconds = time.perf_counter() - t0
        finally:
            self.slots.release()
        watched = None
        if self.watch is not None and key_id is not None:
            watched = self.watch.assess(key_id, x, out.probs, out.exits)
        return out, seconds, watched


_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The key `fortress keys add` printed.")
_bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token.")


async def current_key(
    request: Request,
    x_api_key: Annotated[str | None, Security(_header_key)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> ApiKey:
    """The caller's active key (401 missing/unknown, 403 revoked), from X-API-Key or a bearer token."""
    svc: _Service = request.app.state.service
    secret = x_api_key or (creds.credentials if creds is not None else None)
    key = await anyio.to_thread.run_sync(svc.store.authenticate, secret)
    request.state.key_id = key.key_id
    return key


Key = Annotated[ApiKey, Depends(current_key)]


def create_app(settings: ServeSettings, *, defense: Defense | None = None) -> FastAPI:
    """Build the prediction API over ``settings.model_dir`` (or an already loaded ``defense``).

    Args:
        settings: see :class:`~fortress.serve.settings.ServeSettings`.
        defense: serve this defense instead of loading ``settings.model_dir`` (embedding, tests).

    Returns:
        The FastAPI app; run it with uvicorn (``fortress serve`` does).

    Raises:
        ArtifactError: the model directory is missing or corrupt (safetensors + JSON only), or the
            key ledger is missing, empty or damaged (create one with ``fortress keys init``).

    Example:
        >>> app = create_app(ServeSettings(Path("dnf"), Path("keys.db"), compute="full"))
    """
    if defense is None:
        defense = load_defense(settings.model_dir)
    if isinstance(defense, DNF):
        defense.compute = "dynamic" if settings.compute == "padded" else settings.compute
    svc = _Service(settings, defense)
    shape = defense.input_shape

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        n_keys = sum(k.revoked_at is None for k in svc.store.list_keys())
        log.info("serving %s (%d active keys) from %s", settings.display_name, n_keys, settings.keys_path)
        if not n_keys:
            log.warning("the key ledger %s holds no active key: every request will be refused", settings.keys_path)
        yield
        svc.close()

    app = FastAPI(
        title="fortress prediction API",
        version="1",
        description="Model predictions behind per-key query budgets (see docs/serving.md).",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(
        EdgeMiddleware,
        metrics=svc.metrics,
        routes=frozenset({"/v1/predict", "/v1/info", "/v1/health", "/metrics", "/openapi.json", "/docs"}),
        max_body_bytes=settings.max_body_bytes,
    )
    _install_error_handlers(app)

    @app.get("/v1/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness: the process is up and the model is loaded."""
        return HealthResponse()

    @app.get("/v1/info", response_model=InfoResponse, responses=_responses(401, 403), tags=["service"])
    async def info(key: Key) -> InfoResponse:
        """The model's public facts and the caller's key settings."""
        k = defense.num_classes
        return InfoResponse(
            model=settings.display_name,
            num_classes=k,
            classes=[str(i) for i in range(k)],
            input_shape=list(shape),
            value_range=[0.0, 1.0],
            formats=["application/json: images", "application/json: npy", "multipart/form-data: files (PNG)"],
            max_batch=settings.max_batch,
            max_body_bytes=settings.max_body_bytes,
            output_mode=key.output_mode.value,
            top_k=key.top_k,
            budget=key.budget,
            queries_used=key.used,
        )

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_responses(400, 401, 403, 408, 413, 415, 422, 429, 431, 503),
        tags=["predict"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": json_request_schema(shape, settings.max_batch)},
                    "multipart/form-data": {"schema": multipart_schema()},
                },
            }
        },
    )
    async def predict(request: Request, key: Key) -> HttpResponse:
        """Answer a batch of images; each image is one query charged to the key.

        The key is authenticated and its budget checked before a byte of the body is read; the
        batch's queries are reserved once it is decoded, and charged (durably) only when its answer
        is ready to leave.
        """
        if key.budget is not None and key.used >= key.budget:
            svc.metrics.observe_refusal(key.key_id, "budget")
            raise BudgetExceeded(1, key.used, key.budget)
        x = await _read_images(request, svc, shape)
        n = int(x.shape[0])
        request.state.images = n
        try:
            res = await _reserve(svc.store, key.key_id, n)
        except BudgetExceeded:
            svc.metrics.observe_refusal(key.key_id, "budget")
            raise
        committed = False
        try:
            deadline = time.monotonic() + settings.request_timeout_s
            with anyio.fail_after(settings.request_timeout_s):
                out, seconds, ans = await anyio.to_thread.run_sync(
                    svc.respond, x, deadline, key.key_id, abandon_on_cancel=True
                )
            if svc.padded is not None:  # hold the answer until the full path's time (the slot is free meanwhile)
                await anyio.to_thread.run_sync(svc.padded.pad, n, seconds)
            probs, mode = out.probs, key.output_mode
            if ans is not None:
                probs, mode = ans.probs, OutputMode.HARD if ans.labels_only else mode
                if ans.delay_s:
                    await anyio.sleep(ans.delay_s)
            head = _answer_head(mode, probs, key.top_k)
            record = None if ans is None else ans.record
            also = None if record is None else (lambda db: ProfileStore.apply(db, record))
            charged = await _wait(svc.store.commit_async(res, also=also))
            committed = True
        except BaseException as exc:
            if not committed:
                with anyio.CancelScope(shield=True):
                    await _wait(svc.store.release_async(res))
            reason = "budget" if isinstance(exc, BudgetExceeded) else "error"
            svc.metrics.observe_refusal(key.key_id, "timeout" if isinstance(exc, TimeoutError) else reason)
            if isinstance(exc, TimeoutError):
                raise Unavailable(
                    f"the batch was not answered within {settings.request_timeout_s:g} s; nothing was charged"
                ) from None
            if isinstance(exc, ArtifactError):
                msg = f"the answer could not be recorded, so it was not sent; nothing was charged ({exc})"
                raise Unavailable(msg) from None
            raise
        exits = None
        if out.exits is not None and defense.num_exits:
            exits = torch.bincount(out.exits, minlength=defense.num_exits).tolist()
        svc.metrics.observe_queries(key.key_id, n, exits, seconds)
        return HttpResponse(head + _answer_tail(n, charged), media_type="application/json")

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_responses(401, 403)},
        tags=["service"],
    )
    async def metrics(key: Key) -> PlainTextResponse:
        """Prometheus metrics (admin keys only): requests, latency, queries and DNF exits per key."""
        if not key.admin:
            raise KeyRejected(f"API key {key.key_id} may not read metrics (create one with --admin)", 403)
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    async def admin_watch(key: ApiKey, key_id: str, action: str) -> Watch:
        """The server's Watch, after checking an admin caller, profiles on and a known ``key_id``."""
        if not key.admin:
            raise KeyRejected(f"API key {key.key_id} may not {action} (create one with --admin)", 403)
        if svc.watch is None:
            raise InvalidInput("key profiles are off on this server (profiles=False)")
        try:
            await anyio.to_thread.run_sync(svc.store.get, key_id)
        except ConfigError as exc:  # an unknown key id is the caller's mistake
            raise InvalidInput(str(exc)) from None
        return svc.watch

    @app.get("/v1/admin/keys/{key_id}/profile", response_model=ProfileResponse, responses=_responses(401, 403, 422))
    async def key_profile(key_id: str, key: Key) -> ProfileResponse:
        """A key's query profile and monitor verdict (admin keys only; see docs/monitoring.md)."""
        watch = await admin_watch(key, key_id, "read key profiles")
        return ProfileResponse(**await anyio.to_thread.run_sync(watch.profile, key_id))

    @app.post("/v1/admin/keys/{key_id}/reset", response_model=ProfileResponse, responses=_responses(401, 403, 422))
    async def key_reset(key_id: str, key: Key) -> ProfileResponse:
        """Clear a key's monitor flag and restart its evidence (admin keys only); the profile stays."""
        watch = await admin_watch(key, key_id, "reset key flags")
        return ProfileResponse(**await anyio.to_thread.run_sync(watch.reset, key_id))

    return app


def _watch(settings: ServeSettings, defense: Defense) -> Watch:
    """Per-key profiles and the configured monitor (``settings.monitor``) over the key ledger."""
    response = Response(settings.monitor_response)
    monitor = None
    if settings.monitor is not None:
        monitor = create_monitor(settings.monitor, calibration=settings.monitor_calibration)
    return Watch(
        settings.keys_path,
        num_exits=defense.num_exits or 0,
        monitor=monitor,
        response=response,
        exit0=first_exit_probs(defense) if response is Response.DEGRADE_EXIT0 else None,
        webhook=settings.monitor_webhook,
        throttle_s_per_query=settings.throttle_s_per_query,
    )


async def _read_images(request: Request, svc: _Service, shape: tuple[int, int, int]) -> Tensor:
    """Read (within the server's body budget) and decode the body by its content type."""
    settings = svc.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise UnsupportedMedia(
            f"content type {ctype[:60] or '(none)'!r} is not accepted; send application/json or multipart/form-data"
        )
    need = declared_length(request) or settings.max_body_bytes
    async with svc.bodies.hold(need, settings.request_timeout_s):
        body = await read_body(request, settings.max_body_bytes, settings.request_timeout_s)
        if ctype == "application/json":
            return await anyio.to_thread.run_sync(decode_json_body, body, shape, settings.max_batch)
        files = await split_multipart(body, request.headers, settings.max_batch)
        del body
        return await anyio.to_thread.run_sync(decode_pngs, files, shape, settings.max_batch)


async def _wait(fut: Future[T], orphan: Callable[[T], object] | None = None) -> T:
    """Await a ledger operation; if the waiter is cancelled after the operation ran, hand its result to ``orphan``."""
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        if orphan is not None:
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else orphan(f.result()))
        raise


async def _reserve(store: KeyStore, key_id: str, n: int) -> Reservation:
    """Reserve ``n`` queries; a refusal first releases what stopped server processes left reserved."""
    try:
        return await _wait(store.reserve_async(key_id, n), store.release_async)
    except BudgetExceeded:
        if not await anyio.to_thread.run_sync(store.release_stale):
            raise
    return await _wait(store.reserve_async(key_id, n), store.release_async)


def _answer_head(mode: OutputMode, probs: Tensor, top_k: int) -> bytes:
    """The answer's JSON up to its counters (rendered before the charge, so the charge is the last step)."""
    labels = probs.argmax(1).tolist()
    rows = None if mode is OutputMode.HARD else apply_output_mode(probs, mode, top_k).tolist()
    text = f'{{"output_mode":"{mode.value}","labels":{json.dumps(labels)},"probabilities":{json.dumps(rows)}'
    return text.encode()


def _answer_tail(n: int, key: ApiKey) -> bytes:
    """The counters after the charge (see :class:`~fortress.serve.schemas.PredictResponse`)."""
    return (
        f',"queries_charged":{n},"queries_used":{key.used},"budget":{json.dumps(key.budget)},'
        f'"budget_left":{json.dumps(key.budget_left)}}}'
    ).encode()


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as a JSON :class:`ErrorResponse` with a status that says whose fault it was."""

    def reply(request: Request, status: int, code: str, message: str, **extra: Any) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        headers = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'} if status == 401 else None
        body = ErrorResponse(error=code, message=message, request_id=rid, **extra)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)

    async def on_fortress(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, KeyRejected):
            return reply(request, exc.status, "unauthorized" if exc.status == 401 else "forbidden", str(exc))
        if isinstance(exc, BudgetExceeded):
            return reply(
                request, 429, "budget_exceeded", str(exc), requested=exc.requested, used=exc.used, budget=exc.budget
            )
        if isinstance(exc, BodyTooLarge):
            return reply(request, 413, "body_too_large", str(exc))
        if isinstance(exc, TooLarge):
            return reply(request, 413, "too_large", str(exc))
        if isinstance(exc, BodyTimeout):
            return reply(request, 408, "request_timeout", str(exc))
        if isinstance(exc, ClientGone):
            return reply(request, 400, "client_disconnected", str(exc))
        if isinstance(exc, Busy):
            return reply(request, 503, "busy", str(exc))
        if isinstance(exc, UnsupportedMedia):
            return reply(request, 415, "unsupported_media_type", str(exc))
        if isinstance(exc, InvalidInput):
            return reply(request, 422, "invalid_input", str(exc))
        if isinstance(exc, Unavailable):
            return reply(request, 503, "unavailable", str(exc))
        if isinstance(exc, ArtifactError):  # the ledger failed under a request: nothing was charged
            log.error("%s", exc)
            return reply(request, 503, "unavailable", "the key ledger is unavailable; nothing was charged")
        log.error("unexpected library error: %s", exc)
        return reply(request, 500, "internal_error", "the server failed to answer")

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3])
        return reply(request, 422, "invalid_request", msg or "invalid request")

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        resp = reply(request, exc.status_code, f"http_{exc.status_code}", str(exc.detail))
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    app.add_exception_handler(FortressError, on_fortress)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
