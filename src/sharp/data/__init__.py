"""Training and evaluation data: specs, the paper's instruction formats, templates, plain-text streams."""

from sharp.data.instruct import (
    IGNORE,
    TEMPLATES,
    check_chat_template,
    check_template,
    collate_examples,
    pad_id,
    render,
    split_examples,
    tokenize_examples,
)
from sharp.data.spec import FORMATS, INSTRUCTION_FORMATS, DataSpec, Format, load_records, parse_data_spec
from sharp.data.text import record_examples, split_tokenized, text_examples, text_token_stream, text_windows

__all__ = [
    "FORMATS",
    "IGNORE",
    "INSTRUCTION_FORMATS",
    "TEMPLATES",
    "DataSpec",
    "Format",
    "check_chat_template",
    "check_template",
    "collate_examples",
    "load_records",
    "pad_id",
    "parse_data_spec",
    "record_examples",
    "render",
    "split_examples",
    "split_tokenized",
    "text_examples",
    "text_token_stream",
    "text_windows",
    "tokenize_examples",
]
