"""Hypothesis against every parser of user text: strategy, recovery, data and task specs, budgets (`sharp prune`,
`sharp analyze`), layer ranges, `sharp_config.json`, data files and the numeric flags of `sharp compress`.

The property is always the same: a parser returns a well-formed value or raises a one-line `SharpError`,
never another exception; what it accepts round-trips through its canonical text.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sharp.errors import SharpError
from tests.conftest import C4, STORIES

FAST = settings(max_examples=200, deadline=None)
SPEC_CHARS = string.ascii_letters + string.digits + ":-=,+%.[]@/_ ~"
small = st.integers(0, 40)


def _user_error(call, *args):
    """Run `call`; a SharpError must be a single non-empty line. Returns the result or None."""
    try:
        return call(*args)
    except SharpError as e:
        assert str(e) and "\n" not in str(e)
        return None


def _spec_text(prefixes: list[str]):
    """Random text, and text that looks almost right (a known prefix plus spec-ish characters)."""
    return st.one_of(
        st.text(max_size=30),
        st.builds(lambda p, rest: p + rest, st.sampled_from(prefixes), st.text(SPEC_CHARS, max_size=20)),
    )


strategy_texts = st.one_of(
    _spec_text(["next:", "group:", "map:", "next:1-", "group:2:", "map:3="]),
    st.builds(lambda a, b: f"next:{a}-{b}", small, small),
    st.builds(lambda k, a, b: f"group:{k}:{a}-{b}", st.integers(0, 6), small, small),
    st.builds(lambda pairs: "map:" + ",".join(f"{t}={r}" for t, r in pairs),
              st.lists(st.tuples(small, small), min_size=1, max_size=5)),
)


@FAST
@given(text=strategy_texts, n_layers=st.integers(1, 40))
def test_strategy_parser(text, n_layers):
    from sharp.sharing.strategy import parse_strategy

    strategy = _user_error(parse_strategy, text)
    if strategy is None:
        return
    assert parse_strategy(strategy.text) == strategy
    sharing = _user_error(strategy.resolve, n_layers)
    if sharing is None:
        return
    assert sharing, "an accepted strategy shares at least one layer"
    targets, refs = set(sharing), set(sharing.values())
    assert not targets & refs  # a reference keeps its own weights
    assert all(0 <= layer < n_layers for layer in targets | refs)
    assert all(t != r for t, r in sharing.items())


@FAST
@given(text=st.one_of(_spec_text(["lora:", "scale", "none", "lora+scale:", "lora"]),
                      st.builds(lambda n, r: f"{n}:{r}", st.sampled_from(["lora", "scale", "none", "lora+scale"]),
                                st.integers(-3, 300))),
       dims=st.tuples(st.integers(1, 64), st.integers(1, 64)))
def test_recovery_parser(text, dims):
    from sharp.sharing.recovery import parse_recovery

    rec = _user_error(parse_recovery, text)
    if rec is None:
        return
    assert parse_recovery(rec.text) == rec
    module = _user_error(rec.build, *dims)
    if module is None:
        assert rec.rank > min(dims)
        return
    assert sum(p.numel() for p in module.parameters()) == rec.num_params(*dims)


@FAST
@given(text=st.one_of(
    _spec_text(["alpaca:", "dolly:", "text:", "dialogsum:", "openorca:", "arxiv-math:", "alpaca-demo", "c4-demo"]),
    st.builds(lambda f, s: f"{f}:{C4}{s}", st.sampled_from(["text", "alpaca", "textt"]),
              st.sampled_from(["", "[:5]", "[-3:]", "[1:x]", "[", "[::2]", "@test"])),
))
def test_data_spec_parser(text):
    from sharp.data import parse_data_spec

    spec = _user_error(parse_data_spec, text)
    if spec is not None:
        assert parse_data_spec(spec.text) == spec


@FAST
@given(text=st.one_of(_spec_text(["ppl:", "ppl:text=", "ppl:alpaca=", "ppl:c4-demo", "arc_easy"]),
                      st.lists(st.sampled_from([f"ppl:text={C4}", f"ppl:text={C4}[:3]", "ppl:", "ppl:nope=x", ""]),
                               max_size=4).map(",".join)))
def test_task_parser(text):
    from sharp.evaluation.perplexity import parse_tasks

    tasks = _user_error(parse_tasks, text)
    if tasks is not None:
        assert tasks and len({t.name for t in tasks}) == len(tasks)


budget_texts = st.one_of(
    _spec_text(["match:", "40", "0.", "1e"]),
    st.builds(lambda x, s: f"{x}{s}", st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10**30),
              st.sampled_from(["", "%", "K", "M", "B", " %", "k"])),
)


@FAST
@given(text=budget_texts)
def test_budget_parser(text):
    from sharp.budget import SHARE, parse_budget

    budget = _user_error(parse_budget, text)
    if budget is None:
        return
    assert budget.kind in ("mlp_fraction", "count", "match")
    if budget.kind == "mlp_fraction":
        assert 0 < budget.value < 1
    if budget.kind == "count":
        assert 1 <= budget.value < float("inf")
    assert parse_budget(budget.text) == budget
    only_shares = _user_error(parse_budget, text, (SHARE,))  # `sharp analyze`: the same grammar, shares only
    assert only_shares == (budget if budget.kind == SHARE else None)


@FAST
@given(text=_spec_text(["1-", "2", " 3 - "]), n_layers=st.integers(1, 40))
def test_layer_range_parser(text, n_layers):
    from sharp.evaluation.similarity import parse_layer_range

    span = _user_error(parse_layer_range, text, n_layers)
    if span is not None:
        assert 1 <= span[0] <= span[1] < n_layers


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)
config_keys = st.sampled_from(["sharing", "recovery", "modules", "strategy", "base", "format_version",
                               "sharp_version", "other"])


@FAST
@given(doc=st.one_of(st.text(max_size=40), st.dictionaries(config_keys, json_values, max_size=7).map(json.dumps),
                     st.builds(lambda s, r: json.dumps({"sharing": s, "recovery": r}),
                               st.dictionaries(st.text("0123456789x", max_size=2), json_values, max_size=3),
                               json_values)))
@example(doc='{"sharing": {"0": Infinity}}')  # json reads Infinity; int() of it raised OverflowError
def test_sharp_config_reader(doc):
    from sharp.sharing.config import SharpConfig
    from sharp.sharing.recovery import parse_recovery

    cfg = _user_error(SharpConfig.from_json, doc)
    if cfg is None:
        return
    assert all(isinstance(t, int) and isinstance(r, int) for t, r in cfg.sharing.items())
    _user_error(parse_recovery, cfg.recovery)  # whatever the file said, the loader's next step is a user error
    assert SharpConfig.from_json(cfg.to_json()) == cfg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=60), json_values.map(json.dumps),
                         st.lists(json_values.map(json.dumps), max_size=4).map("\n".join)),
       ext=st.sampled_from([".json", ".jsonl", ".txt"]), fmt=st.sampled_from(["alpaca", "text", "dolly"]))
def test_data_file_reader(tmp_path_factory, content, ext, fmt):
    from sharp.data import load_records

    path = tmp_path_factory.mktemp("d") / f"data{ext}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    records = _user_error(load_records, f"{fmt}:{path}")
    if records is not None:
        assert records and all(isinstance(r, dict) for r in records)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True), slw_fraction=st.floats(-1, 2),
       eval_fraction=st.floats(-0.5, 1.5), batch_size=st.integers(-2, 8), grad_accum=st.integers(-2, 4),
       slw_steps=st.integers(-2, 10), sft_steps=st.integers(-2, 10), max_len=st.integers(-1, 2000),
       slw_workers=st.integers(-1, 3), epochs=st.floats(allow_nan=True), save_steps=st.integers(-1, 5))
def test_compress_numeric_flags(tmp_path_factory, **flags):
    from sharp.recipes import CompressConfig

    out = tmp_path_factory.mktemp("c") / "o"
    cfg = CompressConfig(model=str(STORIES), strategy="next:1-4", recovery="lora:4", data=f"text:{C4}",
                         out=str(out), **flags)
    _user_error(cfg.validate)
    assert not out.exists() and not cfg.work_dir.exists()


@pytest.mark.parametrize("text", ["", " ", "next:", "next:1-4,", "map:", "map:1=0,1=2", "group:1:0-4", "next:4-1"])
def test_strategy_examples_are_user_errors(text):
    from sharp.sharing.strategy import parse_strategy

    with pytest.raises(SharpError):
        parse_strategy(text)


def test_config_errors_name_the_field_for_the_api_and_the_flag_for_the_cli():
    from sharp.errors import SettingError, flag_names
    from sharp.recovery.slw_config import SLWConfig

    with pytest.raises(SettingError, match="^SLW max_tokens must be at least 2"):
        SLWConfig(max_tokens=1)
    with pytest.raises(SharpError, match="^--slw-tokens must be at least 2 \\(got 1\\)$"):
        with flag_names({"max_tokens": "--slw-tokens"}):
            SLWConfig(max_tokens=1)
    with pytest.raises(SettingError, match="^SLW steps must"):  # a setting the mapping does not name: unchanged
        with flag_names({"max_tokens": "--slw-tokens"}):
            SLWConfig(steps=0)
