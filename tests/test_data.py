"""memfit.data: JSONL validation, tokenization per format, packing, collation and the row order."""

from __future__ import annotations

import json

import pytest
import torch

from memfit.data import (
    Record,
    RowOrder,
    build_dataset,
    collate,
    epoch_order,
    read_records,
    step_rows,
    tokenize_record,
)
from memfit.errors import UserError
from memfit.train.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    from memfit.models.tokenizer import train_tokenizer

    return train_tokenizer(512)  # ChatML template, eos 0, pad 1


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def error_of(path, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        read_records(path, **kwargs)
    assert "\n" not in info.value.one_line()
    return info.value


# --- read_records: errors ---------------------------------------------------------------------------------------

TEXT = {"text": "hello"}
DISTRUST = {"text": "hello", "auth_weight": 0.5, "prov_entropy": 1.0}


@pytest.mark.parametrize(
    ("lines", "kwargs", "expected"),
    [
        ([TEXT, '{"text": "a",}'], {}, ':2: not valid JSON ('),
        ([TEXT, {"prompt": "p"}], {}, ':2: has "prompt" but no "completion"'),
        ([{"meta": 1}], {}, ':1: missing "text" (each line needs "text", "prompt" and "completion", or "messages")'),
        ([TEXT, TEXT, {"text": 3}], {}, ':3: "text" must be a string, got number'),
        ([{"text": None}], {}, ':1: "text" must be a string, got null'),
        ([{"text": ""}], {}, ':1: "text" is empty'),
        (["[1, 2]"], {}, ":1: must be a JSON object, got array"),
        ([TEXT, {"text": "a", "messages": []}], {}, ':2: has both "text" and "messages"'),
        ([TEXT, {"prompt": "p", "completion": "c"}], {},
         ':2: uses the "prompt"/"completion" format, but line 1 set the format to "text"'),
        ([DISTRUST, {**DISTRUST, "auth_weight": 1.5}], {"require_distrust": True},
         ':2: "auth_weight" must be between 0 and 0.99, got 1.5'),
        ([{**DISTRUST, "auth_weight": -0.1}], {}, ':1: "auth_weight" must be between 0 and 0.99, got -0.1'),
        (['{"text": "a", "auth_weight": 0.5, "prov_entropy": NaN}'], {}, ':1: "prov_entropy" must be a finite number, got NaN'),
        (['{"text": "a", "prov_entropy": -Infinity}'], {}, ':1: "prov_entropy" must be a finite number, got -Infinity'),
        (['{"text": "a", "prov_entropy": 1e999}'], {}, ':1: "prov_entropy" must be a finite number, got Infinity'),
        (['{"text": "a", "auth_weight": 1' + "0" * 400 + "}"], {}, ':1: "auth_weight" must be between 0 and 0.99, got inf'),
        (['{"text": "a", "auth_weight": 1' + "0" * 5000 + "}"], {}, ":1: not valid JSON (a number is too long)"),
        ([{**DISTRUST, "auth_weight": True}], {}, ':1: "auth_weight" must be a number, got boolean'),
        ([{**DISTRUST, "prov_entropy": "1.0"}], {}, ':1: "prov_entropy" must be a number, got string'),
        ([DISTRUST, TEXT], {"require_distrust": True}, ':2: missing "auth_weight" (required by --loss distrust)'),
        ([{"text": "a", "auth_weight": 0.5}], {"require_distrust": True},
         ':1: missing "prov_entropy" (required by --loss distrust)'),
        ([TEXT, "[" * 100_000 + "]" * 100_000], {}, ":2: not valid JSON (nested too deeply)"),
        (['{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"], {}, ":1: not valid JSON (nested too deeply)"),
        (['{"text": "a\\ud800b"}'], {}, ':1: "text" contains an unpaired surrogate escape (\\ud800)'),
        ([{"messages": []}], {}, ':1: "messages" is empty'),
        ([{"messages": "hi"}], {}, ':1: "messages" must be a list, got string'),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {}, ':1: "messages" has no assistant turn'),
        ([{"messages": [{"role": "tool", "content": "x"}]}], {},
         ':1: messages[0]["role"] must be one of system, user, assistant, got "tool"'),
        ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}], {},
         ':1: messages[1]["content"] must be a string, got number'),
        ([{"messages": [{"role": "user"}]}], {}, ':1: messages[0] has no "content"'),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], {}, ":1: messages[0] is an assistant turn"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, lines, kwargs, expected):
    path = write(tmp_path, lines)
    err = error_of(path, **kwargs)
    assert err.message.startswith(f"{path}{expected}"), err.message


