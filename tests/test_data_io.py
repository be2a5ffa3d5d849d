"""Record files: round trips, and errors that name the file, the row and the field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlrl.data.io import iter_records, load_records, split_path, write_records
from vlrl.data.records import Record
from vlrl.errors import DataError


def _rec(i: int, images=None, **kw) -> Record:
    images = images or []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"question {i}"}]
    return Record(id=f"r{i}", messages=[{"role": "user", "content": content},
                                        {"role": "assistant", "content": f"\\boxed{{{i}}}"}],
                  images=images, answer=str(i), task="arith", family="reasoning", difficulty=2,
                  meta={"values": {"a": i}, "chain": [["+", "b"]], "kind": None}, **kw)


def test_jsonl_round_trip_keeps_records(tmp_path):
    recs = [_rec(1, ["images/a.png"]), _rec(2), _rec(3, rewards=["accuracy", "format"])]
    write_records(tmp_path / "d.jsonl", recs)
    assert load_records(tmp_path / "d.jsonl") == recs
    first = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"][0] == {"type": "image"}  # no null text on placeholders


def test_parquet_round_trip_with_paths_and_inline_bytes(tmp_path):
    paths = [_rec(1, ["images/a.png"]), _rec(2)]
    write_records(tmp_path / "p.parquet", paths)
    assert load_records(tmp_path / "p.parquet") == paths
    inline = [_rec(1, [b"\x89PNG fake"]), _rec(2, ["images/b.png"])]
    write_records(tmp_path / "i.parquet", inline)
    assert load_records(tmp_path / "i.parquet") == inline


def test_inline_bytes_in_jsonl_become_data_uris(tmp_path):
    write_records(tmp_path / "d.jsonl", [_rec(1, [b"\x00\x01binary"])])
    (r,) = load_records(tmp_path / "d.jsonl")
    assert r.images[0].startswith("data:image/png;base64,")


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


def _good_line(i=1):
    return json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": "hi"}]})


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    _write_lines(p, [_good_line(), '{"id": "r2", "messages": [', _good_line(3)])
    with pytest.raises(DataError, match=r"file .*bad\.jsonl line 2: not valid JSON"):
        load_records(p)


def test_non_utf8_line_names_file_line_and_byte(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(_good_line(1).encode() + b"\n" + _good_line(2).replace("hi", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert f"file {p} line 2: not UTF-8 (byte 0xe9 at byte" in msg and "\n" not in msg


def test_json_error_message_reads_once(tmp_path):
    p = tmp_path / "ctl.jsonl"
    _write_lines(p, ['{"id": "r1\t", "messages": []}'])
    with pytest.raises(DataError, match=r"line 1: not valid JSON \(Invalid control character at column 11\)"):
        load_records(p)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + _good_line(1).encode() + b"\r\n" + _good_line(2).encode() + b"\r\n")
    assert [r.id for r in load_records(p)] == ["r1", "r2"]


def test_bad_field_names_line_field_and_expectation(tmp_path):
    p = tmp_path / "bad.jsonl"
    bad = json.dumps({"id": "r3", "messages": [{"role": "robot", "content": "hi"}]})
    _write_lines(p, [_good_line(), "", bad])  # the blank line still counts: the bad row is line 3
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert "bad.jsonl line 3" in msg and "field 'messages.0.role'" in msg and "'assistant'" in msg and "robot" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("obj", "expected"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'id': Field required"),
    ({"id": "x", "messages": [{"role": "user", "content": "hi"}], "difficulty": 9}, "field 'difficulty'"),
    ({"id": "x", "messages": [{"role": "user", "content": "hi"}], "colour": 1}, "field 'colour': Extra inputs"),
    ({"id": "x", "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "record: Value error, messages have 1 image"),
    ([1, 2], "expected a JSON object"),
])
def test_each_kind_of_bad_row_is_named(tmp_path, obj, expected):
    p = tmp_path / "d.jsonl"
    _write_lines(p, [json.dumps(obj)])
    with pytest.raises(DataError, match=r"d\.jsonl line 1: ") as e:
        load_records(p)
    assert expected in str(e.value)


def test_bad_parquet_row_names_row(tmp_path):
    write_records(tmp_path / "p.parquet", [_rec(1), _rec(2)])
    table = pq.read_table(tmp_path / "p.parquet")
    tasks = table.column("difficulty").to_pylist()
    tasks[1] = 7
    table = table.set_column(table.schema.get_field_index("difficulty"), "difficulty", pa.array(tasks, pa.int8()))
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet row 2: field 'difficulty'"):
        load_records(tmp_path / "p.parquet")


def test_rows_are_numbered_for_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_lines(p, [_good_line(1), "", _good_line(2)])
    assert [row for row, _ in iter_records(p)] == [1, 3]


def test_unreadable_or_missing_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="unknown dataset format '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_records(tmp_path / "d.parquet")


def test_split_path(tmp_path):
    with pytest.raises(DataError, match=r"dataset .*nope does not exist: expected a folder holding eval\.jsonl"):
        split_path(tmp_path / "nope", "eval")
    with pytest.raises(DataError, match="no train.jsonl or train.parquet"):
        split_path(tmp_path, "train")
    write_records(tmp_path / "train.jsonl", [_rec(1)])
    assert split_path(tmp_path, "train") == tmp_path / "train.jsonl"
    assert split_path(tmp_path / "train.jsonl", "eval") == tmp_path / "train.jsonl"
    write_records(tmp_path / "train.parquet", [_rec(1)])
    with pytest.raises(DataError, match="both train.jsonl and train.parquet"):
        split_path(tmp_path, "train")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "parquet"}))
    assert split_path(tmp_path, "train") == tmp_path / "train.parquet"


@pytest.mark.parametrize(("content", "expected"), [
    ([{"type": "img"}], "field 'messages.0.content.0.type': Input should be 'text' or 'image' (got 'img')"),
    (5, "field 'messages.0.content': Input should be a valid string, or Input should be a valid list (got 5)"),
])
def test_union_fields_report_the_real_problem(tmp_path, content, expected):
    p = tmp_path / "d.jsonl"
    _write_lines(p, [json.dumps({"id": "x", "messages": [{"role": "user", "content": content}]})])
    with pytest.raises(DataError) as e:
        load_records(p)
    assert str(e.value).endswith(expected)


def test_hugging_face_datasets_parquet_layout_reads_as_is(tmp_path):
    """What `datasets.Dataset.to_parquet` writes: nested `messages` (not a JSON string), no
    `meta` column, `images` as a list of {bytes, path} structs (an Image() sequence)."""
    from PIL import Image

    from vlrl.data.images import RecordDataset
    from vlrl.data.synth.render import png_bytes

    content = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
    table = pa.table({
        "id": ["a", "b"],
        "messages": pa.array([
            [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{red}"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "1 + 1?"}]}],
        ], pa.list_(pa.struct([("role", pa.string()), ("content", content)]))),
        "images": pa.array([[{"bytes": png_bytes(Image.new("RGB", (8, 8), "red")), "path": None}], []],
                           pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        "answer": ["red", "2"],
        "family": ["perception", "text"],
        "difficulty": pa.array([1, 2], pa.int64()),
    })
    pq.write_table(table, tmp_path / "train.parquet")
    ds = RecordDataset(tmp_path / "train.parquet")
    assert [s.record.answer for s in ds] == ["red", "2"] and ds[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert ds[0].record.target_text() == "\\boxed{red}" and ds[1].record.prompt_messages()[0].parts()[0].text == "1 + 1?"
