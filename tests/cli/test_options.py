"""`sharp compress` and `sharp compare` take every recovery setting with the same flag and the API's default."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sharp.cli import options as opt
from sharp.recipes import RecoverySettings
from tests.conftest import run_cli

OWN = {"data", "out"}  # each command's own parameters (their help differs)


def test_every_recovery_setting_has_one_flag_with_the_api_default():
    fields = {f.name: f.default for f in dataclasses.fields(RecoverySettings) if f.name not in OWN}
    options = {**opt.LEADING_OPTIONS, **opt.RECOVERY_OPTIONS}
    assert set(options) == set(fields)
    hints = typing.get_type_hints(RecoverySettings)
    for name, option in options.items():
        assert opt.option_type(name, option) in (hints[name], *typing.get_args(hints[name])), name
    for name, option in opt.RECOVERY_OPTIONS.items():
        assert option.default == fields[name], name
        assert option.param_decls[0] == "--" + name.replace("_", "-")


def test_slw_settings_reach_the_slw_config():
    settings = RecoverySettings(model="stories", strategy="next:1-4", recovery="lora:4", data="alpaca-demo", out="o",
                                slw_sink_weight=0.25, slw_patience=7, slw_lr=3e-3, slw_tokens=100)
    cfg = settings.slw_config()
    assert (cfg.sink_weight, cfg.patience, cfg.lr, cfg.max_tokens) == (0.25, 7, 3e-3, 100)


@pytest.mark.parametrize("command", ["compress", "compare"])
def test_the_flags_reach_the_command_config(command, capsys, tmp_path):
    # an out-of-range value of an added flag is refused by the config's own check: the flag got through
    args = [command, "stories", "-s", "next:1-4", "--data", "alpaca-demo", "--out", tmp_path / "o",
            "--slw-fraction", "0", "--slw-backend", "ray"]
    if command == "compare":
        args += ["--eval", "ppl:alpaca=alpaca-demo[-4:]"]
    code, out, err = run_cli(args, capsys)
    assert code != 0
    assert "--slw-fraction must be in (0, 1]" in out + err
    assert "Traceback" not in out + err


def test_compare_help_lists_the_scale_out_flags(capsys):
    code, out, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0
    for flag in ("--slw-backend", "--ray-address", "--slw-task-gpus", "--device", "--dtype", "--shared-lr"):
        assert flag in out
