"""The routes' warm-up: before "ready", the server sends its own requests over loopback to every route a
user hits first, so that the first outside request costs what the next ones do.

The engine's warm-up (serving/warmup.py) has run the model; what it leaves cold is the HTTP path: uvicorn's
first parse of a request, the multipart parser, the decoders reading an upload's bytes, the response
models, the NDJSON stream, and in the web UI Gradio's queue, the result card, the charts and the saved
folder. Each request here is checked as the engine's warm-up checks its outputs (a score per label,
summing to 1); a route that fails fails the start-up, with the route named.

    POST /v1/recognize                         utterance
    POST /v1/recognize?granularity=frame&embedding=true
    POST /v1/timeline                          JSON, and again as NDJSON
    GET  /v1/stream                            a WebSocket: the clip as PCM, `end`, its segment and summary
    GET  /v1/model
    the UI's /recognize (when the UI is mounted: Gradio's config, upload, queue join and event stream,
                        as a browser's click); its saved folder is deleted afterwards

Nothing is imported here until the warm-up runs (the server's import stays light). The requests carry
`WARMUP_HEADER`, so that the metrics leave them out while the service is not ready.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.api.model import MODEL
from emoserve.api.recognize import RECOGNIZE
from emoserve.api.timeline import TIMELINE
from emoserve.constants import SAMPLE_RATE, STREAM_PATH
from emoserve.errors import WarmupError

if TYPE_CHECKING:
    import httpx
    from starlette.types import Scope

    from emoserve.serving.service import Service

log = logging.getLogger(__name__)

WARMUP_HEADER = "x-emoserve-warmup"
WARMUP_HEADER_BYTES = WARMUP_HEADER.encode()
CLIP_S = 0.6  # the model path is warm already: a short clip is enough for the HTTP path (and cheap)
REQUEST_TIMEOUT_S = 120.0
RECOGNIZE_FRAMES = f"{RECOGNIZE}?granularity=frame&embedding=true"
API_ROUTES = (  # what warm_routes sends, in order, each answered 200 and checked
    f"POST {RECOGNIZE}",
    f"POST {RECOGNIZE_FRAMES}",
    f"POST {TIMELINE}",
    f"POST {TIMELINE} (NDJSON)",
    f"GET {STREAM_PATH} (WebSocket)",
    f"GET {MODEL}",
)
UI_ROUTE = "the web UI's recognise"
SAVED_PREFIX = "saved to: "  # the UI log's line that names the recognition's saved folder (webui/clip.py)


def loopback_url(host: str, port: int) -> str:
    """Where this server answers itself: the loopback address of the family it listens on."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def warm_routes(service: Service, ui_mounted: Callable[[], bool], base_url: str) -> None:
    """Every route once at `base_url` (the server's own), checked (WarmupError names the route that
    failed); the UI's last, once `ui_mounted()` (which waits for its mount) says it is there. The
    service's `Hooks.warm_routes`, with `base_url` bound."""

    from emoserve.serving.warmup import check_scores

    started = time.monotonic()
    wav = warmup_wav(service)
    labels = [label["en"] for label in (service.model_summary or {}).get("labels", [])]
    headers = warmup_headers(service)
    files = {"file": ("warm-up.wav", wav, "audio/wav")}
    with loopback_client(base_url, headers) as client, _transport_errors(base_url):
        recognize, frames, timeline, ndjson, _, model = API_ROUTES
        body = _json(client.post(RECOGNIZE, files=files), recognize)
        check_scores(body["scores"], labels, f"warm-up of {recognize}")
        body = _json(client.post(RECOGNIZE_FRAMES, files=files), frames)
        _check_frames(body, labels, f"warm-up of {frames}")
        body = _json(client.post(TIMELINE, files=files), timeline)
        _check_timeline(body["segments"], labels, f"warm-up of {timeline}")
        reply = client.post(TIMELINE, files=files, headers={"accept": "application/x-ndjson"})
        lines = [json.loads(line) for line in _ok(reply, ndjson).text.splitlines()]
        if not lines or lines[-1].get("type") != "summary":
            raise WarmupError(f"warm-up of {ndjson}: no summary line at the end: {lines}")
        segments = [line for line in lines if line.get("type") == "segment"]
        _check_timeline(segments, labels, f"warm-up of {ndjson}")
        _warm_stream(base_url, wav, headers, labels)
        _json(client.get(MODEL), model)
    routes = list(API_ROUTES)
    if ui_mounted():
        _warm_ui(service, base_url, wav, headers)
        routes.append(UI_ROUTE)
    log.info("routes warmed up over loopback in %.2f s: %s", time.monotonic() - started, "; ".join(routes))


