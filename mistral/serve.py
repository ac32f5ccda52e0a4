"""`mistral serve MODEL_DIR`: an OpenAI-compatible HTTP server on the continuous-batching engine.

Two threads. The engine's (`Worker`) runs forward calls one after another while any
request runs or waits (mistral/engine.py), and hands each step's tokens over. The HTTP
side (Starlette on uvicorn, the optional extra `[serve]`) checks each request
(mistral/openai_api.py), hands it to the worker, and turns the tokens into text, whole
or as server-sent events. A request whose client has gone, or whose text reached a stop
string, is ended, and its cache row is free for the next call.

    GET  /health                 {"status": "ok", "running": 3, "waiting": 0}
    GET  /v1/models              the one model, named after its folder (or --model_name)
    POST /v1/completions         prompt(s) -> text
    POST /v1/chat/completions    messages in the folder's chat format -> text
"""

import asyncio
import contextlib
import functools
import json
import queue
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from mistral.engine import Engine, Request
from mistral.errors import MistralError
from mistral.openai_api import BadRequest, Choice, Params, chat_params, completion_params, new_id, now, parse_json, usage
from mistral.text import Completion
from mistral.tokenizer import ChatTokenizer

MAX_BODY = 8 << 20  # bytes of a request body: prompts of a million characters, not a way to exhaust memory


@dataclass
class Update:
    """What a step brought one request, copied in the engine's thread."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    finish_reason: Optional[str]  # None while it runs; "error" when the engine failed
    error: Optional[str] = None


class Plans:
    """A tensor-parallel server's messages from rank 0, which alone serves HTTP, to the other
    ranks: before each forward call, the requests that join and those that end, and whether
    the call runs. Idle, rank 0 sends an empty plan every HEARTBEAT_S, so that the others,
    which wait for one at most MISTRAL_TIMEOUT_S, end when rank 0 is gone, not when nobody asks.
    Over a gloo group of its own: plans are small Python objects, on the host."""

    HEARTBEAT_S = 1.0

    def __init__(self) -> None:
        import torch.distributed as dist

        from mistral import parallel

        self.dist, self.answered = dist, parallel.answered
        self.group = dist.new_group(backend="gloo", timeout=parallel.timeout())

    def send(self, plan: Optional[tuple[list, bool]]) -> None:
        self.dist.broadcast_object_list([plan], src=0, group=self.group)

    def receive(self) -> Optional[tuple[list, bool]]:
        """(what happens before the call, whether it runs), or None: the server has ended."""
        message: list[Any] = [None]
        with self.answered():
            self.dist.broadcast_object_list(message, src=0, group=self.group)
        return message[0]


def follow(engine: Engine, plans: Plans) -> None:
    """A rank > 0 of a tensor-parallel server: run the calls rank 0 plans, on the same requests, until it ends.
    Signals are rank 0's to act on (mistral's launcher sends them to every rank)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    requests: dict[int, Request] = {}
    while (plan := plans.receive()) is not None:
        changes, runs = plan
        for kind, item in changes:
            if kind == "submit":
                r = engine.submit(Request(**item))
                requests[r.arrival] = r
            else:
                arrival, reason = item
                engine.finish(requests[arrival], reason)
        if runs:
            try:
                engine.step()
            except MistralError:  # NaN logits: rank 0 failed the same read, and ends every request (`_fail_all`)
                for r in requests.values():
                    engine.finish(r, "error")
        requests = {a: r for a, r in requests.items() if not r.finished}