def test_non_utf8_bytes_give_line_and_column(tmp_path):
    path = write(tmp_path, b'{"text": "ok"}\n\n{"text": "caf\xe9 \xc3\xa9"}\n')
    assert error_of(path).message == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 14)"
    # The column counts characters, so a multi-byte character earlier on the line counts once.
    path = write(tmp_path, '{"text": "é'.encode() + b'\xff"}\n')
    assert error_of(path).message == f"{path}:1: not valid UTF-8 (byte 0xff at column 12)"


def test_empty_and_unreadable_files(tmp_path):
    assert error_of(write(tmp_path, b"")).message == f"{tmp_path / 'data.jsonl'}: no training samples (the file is empty)"
    blank = write(tmp_path, b"\n  \n\r\n", name="blank.jsonl")
    assert error_of(blank).message == f"{blank}: no training samples (only blank lines)"
    assert error_of(tmp_path / "nope.jsonl").message == f"{tmp_path / 'nope.jsonl'}: no such file"
    assert error_of(tmp_path).message == f"{tmp_path}: is a directory, not a JSONL file"


# --- read_records: valid files ----------------------------------------------------------------------------------


def test_records_keep_line_numbers_and_fields(tmp_path):
    path = write(
        tmp_path,
        b'\xef\xbb\xbf{"text": "one", "source": "web"}\r\n\n'
        + json.dumps({"text": "two", "auth_weight": 0, "prov_entropy": 3}).encode()
        + b"\n",
    )
    first, second = read_records(path, require_distrust=False)
    assert (first.line, first.kind, first.text, first.auth_weight) == (1, "text", "one", None)
    assert (second.line, second.text, second.auth_weight, second.prov_entropy) == (3, "two", 0.0, 3.0)
    assert isinstance(second.auth_weight, float)


def test_messages_keep_only_role_and_content(tmp_path):
    conversation = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]
    (record,) = read_records(write(tmp_path, [{"messages": conversation}]))
    assert record.messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})


# --- tokenization -----------------------------------------------------------------------------------------------


def test_text_is_fully_scored_and_ends_with_eos(tok):
    sample = tokenize_record(Record(1, "text", text="The river ran."), tok)
    assert sample.input_ids == tok("The river ran.")["input_ids"] + [tok.eos_token_id]
    assert sample.labels == sample.input_ids


def test_prompt_is_masked_exactly(tok):
    sample = tokenize_record(Record(1, "prompt_completion", prompt="Question: why?", completion=" Because."), tok)
    prompt = tok("Question: why?")["input_ids"]
    completion = tok(" Because.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sample.input_ids == prompt + completion
    assert sample.labels == [IGNORE_INDEX] * len(prompt) + completion


CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Nile."},
)


def test_chat_scores_assistant_turns_and_their_end_markers(tok):
    sample = tokenize_record(Record(1, "messages", messages=CONVERSATION), tok)
    full = tok.apply_chat_template(list(CONVERSATION), tokenize=True)["input_ids"]
    assert sample.input_ids == full
    scored = [token for token, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
    # ChatML closes a turn with "<|im_end|>\n": both belong to the assistant's turn.
    assert tok.decode(scored) == "Hi.<|im_end|>\nThe Nile.<|im_end|>\n"


def test_chat_template_that_rewrites_earlier_turns_is_refused(tok, tmp_path):
    from memfit.models.tokenizer import train_tokenizer

    record = Record(4, "messages", messages=CONVERSATION)
    counting = train_tokenizer(512)
    # The header counts the messages, so a shorter render is never a prefix of a longer one.
    counting.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match=r"data\.jsonl:4: the model's chat template can't be used") as info:
        tokenize_record(record, counting, path=tmp_path / "data.jsonl")
    assert "prompt" in info.value.hint

    counting.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        tokenize_record(record, counting)

    counting.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match="line 4: the model's chat template rejected this conversation: roles must"):
        tokenize_record(record, counting)


