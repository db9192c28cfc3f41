"""The HTTP side: OpenAI's /v1/audio/transcriptions, /v1/models, /health and the upload page at /.

The ingress decodes the upload (shared `load_audio`), cuts it into windows with the shared
chunker (`split_long_audio`, the same cut points as batch jobs and rollouts), sends every window
to the model deployment at once (each is its own engine request, decoded alongside every other
request's windows), and joins the answers with the engines' own `join_chunks`. With
`stream=true` the windows' tokens come back as the engine decodes them (`stream_window`) and
leave as `transcript.text.delta` events.
Every failure is one OpenAI-style error object: {"error": {message, type, param, code}}.
Every answer is counted in the ark_serve_* metrics (`RequestMetrics`).

Versions: the served model's version shows in GET /v1/models and, on every transcription, in the
`X-Ark-Model-Version` header (the version of the replicas that answered). A canary (a second
model application, named in this deployment's `user_config`, see CanaryConfig) takes a share of
the requests; a request goes to one model, all its windows with it. Transcriptions are also
counted per version (`ark_serve_model_*`), which the serving dashboard plots side by side.
A window whose replica is lost is resubmitted on another one (serve/windows.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import random
import re
import time
from typing import AsyncIterator, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ark_ray import metrics
from ark_ray.audio import SAMPLE_RATE, AudioError, load_audio
from ark_ray.config import CanaryConfig, load_config
from ark_ray.engines.long_audio import join_chunks, split_long_audio
from ark_ray.serve import formats
from ark_ray.serve.page import render_page
from ark_ray.serve.request_metrics import RequestMetrics
from ark_ray.serve.windows import LOST_REPLICA as _LOST_REPLICA
from ark_ray.serve.windows import ReplicaLost, Target, WindowCall

#: Response header naming the model version(s) that produced a transcription.
VERSION_HEADER = "X-Ark-Model-Version"
MODEL_DEPLOYMENT = "ArkTranscriber"
#: Status counted for a request whose client went away before its answer (nginx's convention).
CLIENT_CLOSED = 499

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")
_FORM_OVERHEAD = 64 * 1024  # room for the non-file fields and multipart boundaries


class ApiError(Exception):
    """An error the client caused or must retry; rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _cancel(calls) -> None:
    """Best-effort cancel of window calls (WindowCall.cancel swallows a call's own failure)."""
    for c in calls:
        c.cancel()


def _overloaded() -> ApiError:
    return ApiError(503, "The server is at capacity; retry shortly.", type="server_error",
                    code="overloaded", headers={"Retry-After": "1"})


def _lost(e: ReplicaLost) -> ApiError:
    return ApiError(503, f"The transcription could not finish: {e}; retry shortly.", type="server_error",
                    code="replica_lost", headers={"Retry-After": "1"})


# Helpers the routes call live above the class: @serve.ingress pickles the routes as the class is defined.
def _versions(results: list[dict], target: Target) -> str:
    """The model versions that produced a request's windows (two only while a rollout replaces
    replicas under it), in window order."""
    seen = [r.get("model_version") or target.version for r in results] or [target.version]
    return ",".join(dict.fromkeys(seen))


app = FastAPI(title="ark-ray ARK-ASR transcription", docs_url=None, redoc_url=None)
app.add_middleware(RequestMetrics)  # ark_serve_* metrics for every answer, errors included


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, aborting with 413 as soon as it exceeds `limit` bytes."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"Upload exceeds the {limit - _FORM_OVERHEAD} byte limit.",
                           code="file_too_large", param="file")
        yield chunk


#: A rollout starts new ingress replicas before it stops old ones; a stopping one finishes the
#: HTTP requests it holds (long uploads included) before it exits.
INGRESS_DRAIN_S = 300.0


