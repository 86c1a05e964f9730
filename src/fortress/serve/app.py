"""The prediction API: ``create_app(settings)`` builds a FastAPI app over a saved defense (DESIGN §2).

Routes: ``POST /v1/predict`` (one query per image, charged to the caller's key, answered in the
key's output mode), ``GET /v1/info``, ``GET /v1/health``, ``GET /metrics`` (admin keys) and the
OpenAPI schema at ``/openapi.json``. It is the HTTP face of the oracle contract (DESIGN §3): a
batch that would pass the key's budget is refused whole (429) before it runs, nothing is charged
for a refused or failed batch, and the answers equal a :class:`~fortress.oracle.LocalOracle`'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

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

from fortress.defenses import DNF, Defense, load_defense
from fortress.device import resolve_device
from fortress.errors import ArtifactError, BudgetExceeded, ConfigError, FortressError, InvalidInput
from fortress.monitor import ExitSPRT, Misinformation, Monitor, PopulationDrift, Response, Step, create_monitor
from fortress.monitor.closed_loop import find_dadd, find_member
from fortress.monitor.service import Watch, first_exit_probs
from fortress.monitor.step import WindowSteps
from fortress.monitor.tap import PenultimateTap
from fortress.serve.answer import Job, Service, Unavailable, answer_tail, profile_commit
from fortress.serve.body import (
    BodyTimeout,
    BodyTooLarge,
    Busy,
    ClientGone,
    declared_length,
    read_body,
    split_multipart,
)
from fortress.serve.decode import TooLarge, decode_json_body, decode_pngs
from fortress.serve.edge import EdgeMiddleware, Gate, Refusal, Scope
from fortress.serve.keys import ApiKey, KeyRejected, KeyStore
from fortress.serve.schemas import (
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    NewKeyRequest,
    NewKeyResponse,
    PredictResponse,
    ProfileResponse,
    json_request_schema,
    multipart_schema,
)
from fortress.serve.settings import ServeSettings
from fortress.serve.timing import FullPathClock, PaddedCompute

__all__ = ["Unavailable", "create_app"]

log = logging.getLogger(__name__)


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


_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The key `fortress keys add` printed.")
_bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token.")


async def current_key(
    request: Request,
    x_api_key: Annotated[str | None, Security(_header_key)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> ApiKey:
    """The caller's active key (401 missing/unknown, 403 revoked), from X-API-Key or a bearer token."""
    gated = getattr(request.state, "api_key", None)  # the edge's gate authenticated it already
    if isinstance(gated, ApiKey):
        return gated
    svc: Service = request.app.state.service
    secret = x_api_key or (creds.credentials if creds is not None else None)
    key = svc.store.authenticate(secret)  # one indexed read (~10 µs in WAL mode): cheaper inline than a thread hop
    request.state.key_id = key.key_id
    return key


