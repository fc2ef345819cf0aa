"""The web UI (Gradio): `app.build_ui` / `app.mount_ui`, a module per tab. Imports Gradio only in the
modules that build the UI, so that `mount` can be imported by the server without it."""