# --- build_dataset: packing -------------------------------------------------------------------------------------

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "the", "river", "bank"]


def text_lines(count):
    # Mostly short samples, with a long one (several rows' worth) every seventh line.
    return [{"text": " ".join(WORDS * 3 if i % 7 == 3 else WORDS[: 1 + i % 4])} for i in range(count)]


def test_packing_keeps_every_text_token(tok, tmp_path):
    lines = text_lines(30)
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=32)
    assert ds.stats.packed and ds.stats.kind == "text"
    assert all(len(row.input_ids) <= 32 for row in ds.rows)
    assert len(ds.rows) < len(lines)  # packed, not one per sample

    expected = [tokenize_record(r, tok).input_ids for r in ds.samples]
    rebuilt: dict[int, list[int]] = {}
    for row in ds.rows:
        assert row.segments[0][0] == 0 and row.segments[-1][1] == len(row.input_ids)
        for seg_no, (start, end, index) in enumerate(row.segments):
            rebuilt.setdefault(index, []).extend(row.input_ids[start:end])
            # The first token of every later segment is never a target; the rest of a text sample is.
            assert row.labels[start] == (IGNORE_INDEX if seg_no else row.input_ids[start])
            assert row.labels[start + 1 : end] == row.input_ids[start + 1 : end]
    assert [rebuilt[i] for i in range(len(lines))] == expected
    # Every row is full but the last: a sample that does not fit in what is left of a row goes on in the next
    # (a row may end 1 short, where the piece left would be a single token without a target).
    assert all(len(row.input_ids) >= 31 for row in ds.rows[:-1])
    spanning = {index for index in range(len(lines))
                if sum(any(seg[2] == index for seg in row.segments) for row in ds.rows) > 1}
    long = [i for i, ids in enumerate(expected) if len(ids) > 32]
    assert set(long) <= spanning and ds.stats.split_samples == len(spanning)
    assert ds.stats.truncated_samples == ds.stats.dropped_samples == 0
    assert ds.stats.tokens == sum(map(len, expected))
    assert ds.stats.scored_tokens == sum(
        sum(label != IGNORE_INDEX for label in row.labels[1:]) for row in ds.rows
    )


def test_text_packing_fills_rows_in_file_order(tok, tmp_path):
    lines = [{"text": "a b c"}, {"text": "d e f"}, {"text": "g h i j"}, {"text": "k"}]
    lengths = [len(tokenize_record(Record(1, "text", text=line["text"]), tok).input_ids) for line in lines]
    seq_len = lengths[0] + lengths[1] + 2  # sample 2 starts in row 0 and goes on in row 1
    assert lengths[2] > 3
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=seq_len)
    assert [[s[2] for s in row.segments] for row in ds.rows] == [[0, 1, 2], [2, 3]]
    assert ds.rows[0].segments[2] == (seq_len - 2, seq_len, 2) and ds.stats.split_samples == 1


def test_text_packing_leaves_no_piece_without_a_target(tok, tmp_path):
    """A sample whose last token alone would spill into the next row hands that row 2 tokens instead."""
    lines = [{"text": "a b c"}, {"text": "d e f g h"}]
    first, second = (len(tokenize_record(Record(1, "text", text=line["text"]), tok).input_ids) for line in lines)
    seq_len = first + second - 1
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=seq_len)
    assert [row.segments for row in ds.rows] == [[(0, first, 0), (first, seq_len - 1, 1)], [(0, 2, 1)]]
    assert ds.stats.scored_tokens == (first - 1) + (second - 3) + 1