def _predict_gate(svc: Service) -> Gate:
    """The predict route's key and budget checks, run at the edge before routing or reading the body.

    A missing, unknown or revoked key (401/403) or a key whose budget is spent (429) is answered
    here; an accepted key is handed to the route in the request's state.
    """

    def gate(scope: Scope, headers: dict[str, str]) -> Refusal | None:
        if scope.get("path") != "/v1/predict" or scope.get("method") != "POST":
            return None
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        secret = headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else None)
        state = scope.setdefault("state", {})
        try:
            key = svc.store.authenticate(secret)
        except KeyRejected as exc:
            more = [(b"www-authenticate", b'ApiKey header="X-API-Key"')] if exc.status == 401 else []
            return exc.status, "unauthorized" if exc.status == 401 else "forbidden", str(exc), {}, more
        state["key_id"] = key.key_id
        if key.budget is not None and key.used >= key.budget:  # nothing left: refused before the body is read
            svc.metrics.observe_refusal(key.key_id, "budget")
            err = BudgetExceeded(1, key.used, key.budget)
            return 429, "budget_exceeded", str(err), {"requested": 1, "used": key.used, "budget": key.budget}, []
        state["api_key"] = key
        return None

    return gate


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
    store = KeyStore(settings.keys_path)  # first: an existing, readable ledger (`fortress keys init`)
    watch = None
    try:
        if defense is None:
            defense = load_defense(settings.model_dir)
        defense.to(resolve_device(settings.device))
        if isinstance(defense, DNF):
            defense.compute = "dynamic" if settings.compute == "padded" else settings.compute
        watch = _watch(settings, defense, store) if settings.profiles else None
        padded = (
            PaddedCompute(defense, FullPathClock(quantile=settings.pad_quantile, window=settings.pad_window))
            if settings.compute == "padded" and defense.num_exits
            else None
        )
    except BaseException:
        store.close()
        if watch is not None:
            watch.close()
        raise
    svc = Service(settings, defense, store, watch, padded)
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
        gate=_predict_gate(svc),
    )
    _install_error_handlers(app)

    @app.get("/v1/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness: the process is up and the model is loaded."""
        return HealthResponse()

    card = defense.victim.data_card  # the saved model remembers its data: class names without --data
    class_names = list(card.classes) if card is not None else [str(i) for i in range(defense.num_classes)]

    @app.get("/v1/info", response_model=InfoResponse, responses=_responses(401, 403), tags=["service"])
    async def info(key: Key) -> InfoResponse:
        """The model's public facts and the caller's key settings."""
        k = defense.num_classes
        return InfoResponse(
            model=settings.display_name,
            num_classes=k,
            classes=class_names,
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
            # the key is checked at the edge (before routing), not by a dependency: state the schemes here
            "security": [{"APIKeyHeader": []}, {"HTTPBearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": json_request_schema(shape, settings.max_batch)},
                    "multipart/form-data": {"schema": multipart_schema()},
                },
            },
        },
    )
    async def predict(request: Request) -> HttpResponse:
        """Answer a batch of images; each image is one query charged to the key.

        The key is authenticated and its budget checked (at the edge) before a byte of the body is read; the
        batch's queries are reserved once it is decoded, and charged (durably) only when its answer
        is ready to leave.
        """
        key = getattr(request.state, "api_key", None)  # authenticated by the edge's gate (_predict_gate)
        if not isinstance(key, ApiKey):  # only when the app runs without its edge (never from create_app)
            raise KeyRejected("missing API key: send it in the X-API-Key header (or Authorization: Bearer)", 401)
        timeout = settings.request_timeout_s
        job = Job(svc.store)
        async with svc.bodies.hold(_body_size(request, settings), timeout):
            decode = await _decoder(request, settings, shape)
            deadline = time.monotonic() + timeout
            work = asyncio.wrap_future(svc.pool.submit(svc.prepare, job, decode, key, deadline))
            try:
                prep = await asyncio.wait_for(asyncio.shield(work), timeout)
            except TimeoutError:
                if job.abandon():
                    svc.metrics.observe_refusal(key.key_id, "timeout")
                    raise Unavailable(f"the batch was not answered within {timeout:g} s; nothing was charged") from None
                prep = await work  # the charge has begun: the answer is being sent
            except asyncio.CancelledError:
                job.abandon()
                raise
        request.state.images = prep.n
        charged = prep.charged
        if charged is None:  # a held answer: charge it when the hold is over
            await anyio.sleep(prep.delay_s)
            try:
                charged = await asyncio.wrap_future(svc.store.commit_async(prep.res, also=profile_commit(prep.record)))
            except BaseException as exc:
                svc.store.release_async(prep.res)
                svc.metrics.observe_refusal(key.key_id, "budget" if isinstance(exc, BudgetExceeded) else "error")
                if isinstance(exc, ArtifactError):
                    msg = f"the answer could not be recorded, so it was not sent; nothing was charged ({exc})"
                    raise Unavailable(msg) from None
                raise
        svc.metrics.observe_queries(key.key_id, prep.n, prep.exits, prep.seconds)
        return HttpResponse(prep.head + answer_tail(prep.n, charged), media_type="application/json")

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

    @app.post("/v1/admin/keys", response_model=NewKeyResponse, responses=_responses(401, 403, 422))
    async def key_create(body: NewKeyRequest, key: Key) -> NewKeyResponse:
        """Create an API key (admin keys only); the secret is in this answer and nowhere else."""
        if not key.admin:
            raise KeyRejected(f"API key {key.key_id} may not create keys (create one with --admin)", 403)
        try:
            made, secret = await anyio.to_thread.run_sync(
                functools.partial(
                    svc.store.add, body.name, budget=body.budget, output_mode=body.output_mode, top_k=body.top_k
                )
            )
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from None
        return NewKeyResponse(key_id=made.key_id, secret=secret, budget=made.budget, created_at=made.created_at)

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


