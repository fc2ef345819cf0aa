"""Audio in: any input decoded to 16 kHz mono float32, whole (`decode`) or in blocks (`stream`), the VAD
(`vad`) and a recording cut into speech segments (`segments`). Knows nothing of the model."""