def test_whole_samples_are_packed_best_fit_decreasing(tok, tmp_path):
    """Prompt/completion samples stay whole: longest first, each into the row it leaves least room in (greedy in
    file order would open a third row here)."""
    from memfit.data.packing import best_fit_rows

    pieces = [([1] * n, [1] * n, i) for i, n in enumerate([6, 5, 4, 3, 2])]
    rows = best_fit_rows(pieces, seq_len=10)
    assert [[s[2] for s in row.segments] for row in rows] == [[0, 2], [1, 3, 4]]
    assert [len(row.input_ids) for row in rows] == [10, 10]
    assert all(row.labels[start] == IGNORE_INDEX for row in rows for start, _, _ in row.segments[1:])
    lines = [{"prompt": "Q " * n, "completion": " A"} for n in (1, 6, 2, 5)]
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=64, packing=True)
    assert sorted(index for row in ds.rows for _, _, index in row.segments) == [0, 1, 2, 3]


def test_without_packing_long_samples_are_truncated_or_dropped(tok, tmp_path):
    lines = [
        {"prompt": "Say yes.", "completion": " yes"},
        {"prompt": "Tell me a story. " * 5, "completion": " Once upon a time there was a river."},
        {"prompt": "Tell me a very long story about everything. " * 10, "completion": " No."},
    ]
    path = write(tmp_path, lines)
    samples = [tokenize_record(r, tok) for r in read_records(path)]
    seq_len = len(samples[1].input_ids) - 3  # cuts the middle sample's answer; the last one's prompt is longer
    prompt_len = samples[1].labels.count(IGNORE_INDEX)
    assert prompt_len < seq_len - 1 and samples[2].labels.count(IGNORE_INDEX) > seq_len

    ds = build_dataset(path, tok, seq_len=seq_len)
    assert not ds.stats.packed  # the default for prompt/completion
    assert [row.segments for row in ds.rows] == [[(0, len(samples[0].input_ids), 0)], [(0, seq_len, 1)]]
    assert ds.rows[1].input_ids == samples[1].input_ids[:seq_len]
    assert (ds.stats.truncated_samples, ds.stats.truncated_tokens, ds.stats.dropped_samples) == (1, 3, 1)
    assert ds.stats.summary() == (
        f"3 samples → 2 rows of ≤{seq_len} tokens (one sample per row), {ds.stats.tokens:,} tokens "
        f"({ds.stats.scored_tokens:,} scored); 1 truncated (3 tokens dropped); 1 dropped (nothing left to score)"
    )

    text = write(tmp_path, [{"text": "one two three four five six seven"}], name="text.jsonl")
    ds = build_dataset(text, tok, seq_len=4, packing=False)
    assert len(ds.rows) == 1 and len(ds.rows[0].input_ids) == 4 and ds.stats.truncated_samples == 1


def test_packed_prompt_completion_boundary_is_ignored(tok, tmp_path):
    lines = [{"prompt": "Q", "completion": " A"}, {"prompt": "R", "completion": " B"}]
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=64, packing=True)
    (row,) = ds.rows
    second_start = row.segments[1][0]
    assert row.labels[second_start] == IGNORE_INDEX
    completions = len(tok(" A", add_special_tokens=False)["input_ids"] + tok(" B", add_special_tokens=False)["input_ids"])
    assert ds.stats.scored_tokens == sum(label != IGNORE_INDEX for label in row.labels[1:]) == completions + 2


def test_nothing_left_to_score_is_an_error(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "A long prompt that fills the row", "completion": " x"}])
    with pytest.raises(UserError, match="no training samples left"):
        build_dataset(path, tok, seq_len=3)


# --- collate and the row order ----------------------------------------------------------------------------------


