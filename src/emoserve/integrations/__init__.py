"""emoserve inside voice-agent frameworks, each behind its extra: `pipecat` (emoserve[pipecat]) and
`livekit` (emoserve[livekit]). Nothing else in emoserve imports them (an import contract checks it)."""
