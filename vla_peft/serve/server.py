"""The policy server: one base, every task bundle of a folder, actions over HTTP (FastAPI + uvicorn).

    GET  /health     liveness, the tasks and the active one
    GET  /tasks      each task's policy config (cameras, image size, state keys, chunking)
    POST /activate   {"task": name}: swap now; act requests that name no task use it
    POST /act        an observation and a task -> the action chunk, the next action, latency
    GET  /metrics    requests, errors, act latency p50/p95, batching

All bank work runs on one worker thread (``TaskBatcher``): requests for different tasks are
served correctly whatever their interleaving, and requests for one task share forward passes.
Errors a client can cause come back as a 4xx with ``{"error": "<what and how to fix it>"}``.
uvicorn handles SIGINT/SIGTERM: it stops accepting connections, lets requests in flight finish
(up to ``grace_s``), then the worker finishes what is queued and stops.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from vla_peft.serve.bank import AdapterBank
from vla_peft.serve.batcher import TaskBatcher
from vla_peft.serve.metrics import ServerMetrics
from vla_peft.policy.observation import MAX_INSTRUCTION_CHARS, ObservationError
from vla_peft.serve.wire import RequestError, parse_act

TOKEN_HEADER = "authorization"  # "Bearer <token>"
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


def find_bundles(folder: str | Path) -> dict[str, Path]:
    """Task name -> bundle directory: ``folder/<task>/bundle.json`` or ``folder/<task>/bundle/bundle.json``
    (the layout ``vla-peft train`` writes under ``runs/<run>/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"bank folder {folder} does not exist; pass the folder that holds your task bundles")
    found = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for candidate in (child, child / "bundle"):
            if (candidate / "bundle.json").is_file():
                found[child.name] = candidate
                break
    if not found:
        raise FileNotFoundError(f"no task bundles under {folder}: expected <task>/bundle.json or "
                                "<task>/bundle/bundle.json (as `vla-peft train` writes them)")
    return found