def test_collate_pads_and_indexes_samples(tok, tmp_path):
    lines = [
        {"text": "one two three four five six seven eight nine ten", "auth_weight": 0.25, "prov_entropy": 2.0},
        {"text": "short", "auth_weight": 0.5, "prov_entropy": 4.0},
    ]
    ds = build_dataset(write(tmp_path, lines), tok, seq_len=16, require_distrust=True)
    # Sample 0 is split over rows 0 and 1; row 1 also holds sample 1.
    assert [[s[2] for s in row.segments] for row in ds.rows] == [[0], [0, 1]]
    batch = collate(ds.rows, ds.samples, pad_id=tok.pad_token_id)
    lengths = [len(row.input_ids) for row in ds.rows]
    width = max(lengths)
    assert batch.input_ids.shape == batch.labels.shape == batch.sample_index.shape == (2, width)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.sample_index.dtype == torch.long
    for b, row in enumerate(ds.rows):
        n = lengths[b]
        assert batch.input_ids[b, :n].tolist() == row.input_ids
        assert batch.labels[b, :n].tolist() == row.labels
        assert batch.input_ids[b, n:].eq(tok.pad_token_id).all() and batch.labels[b, n:].eq(IGNORE_INDEX).all()
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (width - n)
        assert batch.sample_index[b, n:].eq(-1).all()
    # One entry per JSONL sample, even when split across rows of the batch.
    assert batch.sample_ids == [0, 1]
    start, end, _ = ds.rows[1].segments[1]
    assert batch.sample_index[0, : lengths[0]].eq(0).all()
    assert batch.sample_index[1, :start].eq(0).all() and batch.sample_index[1, start:end].eq(1).all()
    assert batch.auth_weight.tolist() == [0.25, 0.5] and batch.prov_entropy.tolist() == [2.0, 4.0]
    assert batch.auth_weight.dtype == torch.float32
    assert batch.num_tokens == sum(lengths)
    assert batch.to("cpu").input_ids.equal(batch.input_ids)

    # Reversed rows: the local numbering follows this batch, and absent fields read 0.0.
    plain = [Record(1, "text", text="x"), Record(2, "text", text="y", auth_weight=0.9)]
    rows = [type(ds.rows[0])([5, 6], [5, 6], [(0, 2, 1)]), type(ds.rows[0])([7], [7], [(0, 1, 0)])]
    batch = collate(rows, plain, pad_id=1)
    assert batch.sample_index.tolist() == [[0, 0], [1, -1]] and batch.auth_weight.tolist() == pytest.approx([0.9, 0.0])


def test_epoch_order_is_deterministic_and_changes_with_epoch():
    torch.manual_seed(1)
    first = epoch_order(50, seed=7, epoch=0)
    torch.manual_seed(2)
    torch.rand(10)  # the global RNG state must not matter
    assert epoch_order(50, seed=7, epoch=0) == first
    assert sorted(first) == list(range(50))
    assert epoch_order(50, seed=7, epoch=1) != first
    assert epoch_order(50, seed=8, epoch=0) != first


def test_step_rows_crosses_epoch_boundaries():
    orders = [epoch_order(5, seed=3, epoch=e) for e in range(3)]
    stream = orders[0] + orders[1] + orders[2]
    assert step_rows(5, seed=3, start=0, count=15) == stream
    assert step_rows(5, seed=3, start=3, count=4) == stream[3:7]  # end of epoch 0, start of epoch 1
    assert step_rows(5, seed=3, start=12, count=0) == []
    with pytest.raises(ValueError):
        step_rows(0, seed=3, start=0, count=1)


# --- RowOrder: length-grouped batches -----------------------------------------------------------------------------


def random_lengths(n: int, seed: int = 0, high: int = 2048) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, high + 1, (n,), generator=generator).tolist()


def padding_waste(lengths: list[int], stream: list[int], batch: int) -> int:
    """Pad tokens `collate` adds when the stream is cut into batches of `batch` rows."""
    chunks = [stream[i : i + batch] for i in range(0, len(stream), batch)]
    return sum(len(chunk) * max(lengths[r] for r in chunk) - sum(lengths[r] for r in chunk) for chunk in chunks)


def test_row_order_ungrouped_is_step_rows():
    lengths = random_lengths(37)
    order = RowOrder(lengths, seed=5, batch=4, grouped=False)
    assert order.rows(0, 100) == step_rows(37, seed=5, start=0, count=100)
    assert order.rows(30, 11) == step_rows(37, seed=5, start=30, count=11)