class Worker:
    """The engine's thread: it takes requests and ends them between forward calls, and calls
    each request's listener with what every call brought it. With `plans`, every call is
    planned for the other ranks of a tensor-parallel server first."""

    def __init__(self, engine: Engine, plans: Optional[Plans] = None):
        self.engine, self.plans = engine, plans
        self.inbox: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self.wake = threading.Event()
        self.listeners: dict[Request, Callable[[Update], None]] = {}
        self.seen: dict[Request, int] = {}  # tokens already handed over, per request
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="mistral-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request, listener: Callable[[Update], None]) -> None:
        self.inbox.put(("submit", (request, listener)))
        self.wake.set()

    def finish(self, request: Request, reason: str = "cancelled") -> None:
        self.inbox.put(("finish", (request, reason)))
        self.wake.set()

    def finish_all(self) -> None:
        """End every request (the grace after SIGTERM is over)."""
        self.inbox.put(("finish_all", None))
        self.wake.set()

    def close(self) -> None:
        """End every request and the thread."""
        self.closing = True
        self.wake.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            if not self.engine.busy:
                self.wake.wait(Plans.HEARTBEAT_S if self.plans else None)
                self.wake.clear()
            changes = self._take_inbox()
            if self.closing:
                for request in list(self.listeners):
                    self.engine.finish(request)
                    self._tell(request)
                if self.plans:
                    self.plans.send(None)
                return
            runs = self.engine.busy
            if self.plans:
                self.plans.send((changes, runs))
            if not runs:
                continue
            try:
                changed = self.engine.step()
            except Exception as e:  # a model that fails (NaN logits, out of memory) fails what runs, not the server
                self._fail_all(f"{type(e).__name__}: {e}" if not isinstance(e, MistralError) else str(e))
                continue
            for request in changed:
                self._tell(request)

    def _take_inbox(self) -> list[tuple[str, Any]]:
        """Apply what the HTTP side asked for; returns it as a plan's changes."""
        changes: list[tuple[str, Any]] = []

        def finish(request: Request, reason: str) -> None:
            self.engine.finish(request, reason)
            changes.append(("finish", (request.arrival, reason)))

        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return changes
            if kind == "submit":
                request, listener = item
                self.listeners[request], self.seen[request] = listener, 0
                self.engine.submit(request)  # checked in the HTTP thread already
                changes.append(("submit", request.options()))
                if request.finished:  # max_tokens 0
                    self._tell(request)
            elif kind == "finish":
                request, reason = item
                if request in self.listeners:
                    finish(request, reason)
                    self._forget(request)
            else:  # finish_all
                for request in list(self.listeners):
                    finish(request, "cancelled")
                    self._tell(request)

    def _tell(self, request: Request) -> None:
        seen = self.seen[request]
        update = Update(request.tokens[seen:], request.logprobs[seen:], request.top[seen:], request.finish_reason)
        self.seen[request] = len(request.tokens)
        listener = self.listeners[request]
        if request.finished:
            self._forget(request)
        listener(update)

    def _fail_all(self, message: str) -> None:
        for request in list(self.listeners):
            self.engine.finish(request, "error")
            listener = self.listeners[request]
            self._forget(request)
            listener(Update([], [], [], "error", message))

    def _forget(self, request: Request) -> None:
        self.listeners.pop(request, None)
        self.seen.pop(request, None)


