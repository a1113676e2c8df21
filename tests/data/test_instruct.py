"""Templates, response-only labels, truncation, the held-out split, padding, plain-text streams."""

import pytest
import torch

from sharp.data import (
    IGNORE,
    collate_examples,
    load_records,
    render,
    split_examples,
    text_examples,
    text_token_stream,
    tokenize_examples,
)
from sharp.errors import SharpError
from tests.conftest import ALPACA, STORIES

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def test_plain_template_is_research_md_format():
    prompt, full = render(("", "Add.", "2 and 3", "5"))
    assert full == "### Instruction:\nAdd.\n2 and 3\n### Response:\n5"
    assert prompt == "### Instruction:\nAdd.\n2 and 3\n### Response:\n"
    assert render(("Be brief.", "Add.", "", "5"))[1] == "Be brief.\n\n### Instruction:\nAdd.\n\n### Response:\n5"


def test_labels_cover_the_response_and_eos_only(tokenizer):
    records = [{"instruction": "Tell a story.", "input": "", "output": "Once upon a time there was a cat."}]
    (ex,) = tokenize_examples(records, "alpaca", tokenizer)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # tokenizer's BOS + our EOS
    prompt_len = len(tokenizer("### Instruction:\nTell a story.\n\n### Response:\n")["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert all(label != IGNORE for label in labels[prompt_len:])
    scored = [t for t in labels if t != IGNORE]
    assert scored == ids[prompt_len:]
    assert tokenizer.decode(scored, skip_special_tokens=True).strip() == "Once upon a time there was a cat."


def test_every_instruction_format_tokenizes(tokenizer):
    records = {
        "dolly": {"instruction": "Who?", "context": "Tom ran.", "response": "Tom."},
        "dialogsum": {"dialogue": "#Person1#: Hi.", "summary": "They greet."},
        "openorca": {"system_prompt": "Be kind.", "question": "Why?", "response": "Because."},
        "arxiv-math": {"question": "1+1?", "answer": "2"},
    }
    for fmt, record in records.items():
        (ex,) = tokenize_examples([record], fmt, tokenizer)
        response = next(v for k, v in record.items() if k in ("response", "summary", "answer"))
        scored = [t for t in ex["labels"] if t != IGNORE]
        assert tokenizer.decode(scored, skip_special_tokens=True).strip() == response, fmt
    with pytest.raises(SharpError, match="no responses"):
        tokenize_examples([{"text": "x"}], "text", tokenizer)


def test_truncation_and_dropping(tokenizer):
    records = load_records(f"alpaca:{ALPACA}[:20]")
    with pytest.warns(UserWarning, match="of 20 examples dropped"):
        examples = tokenize_examples(records, "alpaca", tokenizer, max_len=64)
    assert all(len(e["input_ids"]) <= 64 for e in examples)
    assert any(len(e["input_ids"]) == 64 for e in examples)
    long_prompt = {"instruction": "word " * 200, "output": "ok"}
    with pytest.warns(UserWarning, match="1 of 2 examples dropped"):
        kept = tokenize_examples([long_prompt, records[0]], "alpaca", tokenizer, max_len=64)
    assert len(kept) == 1
    with pytest.raises(SharpError, match="raise --max-len"):
        tokenize_examples([long_prompt], "alpaca", tokenizer, max_len=64)


def test_missing_field_in_tokenize_names_the_record(tokenizer):
    with pytest.raises(SharpError, match="record 1 has no 'output' field"):
        tokenize_examples([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "alpaca", tokenizer)


def test_chat_template(tokenizer):
    with pytest.raises(SharpError, match="no chat template"):
        tokenize_examples([{"instruction": "a", "output": "b"}], "alpaca", tokenizer, template="chat")
    tokenizer.chat_template = CHAT
    try:
        (ex,) = tokenize_examples([{"instruction": "Hi", "input": "there", "output": "Hello friend"}], "alpaca",
                                  tokenizer, template="chat")
    finally:
        tokenizer.chat_template = None
    assert tokenizer.decode(ex["input_ids"]).replace("</s> ", "</s>") == \
        "<|user|>Hi\n\nthere</s><|assistant|>Hello friend</s>"  # no BOS added: the template has its own
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE]) == "Hello friend</s>"


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(999))
    train, held = split_examples(items, 0.1, seed=None)
    assert held == list(range(899, 999)) and train == list(range(899))  # RESEARCH.md: the last 100
    a = split_examples(items, 0.1, seed=3)
    assert a == split_examples(items, 0.1, seed=3)
    assert a != split_examples(items, 0.1, seed=4)
    train, held = a
    assert len(held) == 100 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert split_examples(items, 0.0) == (items, [])
    for bad in (1.0, -0.1, 2):
        with pytest.raises(SharpError, match="--eval-fraction"):
            split_examples(items, bad)
    with pytest.raises(SharpError, match="leaves no training data"):
        split_examples([1], 0.5)


def test_collate_right_pads():
    batch = collate_examples([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                              {"input_ids": [8], "labels": [IGNORE]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_text_stream_has_one_bos_and_joins_documents(tokenizer, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "One day."}\n{"text": "The end."}\n')
    ids = text_token_stream(f"text:{f}", tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0] == tokenizer.bos_token_id and int((ids == tokenizer.bos_token_id).sum()) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "One day.\n\nThe end."
    with pytest.raises(SharpError, match="not plain text"):
        text_token_stream(f"alpaca:{ALPACA}", tokenizer)


def test_text_examples_label_each_new_token_once():
    ex = text_examples(torch.arange(10), max_len=4, stride=2)
    assert [e["input_ids"] for e in ex] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert [e["labels"] for e in ex] == [[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 4, 5], [IGNORE, IGNORE, 6, 7],
                                         [IGNORE, IGNORE, 8, 9]]
    assert [e["labels"] for e in text_examples(torch.arange(5), max_len=2)] == [[IGNORE, 1], [IGNORE, 3]]