@pytest.mark.parametrize("n", [1003, 1000, 5])  # a ragged epoch end, an even one, fewer rows than a batch
def test_row_order_grouped_is_a_permutation_per_epoch_and_deterministic(n):
    lengths = random_lengths(n)
    order = RowOrder(lengths, seed=3, batch=8, grouped=True)
    stream = order.rows(0, 3 * n)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    torch.manual_seed(99)  # the global RNG must not matter
    assert RowOrder(lengths, seed=3, batch=8, grouped=True).rows(0, 3 * n) == stream
    if n > 8:
        assert stream[:n] != stream[n : 2 * n]  # each epoch has its own order
        assert RowOrder(lengths, seed=4, batch=8, grouped=True).rows(0, n) != stream[:n]


def test_row_order_rows_do_not_depend_on_how_the_stream_is_asked_for():
    lengths = random_lengths(203)
    whole = RowOrder(lengths, seed=1, batch=8, grouped=True).rows(0, 700)
    order = RowOrder(lengths, seed=1, batch=8, grouped=True)
    assert order.rows(0, 8) + order.rows(8, 8) == whole[:16]
    # Out of order and across epoch boundaries, with a fresh instance (a resumed run) and the cache evicted.
    assert order.rows(600, 100) == whole[600:]
    assert RowOrder(lengths, seed=1, batch=8, grouped=True).rows(195, 20) == whole[195:215]
    assert order.rows(0, 16) == whole[:16]
    assert order.rows(5, 0) == []
    with pytest.raises(ValueError):
        order.rows(-1, 3)


def test_row_order_grouped_pads_much_less():
    lengths = random_lengths(1003)  # not a multiple of the batch: later epochs must stay on the batch grid
    batch = 8
    for epoch in range(3):
        start = epoch * 1003 - epoch * 1003 % batch  # whole batches of the stream inside this epoch
        span = 1000 - batch
        grouped = padding_waste(lengths, RowOrder(lengths, 2, batch, grouped=True).rows(start, span), batch)
        plain = padding_waste(lengths, step_rows(1003, 2, start, span), batch)
        assert grouped < 0.1 * plain, (epoch, grouped, plain)


def test_row_order_starts_with_the_longest_row():
    lengths = random_lengths(1000, seed=7)
    lengths[613] = 5000
    first = RowOrder(lengths, seed=0, batch=8, grouped=True).rows(0, 8)
    assert 613 in first
    # Ties at the top (rows truncated to seq_len) still put a full batch first.
    capped = [min(length, 1500) for length in random_lengths(1003, seed=8)]
    order = RowOrder(capped, seed=0, batch=8, grouped=True)
    assert max(capped[r] for r in order.rows(0, 8)) == 1500
    assert sorted(order.rows(0, 1003)) == list(range(1003))
    # The longest row among the epoch's last 3 rows: 400 + 3 rows, so they would form a megabatch of their own.
    lengths = random_lengths(403, seed=9)
    last = epoch_order(403, seed=0, epoch=0)[-1]
    lengths[last] = 5000
    assert last in RowOrder(lengths, seed=0, batch=8, grouped=True).rows(0, 8)


def test_row_order_shuffles_the_batches_of_a_megabatch():
    lengths = random_lengths(200, seed=9)  # one megabatch of 50 batches
    stream = RowOrder(lengths, seed=0, batch=4, grouped=True).rows(0, 200)
    batches = [sorted(lengths[r] for r in stream[i : i + 4]) for i in range(0, 200, 4)]
    assert sorted(length for batch in batches for length in batch) == sorted(lengths)
    # Sorted within the megabatch: each batch's rows are neighbours in length, no batch overlaps another's range.
    spans = sorted((batch[0], batch[-1]) for batch in batches)
    assert all(low_next >= high for (_, high), (low_next, _) in zip(spans, spans[1:]))
    # ...but the batches do not come longest first, or every run would start on its longest batches.
    maxima = [batch[-1] for batch in batches]
    assert maxima[1:] != sorted(maxima[1:], reverse=True)


def test_row_order_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RowOrder([], seed=0, batch=4, grouped=True)
    with pytest.raises(ValueError):
        RowOrder([3, 4], seed=0, batch=0, grouped=True)


def test_pad_token_id_falls_back_to_eos_then_0():
    from types import SimpleNamespace

    from memfit.data import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
