"""One model shared safely by many users: settings, lifecycle phases, metrics, the batching engine, the
warm-up and the `Service` the surfaces use. No HTTP, no Gradio."""