class Server:
    """What the HTTP handlers share: the model's name, tokenizer, engine and worker, and the admission count."""

    def __init__(self, engine: Engine, tokenizer: ChatTokenizer, model_name: str, max_queue: int, plans: Optional[Plans] = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.worker = Worker(engine, plans)
        self.max_waiting = len(engine.rows) + max_queue  # requests running or waiting
        # Admitted requests, counted from admission (several may arrive before any runs) until
        # they finish; those of a stream that never began (its client gone first) vanish with it.
        self.admitted: "weakref.WeakSet[Request]" = weakref.WeakSet()
        self.closing = False

    @property
    def outstanding(self) -> int:
        return sum(not r.finished for r in list(self.admitted))

    def admit(self, params: Params) -> list[Request]:
        """The engine requests of a checked request (each prompt n times; choice i samples with
        seed + i), if they fit the context and the server has room for them."""
        out = []
        for prompt in params.prompts:
            max_tokens = params.max_tokens
            if max_tokens is None:  # as many as the context leaves
                max_tokens = max(self.engine.max_context - len(prompt) + 1, 1)
            for _ in range(params.n):
                seed = None if params.seed is None else (params.seed + len(out)) % 2**64
                out.append(Request(prompt, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                                   seed=seed, eos_id=self.tokenizer.eos_id, top_logprobs=params.logprobs or 0))  # fmt: skip
        for r in out:
            try:
                self.engine.check(r)
            except MistralError as e:
                raise BadRequest(str(e), "messages" if params.chat else "prompt", "context_length_exceeded") from None
        if self.closing:
            raise BadRequest("the server is shutting down", status=503)
        if len(out) > self.max_waiting:
            param = "n" if params.n > 1 else "messages" if params.chat else "prompt"
            raise BadRequest(f"{len(out)} choices (prompts x n) are more than this server runs and queues at once ({self.max_waiting})", param)
        if self.outstanding + len(out) > self.max_waiting:
            raise BadRequest(f"the server is busy ({self.outstanding} requests run or wait): try again later", code="busy", status=429)
        self.admitted.update(out)
        return out

    async def run(self, params: Params, requests: list[Request]) -> AsyncIterator[tuple[Choice, str]]:
        """Run a request's admitted engine requests; yields (choice, new text) as the engine's steps
        come in, until every choice has finished. Leaving early (a client gone) ends those still running."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        choices = [Choice(i, Completion(self.tokenizer, r.prompt), params.stop, params.logprobs is not None) for i, r in enumerate(requests)]
        running = set(range(len(requests)))
        try:
            for i, r in enumerate(requests):
                self.worker.submit(r, functools.partial(_deliver, loop, updates, i))
            while running:
                i, update = await updates.get()
                if update.error is not None:
                    raise BadRequest(f"the model failed: {update.error}", code="model_error", status=500)
                if i not in running:  # news sent for a choice that a stop string ended, before the engine heard of it
                    continue
                choice = choices[i]
                text = choice.add(update.tokens, update.logprobs, update.top, update.finish_reason)
                if choice.finish_reason is not None:
                    running.discard(i)
                    if update.finish_reason is None:  # a stop string: the engine still runs it
                        self.worker.finish(requests[i], "stop")
                yield choice, text
        finally:
            for i in running:  # the client left, or the model failed
                self.worker.finish(requests[i])

    async def answer(self, params: Params, requests: list[Request]) -> dict:
        """The whole answer's body."""
        choices: dict[int, Choice] = {}
        texts: dict[int, list[str]] = {}
        async for choice, text in self.run(params, requests):
            choices[choice.index] = choice
            texts.setdefault(choice.index, []).append(text)
        body = []
        for i in sorted(choices):
            c, text = choices[i], "".join(texts[i])
            entry: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason}
            logprobs = None if params.logprobs is None else c.logprobs_body(self.tokenizer, params.chat, 0, c.covered())
            if params.chat:
                entry.update(message={"role": "assistant", "content": text}, logprobs=logprobs)
            else:
                entry.update(text=text, logprobs=logprobs)
            body.append(entry)
        return {
            "id": new_id("chatcmpl" if params.chat else "cmpl"), "object": "chat.completion" if params.chat else "text_completion",
            "created": now(), "model": self.model_name, "choices": body,
            "usage": usage(sum(map(len, params.prompts)), sum(len(c.completion.tokens) for c in choices.values())),
        }  # fmt: skip

    async def events(self, params: Params, requests: list[Request]) -> AsyncIterator[str]:
        """The answer as server-sent events: a chunk per step and choice, [DONE] last. A failure
        once the stream has begun (the model's) is an event with OpenAI's error body."""
        kind, object_name = ("chatcmpl", "chat.completion.chunk") if params.chat else ("cmpl", "text_completion")
        head = {"id": new_id(kind), "object": object_name, "created": now(), "model": self.model_name}
        chunk = {**head, "usage": None} if params.include_usage else head  # (OpenAI's chunks before the usage chunk say null)
        run = self.run(params, requests)
        choices: dict[int, Choice] = {}
        shown: dict[int, int] = {}  # tokens whose logprobs went out, per choice
        try:
            async for choice, text in run:
                i = choice.index
                if params.chat and i not in choices:
                    yield _event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                choices[i] = choice
                if text or choice.finish_reason is not None:
                    entry: dict[str, Any] = {"index": i, "finish_reason": choice.finish_reason}
                    logprobs = None
                    if params.logprobs is not None:
                        end = choice.covered()
                        logprobs = choice.logprobs_body(self.tokenizer, params.chat, shown.get(i, 0), end)
                        shown[i] = end
                    if params.chat:
                        entry.update(delta={"content": text} if text else {}, logprobs=logprobs)
                    else:
                        entry.update(text=text, logprobs=logprobs)
                    yield _event({**chunk, "choices": [entry]})
        except BadRequest as e:
            yield _event(e.body())
            return
        finally:
            await run.aclose()
        if params.include_usage:
            yield _event({**head, "choices": [], "usage": usage(sum(map(len, params.prompts)), sum(len(c.completion.tokens) for c in choices.values()))})
        yield "data: [DONE]\n\n"


