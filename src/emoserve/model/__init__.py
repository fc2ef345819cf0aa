"""The network and its files: config, labels, the torch-free interface, the torch network, the cache
entry, downloads, checkpoint import, ONNX export, conversion, random test models, and resolving `--model`
(`cache`). Torch only in network, checkpoint, export, convert and testing. Knows nothing of audio decoding."""