@serve.deployment(name="ArkIngress", max_surge_percent=100, graceful_shutdown_timeout_s=INGRESS_DRAIN_S)
@serve.ingress(app)
class Ingress:
    def __init__(self, transcriber: DeploymentHandle, model_name: str, *, max_chunk_s: float,
                 max_new_tokens: int, max_upload_mb: float, max_audio_s: float, api_key: Optional[str],
                 model_version: str = "", window_retries: int = 2):
        """Every limit comes from ServeConfig (build_app passes them; no second set of defaults here)."""
        self.stable = Target("stable", model_version, transcriber)
        self.canary: Optional[Target] = None
        self.canary_fraction = 0.0
        self.window_retries = window_retries
        self.transcriber = transcriber
        self.model_name = model_name
        self.max_chunk_s = max_chunk_s
        self.max_new_tokens = max_new_tokens
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.max_audio_s = max_audio_s
        self.api_key = api_key
        self.created = int(time.time())
        self._processor = None
        self._processor_lock = asyncio.Lock()

    def reconfigure(self, user_config: Optional[dict]) -> None:
        """Serve calls this with the deployment's `user_config` (a CanaryConfig), at start and
        whenever it changes, without restarting the replica: it routes a share of the
        transcriptions to the candidate's application, or stops doing so."""
        cfg = load_config(CanaryConfig, overrides=dict(user_config or {}))
        if cfg.app and cfg.fraction > 0:
            handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=cfg.app)
            self.canary, self.canary_fraction = Target("canary", cfg.version or cfg.app, handle), cfg.fraction
        else:
            self.canary, self.canary_fraction = None, 0.0

    def info(self) -> dict:
        """The models this replica routes to (jobs/promote.py reads it through the app's handle)."""
        out = {"model": self.model_name, "version": self.stable.version}
        if self.canary is not None:
            out["canary"] = {"version": self.canary.version, "fraction": self.canary_fraction}
        return out

    # ------------------------------------------------------------------ helpers
    def _pick(self) -> Target:
        """The model a new request goes to (all its windows with it)."""
        if self.canary is not None and random.random() < self.canary_fraction:
            return self.canary
        return self.stable

    def _on_retry(self, call: WindowCall, err: BaseException) -> None:
        metrics.record("ark_serve_window_retries_total", 1, {"version": call.target.version})

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Missing or invalid API key (send `Authorization: Bearer <key>`).",
                           code="invalid_api_key")

    async def _get_processor(self):
        async with self._processor_lock:
            for attempt in range(self.window_retries + 1):
                if self._processor is not None:
                    break
                try:
                    self._processor = await self._call(self.transcriber.processor.remote())
                except _LOST_REPLICA:
                    if attempt == self.window_retries:
                        raise
        return self._processor

    @staticmethod
    async def _call(response):
        try:
            return await response
        except BackPressureError:
            raise _overloaded() from None
        except ReplicaLost as e:
            raise _lost(e) from None

    async def _form(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "Expected a multipart/form-data body with a `file` field.")
        length = request.headers.get("content-length")
        limit = self.max_upload + _FORM_OVERHEAD
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"Upload exceeds the {self.max_upload} byte limit.", code="file_too_large",
                           param="file")
        parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=1, max_fields=64)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, f"Malformed multipart body: {e.message}") from None
        fields: dict = {}
        for key, value in form.multi_items():
            fields.setdefault(key, value)
        return fields

    def _options(self, fields: dict) -> dict:
        def text(name: str, default: Optional[str] = None) -> Optional[str]:
            v = fields.get(name, default)
            if isinstance(v, UploadFile):
                raise ApiError(400, f"`{name}` must be a text field.", param=name)
            return v

        model = text("model")
        if not model:
            raise ApiError(400, "`model` is required.", param="model")
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server has `{self.model_name}`.",
                           code="model_not_found", param="model")
        fmt = text("response_format", "json")
        if fmt not in formats.RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {list(formats.RESPONSE_FORMATS)}, got {fmt!r}.",
                           param="response_format")
        try:
            temperature = float(text("temperature", "0") or 0)
        except ValueError:
            raise ApiError(400, "temperature must be a number.", param="temperature") from None
        if not 0.0 <= temperature <= 2.0:
            raise ApiError(400, "temperature must be between 0 and 2.", param="temperature")
        language = text("language") or None
        if language is not None and not _LANGUAGE.match(language):
            raise ApiError(400, f"language must be an ISO-639-1 code such as `en`, got {language!r}.",
                           param="language")
        stream = (text("stream", "false") or "false").lower()
        if stream not in ("true", "false", "1", "0"):
            raise ApiError(400, "stream must be true or false.", param="stream")
        stream_on = stream in ("true", "1")
        if stream_on and fmt not in ("json", "text"):
            raise ApiError(400, "stream=true needs response_format json or text.", param="stream")
        grains = [fields[k] for k in ("timestamp_granularities[]", "timestamp_granularities") if k in fields]
        if any(g != "segment" for g in grains):
            raise ApiError(400, "Only segment timestamps are available (ARK-ASR has no word timing).",
                           param="timestamp_granularities[]")
        max_tokens = text("max_completion_tokens") or None
        if max_tokens is not None:
            if not max_tokens.isdigit() or not 1 <= int(max_tokens) <= self.max_new_tokens:
                raise ApiError(400, f"max_completion_tokens must be an integer in [1, {self.max_new_tokens}].",
                               param="max_completion_tokens")
        # `prompt` is accepted for client compatibility but not used: ARK-ASR was trained with
        # one fixed instruction, and another one would change what the model transcribes.
        text("prompt")
        return {"response_format": fmt, "temperature": temperature, "language": language, "stream": stream_on,
                "max_new_tokens": int(max_tokens) if max_tokens else self.max_new_tokens}

    async def _audio(self, fields: dict) -> np.ndarray:
        upload = fields.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "`file` (the audio upload) is required.", param="file")
        data = await upload.read()
        await upload.close()
        if len(data) > self.max_upload:
            raise ApiError(413, f"Upload exceeds the {self.max_upload} byte limit.", code="file_too_large",
                           param="file")
        try:
            return await asyncio.to_thread(load_audio, data, max_duration_s=self.max_audio_s)
        except AudioError as e:
            raise ApiError(400, f"Cannot use the audio ({e.reason}): {e.message}", code=e.reason,
                           param="file") from None

    def _submit(self, target: Target, pieces, opts: dict, stream: bool = False) -> list[WindowCall]:
        """Send every window; the handle may refuse one (queue full) right here or when awaited."""
        calls: list[WindowCall] = []
        try:
            for i, p in enumerate(pieces):
                item = {"samples": p.samples, "temperature": opts["temperature"],
                        "max_new_tokens": opts["max_new_tokens"], "logprobs": opts["response_format"] == "verbose_json"}
                calls.append(WindowCall(target, item, stream=stream, retries=self.window_retries,
                                        on_retry=self._on_retry, label=f"window {i + 1}/{len(pieces)}"))
        except BackPressureError:
            _cancel(calls)
            raise _overloaded() from None
        return calls

    @staticmethod
    async def _next(call: WindowCall) -> dict:
        """The next part of a streamed window ({"delta": ids}, {"done": result} or RESTART)."""
        try:
            return await call.next_part()
        except BackPressureError:
            raise _overloaded() from None
        except ReplicaLost as e:
            raise _lost(e) from None
        except StopAsyncIteration:
            raise ApiError(500, "The model replica ended a window without a result.", type="server_error") from None

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse)
    def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(render_page(self.model_name, needs_key=bool(self.api_key),
                                        base=request.scope.get("root_path", "")))

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    def models(self, request: Request) -> dict:
        """OpenAI's model list; `version` is the served model's (extra fields are allowed in
        OpenAI's Model object), `canary` the candidate taking a share of requests, if any."""
        self._authorize(request)
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ark-ray",
                 "version": self.stable.version}
        if self.canary is not None:
            model["canary"] = {"version": self.canary.version, "fraction": self.canary_fraction}
        return {"object": "list", "data": [model]}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        self._authorize(request)
        fields = await self._form(request)
        opts = self._options(fields)
        wave = await self._audio(fields)
        request.state.audio_s = len(wave) / SAMPLE_RATE   # counted by RequestMetrics if this succeeds
        processor = await self._get_processor()
        pieces, owners = await asyncio.to_thread(split_long_audio, [wave], self.max_chunk_s)
        target, t0 = self._pick(), time.perf_counter()
        status = 500
        try:
            calls = self._submit(target, pieces, opts, stream=opts["stream"])
            if opts["stream"]:
                try:
                    first = await self._next(calls[0])  # errors before the first byte keep their status code
                except BaseException:
                    _cancel(calls)
                    raise
                status = 0   # the stream records its own outcome when it ends
                return StreamingResponse(self._stream(wave, pieces, owners, calls, first, processor, target, t0),
                                         media_type="text/event-stream", headers={VERSION_HEADER: target.version})
            try:
                results = await asyncio.gather(*(self._call(c.result()) for c in calls))
            except BaseException:
                _cancel(calls)
                raise
            t = join_chunks([wave], pieces, owners, [[r] for r in results], 1, processor)[0]
            stats = [formats.SegmentStats(formats.avg_logprob(r["token_logprobs"]), opts["temperature"])
                     for r in results]
            body, media = formats.render(t, opts["response_format"], stats, opts["language"])
            status = 200
            return Response(body, media_type=media, headers={VERSION_HEADER: _versions(results, target)})
        except ApiError as e:
            status = e.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_CLOSED
            raise
        finally:
            if status:
                metrics.record_model_request(target.version, status, time.perf_counter() - t0)

    async def _stream(self, wave, pieces, owners, calls, first, processor, target: Target,
                      t0: float) -> AsyncIterator[str]:
        """`transcript.text.delta` events as tokens are decoded, then `transcript.text.done`.

        Each delta is what new tokens add to the text decoded so far (all windows before, then
        this window's tokens), held back where a later token could still change it (an
        incomplete UTF-8 character, a possible `<|...|>` marker), so the deltas add up to the
        final text, which `done` carries decoded exactly as the non-streaming answer.
        """
        results: list[dict] = []
        eos = processor.token_ids.eos
        before: list[int] = []          # tokens of the finished windows, their EOS dropped
        shown = ""
        part = first
        status = 500
        try:
            for gen in calls:
                window: list[int] = []
                while True:
                    part = part if part is not None else await self._next(gen)
                    if "restart" in part:     # resubmitted on another replica: its tokens start over
                        window, part = [], None
                        continue
                    if "done" in part:
                        break
                    window += part["delta"]
                    text = formats.stable_prefix(processor.decode(before + window)[0])
                    if text.startswith(shown) and len(text) > len(shown):
                        yield formats.sse(formats.delta_event(text[len(shown):]))
                        shown = text
                    part = None
                results.append(part["done"])
                part = None
                ids = list(results[-1]["token_ids"])
                before += ids[:-1] if ids and ids[-1] == eos else ids
                text = formats.stable_prefix(processor.decode(before)[0])   # engines that do not stream tokens
                if text.startswith(shown) and len(text) > len(shown):
                    yield formats.sse(formats.delta_event(text[len(shown):]))
                    shown = text
            t = join_chunks([wave], pieces, owners, [[r] for r in results], 1, processor)[0]
            if t.text.startswith(shown) and len(t.text) > len(shown):
                yield formats.sse(formats.delta_event(t.text[len(shown):]))
            yield formats.sse(formats.done_event(t, sum(len(r["prompt_ids"]) for r in results)))
            yield "data: [DONE]\n\n"
            status = 200
        except ApiError as e:
            status = e.status
            yield formats.sse({"type": "error", "error": json.loads(e.response().body)["error"]})
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_CLOSED
            raise
        finally:
            _cancel(calls[len(results):])
            metrics.record_model_request(target.version, status, time.perf_counter() - t0)

