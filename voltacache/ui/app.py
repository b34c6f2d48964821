"""The web page over a served deployment: a small ASGI app (Starlette) and one static page.

Why not Gradio: the page must work offline, and Gradio fetches fonts from a CDN and reports
analytics unless told otherwise, pulls in a large dependency tree, and owns the layout. A static
page with 150 lines of JavaScript, and four JSON endpoints over voltacache's own Client, is all
this needs: the server holds no state, and everything the page shows comes through Triton.

Endpoints (JSON; a bad request gets 400 and {"error": message}, an unreachable server 502):
  GET  /api/recommend?q=PARTIAL&top=N   the distinct stored prompts nearest a partial prompt
  GET  /api/gallery?q=PROMPT&top=N      the stored images nearest a prompt (newest without one)
  POST /api/generate {prompt, steps, seed, guidance, scheduler, negative_prompt, cache_interval,
                      cache_schedule}   through the served ensemble
  GET  /api/defaults                    the request's defaults and the schedulers, for the form
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..cache.search import DEFAULT_TOP, SearchQuery
from ..errors import InvalidRequest, ServerFailed, VoltacacheError
from ..request import Request
from ..schedulers import SCHEDULERS

STATIC = Path(__file__).parent / "static"
RECOMMENDATIONS = 5
# below this a stored prompt is no suggestion (MiniLM: unrelated prompts score about 0.1, a shared
# subject 0.5 and up); the API returns every score, the page shows only these
RECOMMEND_FROM = 0.3
THUMBNAIL = 256  # the gallery's images: the longest side, in pixels
# what the form sends; the last three come from a gallery image, so that its own request is repeated
GENERATE_FIELDS = (
    "prompt",
    "steps",
    "seed",
    "guidance",
    "scheduler",
    "negative_prompt",
    "cache_interval",
    "cache_schedule",
)


def png(pixels) -> str:
    """uint8 (height, width, 3) as a data: URL, which the page shows without another request."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def number(params, name: str, default: int) -> int:
    value = params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} {value!r}: a whole number") from None


def make_app(client) -> Starlette:
    """The page and its endpoints over `client` (voltacache.serving.client.Client)."""

    def answer(work):
        """`work()` as JSON: a request's fault 400, a server that does not answer 502, one line each."""
        try:
            return JSONResponse(work())
        except ServerFailed as e:
            return JSONResponse({"error": str(e)}, status_code=502)
        except VoltacacheError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    def recommend(request: HttpRequest):
        def work():
            text = request.query_params.get("q", "")
            if not text.strip():
                return {"prompts": []}
            found = client.search(SearchQuery("prompts", text, number(request.query_params, "top", RECOMMENDATIONS)))
            near = [f for f in found if f.similarity >= RECOMMEND_FROM]
            return {"prompts": [{"prompt": f.prompt, "similarity": f.similarity} for f in near]}

        return answer(work)

    def gallery(request: HttpRequest):
        def work():
            text = request.query_params.get("q", "")
            top = number(request.query_params, "top", DEFAULT_TOP)
            query = (
                SearchQuery("images", text, top, THUMBNAIL)
                if text.strip()
                else SearchQuery("newest", "", top, THUMBNAIL)
            )
            return {"images": [f.record() | {"src": png(f.image)} for f in client.search(query)]}

        return answer(work)

    async def generate(request: HttpRequest):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": 'the body is not JSON: send {"prompt": ...}'}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": 'the body is not a JSON object: send {"prompt": ...}'}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(answer, lambda: generated(body))

    def generated(body: dict) -> dict:
        unknown = sorted(set(body) - set(GENERATE_FIELDS))
        if unknown:
            raise InvalidRequest(f"{unknown[0]}: not a field; send {', '.join(GENERATE_FIELDS)}")
        if not isinstance(body.get("prompt"), str):
            raise InvalidRequest("prompt: say what the image should show (a string)")
        fields = {k: v for k, v in body.items() if v not in (None, "")}
        for name in ("steps", "seed", "cache_interval"):
            if name in fields:
                fields[name] = number(fields, name, 0)
        if "guidance" in fields:
            try:
                fields["guidance"] = float(fields["guidance"])
            except (TypeError, ValueError):
                raise InvalidRequest(f"guidance {fields['guidance']!r}: a number") from None
        started = time.perf_counter()
        result = client.generate(Request(**fields))
        return {
            "image": png(result.images[0]),
            "cache": result.cache,
            "similarity": result.similarity,
            "steps_computed": result.steps_computed,
            "seed": result.seed,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def defaults(request: HttpRequest):
        return JSONResponse(
            {
                "steps": Request.steps,
                "guidance": Request.guidance,
                "scheduler": Request.scheduler,
                "schedulers": list(SCHEDULERS),
            }
        )

    def page(request: HttpRequest):
        return FileResponse(STATIC / "index.html")

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/defaults", defaults),
            Route("/api/recommend", recommend),
            Route("/api/gallery", gallery),
            Route("/api/generate", generate, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )


def serve_page(client, host: str, port: int) -> None:
    """Serve the page until Ctrl-C (uvicorn; its access log off: the page asks on every keystroke). A
    start that fails (the port taken since it was checked) is one line, and nothing is left running."""
    import uvicorn

    from ..errors import ServerFailed

    config = uvicorn.Config(make_app(client), host=host, port=port, log_level="critical", access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit on a failed bind
        pass
    if not server.started:
        raise ServerFailed(f"--port {port}: the page could not start on {host}:{port} (taken meanwhile?); pick another")