def load_bank(folder: str | Path, base: str | None = None, mode: str = "unmerged") -> AdapterBank:
    """Load the base once (the first readable bundle's, or ``base``) and register every bundle under
    its task name. A bundle that cannot be loaded is skipped and kept in ``bank.failed`` (name ->
    why) for the caller to report; only when none loads is that an error."""
    bundles = find_bundles(folder)
    failed, bank = {}, None
    for name, path in bundles.items():
        try:
            if bank is None:
                bank = AdapterBank.for_bundle(path, mode=mode, base=base)
            bank.register(name, path)
        except (ValueError, OSError, KeyError) as err:  # each names the bundle's file or what differs
            failed[name] = str(err)
    if bank is None or not bank.names:
        details = "; ".join(f"{name}: {why}" for name, why in failed.items())
        raise ValueError(f"no bundle under {folder} could be loaded ({details})")
    bank.failed = failed
    bank.activate(bank.names[0])
    return bank


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(bank: AdapterBank, token: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_batch: int = 16, max_instruction_chars: int = MAX_INSTRUCTION_CHARS):
    """The ASGI app serving ``bank`` (which must have at least one bundle). Each act request is
    decoded and checked off the event loop, before it can join a batch of other clients' requests."""
    if not bank.names:
        raise ValueError("the bank has no bundles to serve; register at least one")
    metrics = ServerMetrics()
    state: dict = {"default": bank.active}

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = TaskBatcher(bank, max_batch=max_batch)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.batcher.close)

    app = FastAPI(title="vla_peft policy server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, token=token, max_request_bytes=max_request_bytes, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(ObservationError)
    async def observation_error(_: Request, err: ObservationError):
        return JSONResponse({"error": str(err)}, status_code=422)

    def task_of(body: dict) -> str:
        task = body.get("task", state["default"])
        if task is None:
            raise RequestError("missing field 'task': name one of the served tasks")
        if not isinstance(task, str) or task not in bank.policies:
            raise RequestError(f"unknown task {task!r}; this server has {bank.names}", status=404)
        return task

    def json_body(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise RequestError(f"malformed body: not JSON ({err}); send a JSON object", status=400) from None
        if not isinstance(body, dict):
            raise RequestError("malformed body: the JSON must be an object", status=400)
        return body

    def read_act(raw: bytes) -> tuple:
        """JSON, base64 and image decoding and the observation check (run in a thread: a large
        request must not hold up /health or other clients)."""
        body = json_body(raw)
        task = task_of(body)
        tag = body.get("id")
        if tag is not None and not isinstance(tag, (str, int)):
            raise RequestError("'id' must be a string or an integer (it is echoed back to tag the answer)")
        obs, binarize = parse_act(body, bank.policies[task], max_instruction_chars)
        return task, tag, obs, binarize

    @app.get("/health")
    async def health():
        return {"status": "ok", "tasks": bank.names, "active": state["default"], "failed": bank.failed}

    @app.get("/tasks")
    async def tasks():
        return {"tasks": {name: {"config": policy.config.to_dict(),
                                 "method": None if policy.method_config is None else policy.method_config.method}
                          for name, policy in bank.policies.items()},
                "active": state["default"], "failed": bank.failed}

    @app.post("/activate")
    async def activate(request: Request):
        body = await asyncio.to_thread(json_body, await request.body())
        if "task" not in body:
            raise RequestError("missing field 'task': name the task to activate")
        task = task_of(body)
        await asyncio.wrap_future(request.app.state.batcher.call(lambda b: b.activate(task)))
        state["default"] = task
        return {"active": task}

    @app.post("/act")
    async def act(request: Request):
        start = time.perf_counter()
        task, tag, obs, binarize = await asyncio.to_thread(read_act, await request.body())
        answer = await asyncio.wrap_future(request.app.state.batcher.submit(task, obs, binarize))
        latency = time.perf_counter() - start
        metrics.record_act(task, latency, answer.batch_size)
        return {"id": tag, "task": task, "chunk": answer.chunk.tolist(), "action": answer.chunk[0].tolist(),
                "latency_ms": round(latency * 1000, 3), "compute_ms": round(answer.compute_s * 1000, 3),
                "batch_size": answer.batch_size}

    @app.get("/metrics")
    async def get_metrics():
        return metrics.snapshot()

    return app


class Guard:
    """ASGI middleware in front of every route: the shared token, the request size limit (the body
    is read here, bounded, before any route sees it), and the status count for ``/metrics``."""

    def __init__(self, app, token: str | None, max_request_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.token, self.max_bytes, self.metrics = app, token, max_request_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False

        async def counted_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.record_status(message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            given = headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await _reply(counted_send, 401, "missing or wrong token: send the header "
                                                       "'Authorization: Bearer <token>' the server was started with")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(counted_send, 413, f"payload of {declared} bytes is over the server's limit of "
                                                   f"{self.max_bytes} bytes (--max-request-mb); send smaller images")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _reply(counted_send, 413, f"payload is over the server's limit of {self.max_bytes} "
                                                       "bytes (--max-request-mb); send smaller images")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, counted_send)
        except Exception:
            if not started:  # the 500 is sent further out (Starlette's error middleware): count it here
                self.metrics.record_status(500)
            raise


async def _reply(send, status: int, error: str) -> None:
    payload = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def bind(host: str, port: int) -> socket.socket:
    """Take the address now, so that a port in use is reported before anything says it is serving
    (uvicorn listens on this socket once the bank is loaded)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: cannot resolve it ({err}); use an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {err.strerror}; another process (an earlier server?) holds "
                         "the port: stop it or pass another --port") from None
    return sock


def run_server(bank: AdapterBank, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_batch: int = 16, grace_s: float = 10.0,
               max_connections: int = 64, log_level: str = "warning",
               max_instruction_chars: int = MAX_INSTRUCTION_CHARS, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM, on ``sock`` (from ``bind``) or on ``host:port``. A non-loopback
    ``host`` needs a ``token``: the policy moves a robot."""
    import uvicorn

    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} exposes the robot policy beyond this machine; set a shared token "
                         "(--token or VLA_PEFT_SERVE_TOKEN) or bind to 127.0.0.1")
    sock = sock or bind(host, port)
    app = create_app(bank, token=token, max_request_bytes=max_request_bytes, max_batch=max_batch,
                     max_instruction_chars=max_instruction_chars)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            limit_concurrency=max_connections, access_log=False)
    # uvicorn shuts down gracefully on the first SIGINT/SIGTERM, then re-raises the signal to the
    # handlers it found; these make that a normal return (exit code 0) instead of a kill.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum, frame) -> None:
    """The stop signal after uvicorn's graceful shutdown: nothing left to do."""
