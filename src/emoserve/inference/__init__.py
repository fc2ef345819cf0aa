"""The Python API: load a model (`recognizer.load_model`), recognise clips and recordings, score many
files, and write the results (`formats`). Torch only in `torch_backend`."""