def _watch(settings: ServeSettings, defense: Defense, store: KeyStore | None = None) -> Watch:
    """Per-key profiles, the configured monitor (``settings.monitor``) and the population detector."""
    response = Response(settings.monitor_response)
    monitor = None
    population = None
    if settings.monitor is not None:
        features = PenultimateTap(defense) if isinstance(defense, DNF) else None
        monitor = create_monitor(settings.monitor, calibration=settings.monitor_calibration, features=features)
    window_steps = None
    if settings.population_window_s is not None and monitor is not None and store is not None:
        population = _population(settings, defense, monitor)
        step = find_member(monitor, Step)
        if step is not None:  # JBDA spread over keys: step over each window's keys as one stream
            window_steps = WindowSteps(step.calibration, window_s=settings.population_window_s)
    return Watch(
        settings.keys_path,
        num_exits=defense.num_exits or 0,
        monitor=monitor,
        response=response,
        exit0=first_exit_probs(defense) if response is Response.DEGRADE_EXIT0 else None,
        misinform=Misinformation.for_defense(defense) if response.relabels else None,
        webhook=settings.monitor_webhook,
        throttle_s_per_query=settings.throttle_s_per_query,
        population=population,
        created_at=None if store is None else _creation_times(store),
        window_steps=window_steps,
    )


def _population(settings: ServeSettings, defense: Defense, monitor: Monitor) -> PopulationDrift:
    """The population detector over ``monitor``'s dadd calibration (and exit-sprt's ID exits, if a member)."""
    dadd = find_dadd(monitor)
    if dadd is None:
        raise ConfigError(f"the population detector needs dadd among the monitors, got {settings.monitor!r}")
    sprt = find_member(monitor, ExitSPRT)
    early = None if sprt is None else sprt.calibration.early_share
    assert settings.population_window_s is not None
    return PopulationDrift(
        dadd.calibration,
        id_early_share=early,
        num_exits=None if early is None else defense.num_exits,
        window_s=settings.population_window_s,
        min_queries=settings.population_min_queries,
    )


def _creation_times(store: KeyStore) -> Callable[[str], float]:
    """A key's creation time (epoch seconds) from the ledger, read once per key."""
    seen: dict[str, float] = {}

    def created_at(key_id: str) -> float:
        if key_id not in seen:
            seen[key_id] = datetime.fromisoformat(store.get(key_id).created_at).timestamp()
        return seen[key_id]

    return created_at


def _body_size(request: Request, settings: ServeSettings) -> int:
    """The bytes a request's body may take (its declared size, or the limit when it is not declared)."""
    return declared_length(request) or settings.max_body_bytes


async def _decoder(request: Request, settings: ServeSettings, shape: tuple[int, int, int]) -> Callable[[], Tensor]:
    """Read the body (within its limits) and return the function that decodes it by its content type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise UnsupportedMedia(
            f"content type {ctype[:60] or '(none)'!r} is not accepted; send application/json or multipart/form-data"
        )
    body = await read_body(request, settings.max_body_bytes, settings.request_timeout_s)
    if ctype == "application/json":
        return functools.partial(decode_json_body, body, shape, settings.max_batch)
    files = await split_multipart(body, request.headers, settings.max_batch)
    return functools.partial(decode_pngs, files, shape, settings.max_batch)


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
