"""Mounting the web UI into an app that is already serving, while the model loads.

`gr.mount_gradio_app` hooks the UI's start-up (its queue and lifespan) into the host app's lifespan, which
has long run by then; so the same start-up is run here by hand, through Gradio's private
`router.lifespan_context` and `run_startup_events`. A Gradio upgrade that changes them breaks this module
alone. Gradio itself is imported only when the UI is mounted, never with this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from starlette.routing import Mount

if TYPE_CHECKING:
    from fastapi import FastAPI

    from emoserve.serving.jobs.worker import Jobs
    from emoserve.serving.service import Service

log = logging.getLogger(__name__)

UI_START_TIMEOUT_S = 60.0


def mount_while_loading(
    app: FastAPI, svc: Service, jobs: Jobs, loop: asyncio.AbstractEventLoop, ui_lifespan: AsyncExitStack
) -> None:
    """On a thread of its own while the model loads and warms up: import Gradio, build the UI (its
    Long-recording tab submitting `jobs`) and mount it at "/" on the running app (served by `loop`; the
    UI's lifespan is entered on `ui_lifespan`, which the app's lifespan closes). "Ready" waits for it,
    so that it means the whole product is up, and costs the slower of the two rather than their sum
    (docs/benchmarks.md section 11 has both orders measured). Until then "/" answers a page that says
    the UI is starting. A UI that fails to mount leaves the HTTP API serving."""
    if svc.phase == "draining":
        return
    started = time.monotonic()
    try:
        from emoserve.webui.app import mount_ui

        mount_ui(app, svc, path="/", jobs=jobs)
        mount = app.router.routes[-1]
        assert isinstance(mount, Mount), "mount_gradio_app appends its Mount"
        asyncio.run_coroutine_threadsafe(start_gradio(mount.app, ui_lifespan), loop).result(
            UI_START_TIMEOUT_S
        )
    except (ImportError, AttributeError) as error:
        svc.ui_error = f"the web UI is not available: {error}"
        log.warning("%s; the HTTP API works without it", svc.ui_error)
        return
    except Exception as error:
        svc.ui_error = f"the web UI failed to start: {error}"
        log.exception("%s; the HTTP API works without it", svc.ui_error)
        return
    log.info("web UI mounted at / in %.2f s", time.monotonic() - started)


async def start_gradio(gradio_app: Any, ui_lifespan: AsyncExitStack) -> None:
    """What mount_gradio_app's lifespan hook does at start-up, which this app has passed already."""
    await ui_lifespan.enter_async_context(gradio_app.router.lifespan_context(gradio_app))
    blocks = gradio_app.get_blocks()
    blocks.run_startup_events()
    await blocks.run_extra_startup_events()
