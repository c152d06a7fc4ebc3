"""Hostile training data: every line hypothesis generates either reads as a valid record or fails as one line naming
`file:line` (a UserError: exit 2); `memfit train` answers the worst kinds with exit 2 and nothing written. Never
another exception, never a traceback."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.cli import main
from memfit.data import read_records
from memfit.errors import UserError

GOOD = b'{"text": "a fine line", "auth_weight": 0.5, "prov_entropy": 1.0}\n'

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
keys = st.sampled_from(["text", "prompt", "completion", "messages", "auth_weight", "prov_entropy", "role", "content"])


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


hostile_lines = st.one_of(
    # Wrong types under the keys memfit reads (and NaN/inf where numbers go).
    st.dictionaries(keys, json_values, min_size=1, max_size=4).map(_dumps),
    st.builds(lambda weight: _dumps({"text": "ok", "auth_weight": weight, "prov_entropy": 1.0}),
              st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 7.5, "0.5", None, [0.5]])),
    st.builds(lambda messages: _dumps({"messages": messages}), json_values),
    # Deep nesting, past what a recursive parser survives.
    st.integers(min_value=1_000, max_value=200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(min_value=1_000, max_value=100_000).map(lambda depth: b'{"text": ' + b"[" * depth),
    # Huge strings: valid when they are text, and must not break anything when they are not.
    st.integers(min_value=100_000, max_value=3_000_000).map(lambda size: _dumps({"text": "x" * size})),
    st.integers(min_value=100_000, max_value=3_000_000).map(lambda size: _dumps({"x" * size: 1})),
    # Not UTF-8, not JSON, not one object: raw bytes (newlines removed: this is one line).
    st.binary(min_size=1, max_size=200).map(lambda raw: raw.replace(b"\n", b" ").replace(b"\r", b" ")),
    st.binary(min_size=1, max_size=50).map(lambda raw: b'{"text": "' + raw.replace(b"\n", b"") + b'"}'),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(line=hostile_lines, before=st.integers(min_value=0, max_value=3))
def test_every_hostile_line_is_a_record_or_one_error_naming_its_line(tmp_path_factory, line, before):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_bytes(GOOD * before + line + b"\n" + GOOD)
    try:
        records = read_records(path, require_distrust=b"auth_weight" in line)
    except UserError as error:
        text = error.one_line()
        assert "\n" not in text
        # The hostile line, or (when it read fine but set another format) the good line after it.
        assert text.startswith((f"{path}:{before + 1}:", f"{path}:{before + 2}:")), text
        return
    try:
        text = line.decode("utf-8")
        if before == 0:  # a byte-order mark opening the file is an encoding marker, not text (utf-8-sig)
            text = text.removeprefix("\ufeff")
        blank = not text.strip()  # a blank line is skipped, as the reader promises
    except UnicodeDecodeError:
        blank = False
    assert len(records) == before + 2 - blank


HOSTILE_FOR_THE_CLI = [
    b'{"text": 5}',
    b'{"text": "ok", "auth_weight": NaN, "prov_entropy": 1.0}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"text": "caf\xe9"}',
    b'{"messages": [{"role": "user", "content": {"deep": [1, 2]}}]}',
    b'{"text": "ok"',
    b"\x00\xff\xfe binary",
]


@pytest.mark.parametrize("line", HOSTILE_FOR_THE_CLI, ids=["wrong-type", "nan-weight", "deep-nesting", "latin-1",
                                                         "nested-content", "cut-short", "binary"])
def test_memfit_train_answers_hostile_data_with_exit_2_and_file_line(tiny_model_dir, tmp_path, capsys, line):
    root = tmp_path
    data = root / "data.jsonl"
    data.write_bytes(GOOD * 2 + line + b"\n")
    loss = ["--loss", "distrust"] if b"auth_weight" in line else []
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(root / "run"),
                 "--device", "cpu", "--max-steps", "1", *loss])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{data}:3:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (root / "run" / "run.json").exists()  # nothing written for a run that never started