def loopback_client(base_url: str, headers: dict[str, str]) -> httpx.Client:
    """An HTTP client for the server's own address: nothing from the environment (no proxy, and no CA
    bundle: `SSL_CERT_FILE` naming a missing file, a host's variable leaking into a container, must not
    stop a server that only talks to itself over plain HTTP)."""
    import httpx

    return httpx.Client(
        base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S, trust_env=False, verify=False
    )


def is_warmup_request(scope: Scope) -> bool:
    return any(name == WARMUP_HEADER_BYTES for name, _ in scope.get("headers", ()))


@contextlib.contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    import httpx

    try:
        yield
    except httpx.TransportError as error:
        raise WarmupError(
            f"warm-up: the server could not answer itself at {base_url}: {error or type(error).__name__} "
            "(it sends its own requests to --host/--port before ready)"
        ) from error


def warmup_headers(service: Service) -> dict[str, str]:
    headers = {WARMUP_HEADER: "1"}
    if service.settings.api_key:
        headers["authorization"] = f"Bearer {service.settings.api_key}"
    return headers


def warmup_wav(service: Service) -> bytes:
    """The first CLIP_S of the shortest bundled clip, as a 16-bit WAV upload."""
    import soundfile as sf

    from emoserve.audio.decode import load_audio

    clips = [load_audio(path, max_seconds=None) for path in service.examples]
    samples = min(clips, key=lambda clip: len(clip.samples)).samples[: int(CLIP_S * SAMPLE_RATE)]
    out = io.BytesIO()
    sf.write(out, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _ok(reply: httpx.Response, route: str) -> httpx.Response:
    if reply.status_code != 200:
        reply.read()  # a streamed reply's body, for the message
        raise WarmupError(f"warm-up of {route}: HTTP {reply.status_code}: {reply.text[:500]}")
    return reply


def _json(reply: httpx.Response, route: str) -> Any:
    return _ok(reply, route).json()


def _check_frames(body: dict[str, Any], labels: Sequence[str], where: str) -> None:
    from emoserve.serving.warmup import check_scores

    check_scores(body["scores"], labels, where)
    if not body.get("frames"):
        raise WarmupError(f"{where}: no frames in the answer")
    for frame in body["frames"]:
        check_scores(frame["scores"], labels, f"{where}, frame at {frame['start_s']:g} s")
    if not body.get("embedding"):
        raise WarmupError(f"{where}: no embedding in the answer")


def _check_timeline(segments: Sequence[Mapping[str, Any]], labels: Sequence[str], where: str) -> None:
    from emoserve.serving.warmup import check_scores

    for segment in segments:
        check_scores(segment["scores"], labels, f"{where}, segment at {segment['start_s']:g} s")


def _warm_stream(base_url: str, wav: bytes, headers: dict[str, str], labels: Sequence[str]) -> None:
    """GET /v1/stream as a client streams: the clip's samples, then a pause that closes its utterance,
    then `end`; every message until the summary, each segment's scores checked."""
    import numpy as np
    import soundfile as sf
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    from emoserve.inference.protocol import End, StreamMessage

    where = f"warm-up of GET {STREAM_PATH}"
    samples, _ = sf.read(io.BytesIO(wav), dtype="int16")
    pcm = np.concatenate([samples, np.zeros(SAMPLE_RATE, np.int16)]).astype("<i2").tobytes()
    url = "ws" + base_url.removeprefix("http") + STREAM_PATH
    messages: list[StreamMessage] = []
    try:
        with connect(url, additional_headers=headers, open_timeout=REQUEST_TIMEOUT_S) as ws:
            messages.append(json.loads(ws.recv(REQUEST_TIMEOUT_S)))
            ws.send(pcm)
            ws.send(json.dumps(End(type="end")))
            while messages[-1]["type"] not in ("summary", "error"):
                messages.append(json.loads(ws.recv(REQUEST_TIMEOUT_S)))
    except (OSError, TimeoutError, WebSocketException) as error:
        raise WarmupError(f"{where}: {error or type(error).__name__}") from error
    if messages[0]["type"] != "ready" or messages[-1]["type"] != "summary":
        raise WarmupError(f"{where}: not ready ... summary: {messages}")
    _check_timeline([m for m in messages if m["type"] == "segment"], labels, where)


def _warm_ui(service: Service, base_url: str, wav: bytes, headers: dict[str, str]) -> None:
    """The web UI's recognise as a browser's click sends it: Gradio's config, the clip's upload, a queue
    join for the Recognize button's event and its result from the queue's event stream (a whole
    gradio_client would spend most of a second on its own start: its API info, its threads). The
    recognition's saved folder, which no user asked for, is deleted afterwards."""
    import uuid

    where = "warm-up of the web UI's recognise"
    with loopback_client(base_url, headers) as client:
        config = _json(client.get("/config"), "GET /config")
        event = next((d for d in config["dependencies"] if d.get("api_name") == "recognize"), None)
        if event is None:
            raise WarmupError(f"{where}: the UI's config has no /recognize event")
        api = config.get("api_prefix", "/gradio_api")
        upload = {"files": ("warm-up.wav", wav, "audio/wav")}
        paths = _json(client.post(f"{api}/upload", files=upload), f"POST {api}/upload")
        audio = {"path": paths[0], "orig_name": "warm-up.wav", "meta": {"_type": "gradio.FileData"}}
        data: list[Any] = [audio, "utterance", False]
        if len(event["inputs"]) > len(data):  # the head dropdown of a server with heads
            from emoserve.webui.clip import NO_HEAD

            data.append(NO_HEAD)
        session = uuid.uuid4().hex
        join = {
            "data": data,
            "fn_index": event["id"],
            "trigger_id": event["targets"][0][0],
            "session_hash": session,
            "event_data": None,
        }
        _ok(client.post(f"{api}/queue/join", json=join), f"POST {api}/queue/join")
        outputs = _queue_result(client, f"{api}/queue/data", session, where)
    log_text = outputs[-2]
    if not isinstance(log_text, str):
        raise WarmupError(f"{where}: no log text among its outputs: {outputs}")
    for line in log_text.splitlines():
        saved = Path(line.removeprefix(SAVED_PREFIX)) if line.startswith(SAVED_PREFIX) else None
        if saved is not None and saved.parent == Path(service.settings.outputs_dir) and saved.is_dir():
            shutil.rmtree(saved, ignore_errors=True)


def _queue_result(client: httpx.Client, url: str, session: str, where: str) -> list[Any]:
    """The outputs of the one event `session` joined, read from Gradio's event stream (server-sent
    events, one JSON message per `data:` line) until its `process_completed`."""
    with client.stream("GET", url, params={"session_hash": session}) as reply:
        _ok(reply, f"GET {url}")
        for line in reply.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line.removeprefix("data:"))
            if message.get("msg") == "process_completed":
                if not message.get("success"):
                    raise WarmupError(f"{where}: {message.get('output', {}).get('error') or message}")
                return list(message["output"]["data"])
    raise WarmupError(f"{where}: the event stream ended before the result")