def _deliver(loop: asyncio.AbstractEventLoop, updates: "asyncio.Queue[tuple[int, Update]]", i: int, update: Update) -> None:
    """Hand an update to the HTTP side's loop (from the engine's thread)."""
    try:
        loop.call_soon_threadsafe(updates.put_nowait, (i, update))
    except RuntimeError:  # the loop has closed: nobody listens any more
        pass


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def app(server: Server) -> Any:
    """The Starlette application of `server`."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: BadRequest) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 429 else None)

    async def body_of(http: HTTPRequest) -> dict:
        if int(http.headers.get("content-length") or 0) > MAX_BODY:
            raise BadRequest(f"the request body is larger than {MAX_BODY:,} bytes", status=413)
        raw = b""
        async for piece in http.stream():
            raw += piece
            if len(raw) > MAX_BODY:
                raise BadRequest(f"the request body is larger than {MAX_BODY:,} bytes", status=413)
        return parse_json(raw)

    def endpoint(parse: Callable[[dict, ChatTokenizer, str], Params]) -> Callable:
        async def handle(http: HTTPRequest) -> Any:
            try:
                # Off the event loop: a long prompt takes a while to tokenize, and other requests stream meanwhile.
                params = await asyncio.to_thread(parse, await body_of(http), server.tokenizer, server.model_name)
                requests = server.admit(params)  # before a stream's status line goes out
                if params.stream:
                    return StreamingResponse(server.events(params, requests), media_type="text/event-stream")
                body = await while_connected(http, server.answer(params, requests))
                return JSONResponse(body) if body is not None else Response(status_code=499)  # nginx's "client closed request"
            except BadRequest as e:
                return error(e)

        return handle

    async def while_connected(http: HTTPRequest, answer: Any) -> Optional[dict]:
        """The whole answer, or None if the client leaves first: then its requests end (their rows are free)."""
        task = asyncio.ensure_future(answer)
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()

    async def health(http: HTTPRequest) -> JSONResponse:
        engine = server.engine
        return JSONResponse({"status": "ok", "running": engine.running, "waiting": len(engine.waiting)})

    the_model = {"id": server.model_name, "object": "model", "created": 0, "owned_by": "mistral"}

    async def models(http: HTTPRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [the_model]})

    async def model(http: HTTPRequest) -> JSONResponse:
        name = http.path_params["name"]
        if name != server.model_name:
            return error(BadRequest(f"the model {name!r} does not exist: this server serves {server.model_name!r}", "model", "model_not_found", 404))
        return JSONResponse(the_model)

    async def not_found(http: HTTPRequest, exc: Exception) -> JSONResponse:
        return error(BadRequest(f"no such endpoint: {http.method} {http.url.path}", code="not_found", status=404))

    async def wrong_method(http: HTTPRequest, exc: Exception) -> JSONResponse:
        return error(BadRequest(f"{http.url.path} does not take {http.method}", code="method_not_allowed", status=405))

    async def failed(http: HTTPRequest, exc: Exception) -> JSONResponse:  # our bug: still an OpenAI-style body
        return error(BadRequest(f"internal error: {type(exc).__name__}: {exc}", code="internal_error", status=500))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/completions", endpoint(completion_params), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_params), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: wrong_method, Exception: failed})


def serve(engine: Engine, tokenizer: ChatTokenizer, model_name: str, host: str, port: int, max_queue: int, grace_s: float,
          plans: Optional[Plans] = None) -> None:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C: then accept nothing new, let what runs finish for up to
    grace_s seconds, end the rest, and exit as the signal asks (SystemExit 143 or 130).
    plans: on rank 0 of a tensor-parallel server, the other ranks' messages (they `follow`)."""
    import signal

    import uvicorn

    server = Server(engine, tokenizer, model_name, max_queue, plans)
    signals: list[int] = []

    class HTTPServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own raises the signal again once it has shut down, inside the event
            # loop, where our handler's SystemExit would meet the tasks still ending.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if not signals:  # the first: nothing new from now on; what runs has grace_s to finish
                server.closing = True
                loop.call_soon_threadsafe(loop.call_later, grace_s, server.worker.finish_all)
            signals.append(sig)

    # uvicorn's own limit comes after ours, which ends every request itself (the streams end whole).
    config = uvicorn.Config(app(server), host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=int(grace_s) + 10)  # fmt: skip
    http = HTTPServer(config)

    async def main() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(http.serve())
        while not http.started and not task.done():
            await asyncio.sleep(0.05)
        if http.started:
            bound = http.servers[0].sockets[0].getsockname()
            print(f"mistral serve: {model_name} on http://{bound[0]}:{bound[1]} ({len(engine.rows)} rows)", file=sys.stderr, flush=True)
        try:
            await task
        finally:  # while the loop still runs, so that the last listeners hear the end
            server.closing = True
            await asyncio.to_thread(server.worker.close)

    loop: Any = None
    try:
        asyncio.run(main())
    finally:  # an error on the way (the port in use): the worker, and the other ranks, end too
        server.closing = True
        if server.worker.thread.is_alive():
            server.worker.close()
    if not http.started:
        raise MistralError(f"cannot serve on {host}:{port} (in use, or not an address of this machine?)")
    if signals:
        raise SystemExit(128 + signals[0])


def model_name_of(folder: Path) -> str:
    return folder.resolve().name
