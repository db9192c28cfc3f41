"""Count every HTTP request the ingress answers, as ark_serve_* metrics (ark_ray.metrics).

Why an ASGI middleware and not a call in each route: it sees every answer, including the
error objects that exception handlers render (400/401/404/413/503) and routes that do not
exist, and it stops the clock at the last body byte, so a streamed transcription counts its
whole duration. The route label is the matched route's template (never the raw URL, which a
client could vary without limit); a request no route matches counts as "unmatched".

A route reports the audio it transcribed by setting `request.state.audio_s`; it is counted
only if the answer's status is below 400. Requests that Serve's proxy turns away before they
reach a replica (its own 503s when every ingress replica is full) are not seen here.
"""
from __future__ import annotations

import time

from ark_ray import metrics

UNMATCHED = "unmatched"


class RequestMetrics:
    """Pure ASGI middleware: `app.add_middleware(RequestMetrics)`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception before the response started becomes Starlette's 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            audio_s = (scope.get("state") or {}).get("audio_s")
            metrics.record_serve_request(route, status, time.perf_counter() - t0, audio_s)
