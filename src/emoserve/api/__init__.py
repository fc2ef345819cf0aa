"""The HTTP API (FastAPI + uvicorn) over one `serving.Service`; it mounts the web UI (`webui.mount`).

Its modules, leaves first: schemas (the documented shapes), uploads (reading a request's audio), errors
(rendering and counting errors), middleware, recognize and timeline (the two routes that take audio),
app (the app, its probes and lifespan, the server).
"""
