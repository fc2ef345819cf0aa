"""The stream protocol's types (inference/protocol.py): the options' own checks, and the messages' types
against what the builders make and what docs/streaming.md promises."""

from __future__ import annotations

import re
import sys
import typing

import numpy as np
import pytest

from emoserve.audio.vad import VAD_PARAMETERS, VadSettings
from emoserve.constants import STREAM_HOP_S
from emoserve.inference.protocol import (
    CONTROL_MESSAGES,
    MESSAGE_TYPES,
    MESSAGES,
    StreamOptions,
    parse_control,
)
from tests.support.paths import ROOT

STREAMING_DOC = ROOT / "docs" / "streaming.md"


def test_from_query_reads_every_parameter():
    query = {
        "sample_rate": "8000", "encoding": "pcm_f32le", "channels": "2", "hop_s": "0.5", "window_s": "4",
        "vad_threshold": "0.6", "min_speech_ms": "100", "min_silence_ms": "200", "pad_ms": "50",
        "max_segment_s": "9", "granularity": "frame", "embedding": "yes", "head": "tones", "api_key": "k",
        "vad": "off",
    }  # fmt: skip
    options = StreamOptions.from_query(query)
    assert options == StreamOptions(
        sample_rate=8000, encoding="pcm_f32le", channels=2, hop_s=0.5, window_s=4.0,
        vad=VadSettings(threshold=0.6, min_speech_ms=100, min_silence_ms=200, pad_ms=50, max_segment_s=9),
        granularity="frame", embedding=True, head="tones", use_vad=False,
    )  # fmt: skip
    # what a client sends is what the server reads back (api_key travels apart)
    assert StreamOptions.from_query(options.to_query()) == options
    pieces = StreamOptions.from_query({"vad": "off", "chunk_s": "2.5"})
    assert pieces.chunk_s == 2.5 and StreamOptions.from_query(pieces.to_query()) == pieces
    assert StreamOptions.from_query({}) == StreamOptions()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"sample_rate": "4000"}, "sample_rate is 4000; it must be 8000-192000"),
        ({"sample_rate": "fast"}, "sample_rate is 'fast'; it must be a number"),
        ({"encoding": "mp3"}, "encoding is 'mp3'"),
        ({"channels": "33"}, "channels is 33; it must be 1-32"),
        ({"hop_s": "0.1"}, "hop_s is 0.1; it must be 0.25-10"),
        ({"hop_s": "2", "window_s": "1"}, "window_s is 1; it must be hop_s (2) to 30"),
        ({"vad_threshold": "1.5"}, "threshold is 1.5"),
        ({"granularity": "word"}, "granularity is 'word'"),
        ({"embedding": "maybe"}, "embedding is 'maybe'; use true or false"),
        ({"hopp_s": "1"}, "unknown parameter 'hopp_s'"),
        ({"vad": "sometimes"}, "vad is 'sometimes'; use on or off"),
        ({"use_vad": "off"}, "unknown parameter 'use_vad'"),
        ({"vad": "off", "chunk_s": "0.5"}, "chunk_s is 0.5; it must be 0 (a turn scored whole) or 1-30"),
        ({"vad": "off", "chunk_s": "soon"}, "chunk_s is 'soon'; it must be a number"),
        ({"chunk_s": "2"}, "chunk_s reads the client's turns in pieces: it needs vad=off"),
        ({"vad": "off", "chunk_s": "2", "granularity": "frame"}, "chunk_s gives a turn's utterance reading"),
    ],
)
def test_from_query_names_the_bad_parameter(query, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        StreamOptions.from_query(query)


def test_options_made_in_code_are_checked_too():
    with pytest.raises(ValueError, match="hop_s is 20"):
        StreamOptions(hop_s=20.0)
    assert StreamOptions().hop_s == STREAM_HOP_S


def test_every_vad_parameter_is_in_the_ready_parameters():
    parameters = StreamOptions().to_dict()
    for name, attribute in VAD_PARAMETERS.items():
        assert parameters[name] == getattr(VadSettings(), attribute)


def test_every_message_type_has_its_typed_dict():
    assert set(MESSAGES) == set(MESSAGE_TYPES)
    for kind, message in MESSAGES.items():
        hints = typing.get_type_hints(message)
        assert typing.get_args(hints["type"]) == (kind,)
        assert hints["seq"] is int


def documented_messages() -> dict[str, set[str]]:
    """docs/streaming.md's server -> client table: type -> the fields its row names."""
    text = STREAMING_DOC.read_text()
    table = text[text.index("## Server -> client") : text.index("Interim readings are")]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and (kind := re.fullmatch(r"`(\w+)`", cells[0])):
            # the fields named in the row's last cell, outside parentheses (those name their contents)
            fields = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", cells[2])
            rows[kind.group(1)] = set(re.findall(r"`(\w+)`", fields))
    return rows


def test_the_documented_table_names_every_field_of_every_type():
    documented = documented_messages()
    assert set(documented) == set(MESSAGE_TYPES)
    for kind, message in MESSAGES.items():
        fields = set(typing.get_type_hints(message)) - {"type", "seq"}
        assert documented[kind] == fields, kind


def test_the_table_check_sees_a_missing_field(monkeypatch, tmp_path):
    """The check above fails when the document leaves out a field (it is not vacuous)."""
    doc = tmp_path / "streaming.md"
    doc.write_text(STREAMING_DOC.read_text().replace("`speech_s`, `model`", "`model`", 1))
    monkeypatch.setattr(sys.modules[__name__], "STREAMING_DOC", doc)
    with pytest.raises(AssertionError, match="summary"):
        test_the_documented_table_names_every_field_of_every_type()


def test_the_vad_parameter_reads_on_and_off_and_turns_the_cut_to_the_clients():
    assert StreamOptions.from_query({"vad": "on"}).use_vad and StreamOptions().use_vad
    off = StreamOptions.from_query({"vad": "off"})
    assert not off.use_vad and off.to_dict()["vad"] == "off" and off.to_query()["vad"] == "off"
    cutter = off.cutter()
    events = cutter.feed(np.zeros(16_000, np.float32))  # silence: with the VAD it would open nothing
    assert [type(e).__name__ for e in events] == ["SpeechStart"]
    (segment,) = cutter.flush()
    assert (segment.start, segment.end) == (0, 16_000)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('{"type": "end"}', {"type": "end"}),
        ('{"type": "flush"}', {"type": "flush"}),
        ('{"type": "flush", "turn_id": "t-1"}', {"type": "flush", "turn_id": "t-1"}),
        ('{"type": "flush", "turn_id": 7}', {"type": "flush", "turn_id": 7}),
    ],
)
def test_parse_control_reads_the_client_messages(raw, parsed):
    assert parse_control(raw) == parsed
    assert set(parsed) <= set(typing.get_type_hints(CONTROL_MESSAGES[parsed["type"]]))


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not json", "not JSON"),
        ('["flush"]', "unknown message type None"),
        ('{"type": "pause"}', "unknown message type 'pause'"),
        ('{"type": "flush", "turn_id": true}', "turn_id is 'True'"),
        ('{"type": "flush", "turn_id": 1.5}', "turn_id is '1.5'"),
        ('{"type": "flush", "turn_id": {"a": 1}}', "must be a string or an integer"),
        ('{"type": "flush", "turn_id": "%s"}' % ("x" * 129), "at most 128 characters"),
    ],
)
def test_parse_control_names_what_is_wrong(raw, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_control(raw)
