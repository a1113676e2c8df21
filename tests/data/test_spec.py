"""Data specs and record loading: the formats of SHARP's paper, local files, slices, one-line errors."""

import json
import os
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp.data import FORMATS, DataSpec, load_records, parse_data_spec
from sharp.errors import SharpError
from tests.conftest import ALPACA, DIALOGSUM


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_local_file_spec_with_slice(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    spec = parse_data_spec(f"arxiv-math:{f}[-100:]")
    assert spec == DataSpec("arxiv-math", str(f), "file", start=-100, stop=None)
    assert spec.text == f"arxiv-math:{f}[-100:]"
    assert parse_data_spec(f"text:{tmp_path}").kind == "dir"


def test_hub_ids_and_splits_are_recognised_without_network():
    assert parse_data_spec("dolly:databricks/databricks-dolly-15k") == DataSpec(
        "dolly", "databricks/databricks-dolly-15k", "hub", "train")
    spec = parse_data_spec("dialogsum:knkarthick/dialogsum@validation[:100]")
    assert (spec.kind, spec.source, spec.split, spec.stop) == ("hub", "knkarthick/dialogsum", "validation", 100)
    assert spec.text == "dialogsum:knkarthick/dialogsum@validation[:100]"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty data spec"),
        ("banana:x.json", "unknown data format 'banana'"),
        ("alpaca:", "names no source"),
        ("alpaca:/no/such/file.json", "does not exist"),
        ("alpaca:data/missing.jsonl", "does not exist"),
        ("alpaca:../x", "does not exist"),
        ("no-such-alias", "not a built-in alias"),
    ],
)
def test_bad_specs_fail_in_one_line(text, fragment):
    with pytest.raises(SharpError, match=fragment) as e:
        parse_data_spec(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["[:abc]", "[abc]", "[::2]", "[1:2:3]", "[3]", "[1.5:]"])
def test_a_malformed_slice_of_a_real_file_is_called_a_slice(tmp_path, bad):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(SharpError, match=r"malformed slice") as e:
        parse_data_spec(f"text:{f}{bad}")
    assert bad in str(e.value) and "does not exist" not in str(e.value)


def test_unsupported_extension(tmp_path):
    f = tmp_path / "d.xml"
    f.write_text("<x/>")
    with pytest.raises(SharpError, match="unsupported extension"):
        parse_data_spec(f"alpaca:{f}")


def test_aliases_resolve_and_check_their_format(tmp_path):
    f = _jsonl(tmp_path / "demo.jsonl", [{"instruction": "i", "output": "o"}])
    with mock.patch("sharp.io.assets.resolve_data_alias", lambda n: ("alpaca", f) if n == "demo" else None):
        assert parse_data_spec("demo") == DataSpec("alpaca", str(f), "file")
        assert parse_data_spec("alpaca:demo[:5]") == DataSpec("alpaca", str(f), "file", stop=5)
        with pytest.raises(SharpError, match="holds 'alpaca' data, not 'dolly'"):
            parse_data_spec("dolly:demo")
    with mock.patch("sharp.io.assets.resolve_data_alias", lambda n: ("alpaca", tmp_path / "gone.json")):
        with pytest.raises(SharpError, match="sharp assets fetch"):
            parse_data_spec("demo")


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=40),
    st.builds(lambda f, s: f"{f}:{s}", st.sampled_from(list(FORMATS) + ["", "x"]), st.text(max_size=30)),
    st.builds(lambda s, a, b: f"alpaca:{s}[{a}:{b}]", st.text(max_size=10), st.integers(), st.integers()),
))
def test_garbage_specs_raise_only_sharp_errors(text):
    with mock.patch("sharp.io.assets.resolve_data_alias", lambda n: None):
        try:
            spec = parse_data_spec(text)
        except SharpError as e:
            assert "\n" not in str(e)
            return
    assert spec.format in FORMATS
    assert spec.kind == "hub" or os.path.exists(spec.source)  # e.g. "text:/" is a real folder


def test_real_paper_formats_load():
    alpaca = load_records(f"alpaca:{ALPACA}")
    assert len(alpaca) == 44 and {"instruction", "input", "output"} <= alpaca[0].keys()  # the fixture's 44
    assert load_records(f"alpaca:{ALPACA}[-10:]") == alpaca[-10:]
    dialogs = load_records(f"dialogsum:{DIALOGSUM}[:3]")  # of 5
    assert len(dialogs) == 3 and dialogs[0]["fname"] == "dev_0"


def test_each_format_maps_to_template_parts():
    parts = {
        "alpaca": ({"instruction": "I", "input": "X", "output": "O"}, ("", "I", "X", "O")),
        "dolly": ({"instruction": "I", "context": "C", "response": "R", "category": "qa"}, ("", "I", "C", "R")),
        "dialogsum": ({"dialogue": "D", "summary": "S"}, ("", "Summarize the following dialogue.", "D", "S")),
        "openorca": ({"system_prompt": "Y", "question": "Q", "response": "R"}, ("Y", "Q", "", "R")),
        "arxiv-math": ({"question": "Q", "answer": "A"}, ("", "Q", "", "A")),
    }
    assert set(parts) | {"text"} == set(FORMATS)
    for name, (record, expected) in parts.items():
        assert FORMATS[name].parts(record, 0) == expected
    assert FORMATS["alpaca"].parts({"instruction": "I", "output": "O"}, 0) == ("", "I", "", "O")  # input optional


def test_missing_field_names_record_and_field(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"dialogue": "a", "summary": "b"}, {"dialogue": "c"}])
    with pytest.raises(SharpError, match=r"record 1 has no 'summary' field") as e:
        load_records(f"dialogsum:{f}")
    assert "\n" not in str(e.value)
    with pytest.raises(SharpError, match=r"record 0 has no 'instruction' field"):
        load_records(f"alpaca:{f}")
    # the index is the record's place in the file, also under a slice
    with pytest.raises(SharpError, match=r"record 1 has no"):
        load_records(f"dialogsum:{f}[1:]")
    assert len(load_records(f"dialogsum:{f}[:1]")) == 1


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        ('{"a": 1}', ".json", "JSON list of records"),
        ("[1, 2]", ".json", "record 0 is a int"),
        ('{"text": "a"}\n{bad\n', ".jsonl", "line 2 is not valid JSON"),
        ('[{"text": [5]}]', ".json", "field 'text' is a list"),
        ("[]", ".json", "holds no records"),
        ("not parquet", ".parquet", "cannot read"),
    ],
)
def test_bad_files_fail_in_one_line(tmp_path, content, suffix, fragment):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(SharpError, match=fragment):
        load_records(f"text:{f}")


def test_empty_slice_and_txt_rules(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert load_records(f"text:{f}") == [{"text": "hello world"}]
    with pytest.raises(SharpError, match="holds no records"):
        load_records(f"text:{f}[5:]")
    with pytest.raises(SharpError, match="load it as text:"):
        load_records(f"alpaca:{f}")


def test_csv_through_datasets_with_numbers_as_text(tmp_path):
    f = tmp_path / "math.csv"
    f.write_text("question,answer\n1+1?,2\n2+2?,4\n")
    records = load_records(f"arxiv-math:{f}[1:]")
    assert len(records) == 1
    assert FORMATS["arxiv-math"].parts(records[0], 1) == ("", "2+2?", "", "4")
