"""`sharp bench` rows for ExecuTorch program folders: every field, measured in a fresh process with ExecuTorch's
runtime (nothing here checks a speed). Needs the `[executorch]` extra; skips with one line without it."""

import json

import pytest
import torch

from sharp.bench.runner import FIELDS
from sharp.errors import SharpError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def pte_folder(tmp_path_factory):
    pytest.importorskip("executorch", reason="optional extra executorch is not installed")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sharp.io.executorch import ExportConfig, export_executorch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("bench_pte")
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    export_executorch(root / "hf", root / "pte", ExportConfig(max_cache_len=16))
    return root / "pte"


@pytest.mark.slow
def test_bench_measures_a_pte_folder(pte_folder, tmp_path, capsys):
    out = tmp_path / "b.json"
    code, _, err = run_cli(["bench", pte_folder, "--json", out, "--repeats", "1", "--load-repeats", "1",
                            "--tokens", "2", "--prompt-tokens", "4", "--threads", "1"], capsys)
    assert code == 0, err
    (r,) = json.loads(out.read_text())["models"]
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    files = [pte_folder / "model.pte", pte_folder / "weights.ptd"]
    assert r["mode"] == "executorch" and r["bytes_on_disk"] == sum(f.stat().st_size for f in files)
    assert r["decode_tok_s"] > 0 and r["cold_load_s"] > 0 and r["peak_rss_mib"] > 0
    assert len(r["runs"]["decode_tok_s"]) == 1
    assert r["xnnpack_weight_cache"] is True  # as phone builds run XNNPACK (see sharp.io.pte)


@pytest.mark.slow
def test_bench_refuses_what_a_pte_cannot_do(pte_folder, tmp_path):
    from sharp.bench.runner import bench

    with pytest.raises(SharpError, match="ExecuTorch program"):
        bench([f"{pte_folder}@merged"])
    with pytest.raises(SharpError, match="max-cache-len"):
        bench([str(pte_folder)], tokens=16, prompt_tokens=4, repeats=1)


@pytest.mark.slow
def test_bench_paired_decodes_programs_in_turn(pte_folder, tmp_path, capsys):
    out = tmp_path / "b.json"
    code, _, err = run_cli(["bench", pte_folder, pte_folder, "--json", out, "--repeats", "1", "--load-repeats", "1",
                            "--tokens", "2", "--prompt-tokens", "4", "--threads", "1", "--paired", "2"], capsys)
    assert code == 0, err
    first, second = json.loads(out.read_text())["models"]
    assert first["decode_paired"]["ratios"] == [1.0, 1.0]
    assert len(second["decode_paired"]["decode_tok_s"]) == 2 and min(second["decode_paired"]["decode_tok_s"]) > 0
