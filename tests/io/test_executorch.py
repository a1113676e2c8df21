"""ExecuTorch export: each shared weight (and the tied embedding / LM head) is stored once in the program's
files, and the program's logits match PyTorch's.

The export form (LoRA as linear modules, fused gate/up recovery) is checked in PyTorch without ExecuTorch; the
rest needs the `[executorch]` extra and skips with one line without it. Lowering a model to XNNPACK takes
~15-30 s of CPU per exported model here, so those tests are marked slow and share two module-level exports.

Tolerances: fp32 programs run the same fp32 math in another order (1e-4 on logits of magnitude ~1); an 8da4w
program against the same quantized model in PyTorch differs by XNNPACK's own int8 activation rounding (5% of the
largest logit)."""

import copy
import json

import pytest
import torch

import sharp
from sharp.errors import SharpError
from sharp.io.executorch import ExportConfig
from sharp.io.executorch_lora import FusedLoRAMLP, LoRALinear, lora_modules
from tests.conftest import randomize_recovery, run_cli

SKIP = "optional extra executorch is not installed (pip install -e '.[executorch]')"
IDS = torch.tensor([[5, 301, 44, 90, 7, 400, 12, 3, 77, 2]])


def small_shared_model():
    """2 Llama layers, tied embedding, sizes XNNPACK's 4-bit groups of 32 divide; layer 1 reuses layer 0's MLP
    with lora:32 recovery (non-zero)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    sharp.share(model, "next:0-1", "lora:32")
    randomize_recovery(model)
    return model


@torch.no_grad()
def test_export_form_computes_the_same_function():
    model = small_shared_model()
    ref = model(IDS).logits
    for fuse in (True, False):
        m = copy.deepcopy(model)
        fused = lora_modules(m, fuse=fuse)
        assert fused == (1 if fuse else 0)
        kinds = {type(x) for x in m.modules()}
        assert (FusedLoRAMLP in kinds) == fuse and (LoRALinear in kinds)
        torch.testing.assert_close(m(IDS).logits, ref, atol=1e-5, rtol=1e-5)
    m = copy.deepcopy(model)
    lora_modules(m)
    fused = m.model.layers[1].mlp
    assert fused.gate is m.model.layers[0].mlp.gate_proj  # the reference's module itself, not a copy
    assert fused.down.base is m.model.layers[0].mlp.down_proj
    # XNNPACK does not delegate split: one would cut the delegate's graph at every target (+12 delegate calls per
    # token for next:6-29, measured); the gate/up halves of [Ag; Au] x are slices
    graph = torch.export.export(fused, (torch.randn(1, 1, 64),)).graph
    assert not [n for n in graph.nodes if "split" in str(n.target)], graph


def test_export_options_are_checked():
    with pytest.raises(SharpError, match="dtype"):
        ExportConfig(dtype="fp8")
    with pytest.raises(SharpError, match="quant"):
        ExportConfig(quant="int2")
    with pytest.raises(SharpError, match="recovery-bits"):
        ExportConfig(recovery_bits=3)
    with pytest.raises(SharpError, match="multiple of 32"):
        ExportConfig(quant="8da4w", group_size=48)


def test_cli_refuses_an_unknown_format(tmp_path, capsys):
    code, _, err = run_cli(["export", "smollm2-135m", "--format", "onnx", "--out", tmp_path / "o"], capsys)
    assert code != 0 and "executorch" in err


def test_export_without_executorch_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """What a user without the extra sees, forced here whether or not ExecuTorch is installed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "executorch" else find_spec(name, *a))
    ckpt = sharp.save(small_shared_model(), tmp_path / "ckpt")
    code, _, err = run_cli(["export", ckpt, "--format", "executorch", "--out", tmp_path / "o"], capsys)
    assert code != 0 and "'.[executorch]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# --- with ExecuTorch ---------------------------------------------------------------------------------------------

def _executorch():
    return pytest.importorskip("executorch", reason=SKIP)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (folder, the model as exported, its PyTorch reference)} for fp32 and 8da4w."""
    _executorch()
    from sharp.io.executorch import export_executorch

    root = tmp_path_factory.mktemp("pte")
    model = small_shared_model()
    ckpt = sharp.save(model, root / "ckpt")
    assert _cli(["export", ckpt, "--format", "executorch", "--out", root / "fp32", "--max-cache-len", "32"]) == 0
    export_executorch(ckpt, root / "8da4w", ExportConfig(quant="8da4w", max_cache_len=32, recovery_bits=8))
    return {"fp32": root / "fp32", "8da4w": root / "8da4w"}, model


def _cli(args: list) -> int:
    import sys

    from sharp.cli import main

    old, sys.argv = sys.argv, ["sharp", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0


def _bytes(folder) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(folder.iterdir()) if f.suffix in (".pte", ".ptd"))


def _count(haystack: bytes, t: torch.Tensor) -> int:
    return haystack.count(t.detach().contiguous().numpy().tobytes())


@pytest.mark.slow
def test_fp32_program_stores_each_shared_weight_once(exported):
    folders, model = exported
    blob = _bytes(folders["fp32"])
    layers = model.model.layers
    shared = layers[1].mlp.gate_proj.base_layer.weight
    assert shared is layers[0].mlp.gate_proj.weight
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert _count(blob, getattr(layers[0].mlp, proj).weight) == 1, proj
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _count(blob, model.model.embed_tokens.weight) == 1  # gather and LM head read one copy
    assert _count(blob, layers[1].mlp.down_proj.recovery.lora_B) == 1
    meta = json.loads((folders["fp32"] / "sharp_export.json").read_text())
    assert meta["sharp"] and meta["fused_mlps"] == 1 and meta["config"]["max_cache_len"] == 32


@pytest.mark.slow
@torch.no_grad()
def test_fp32_program_logits_match_pytorch(exported):
    from sharp.io.pte import PteModel

    folders, model = exported
    ref = model(IDS).logits[0]  # (seq, vocab)
    pte = PteModel(folders["fp32"])
    got = [pte(IDS[:, :6], 0)[0]] + [pte(IDS[:, i:i + 1], i)[0] for i in range(6, IDS.shape[1])]
    torch.testing.assert_close(torch.stack(got), ref[5:], atol=1e-4, rtol=1e-4)
    again = pte(IDS[:, :3], 0)[0]  # a new sequence from position 0 ignores the cached tail
    torch.testing.assert_close(again, ref[2], atol=1e-4, rtol=1e-4)
    with pytest.raises(SharpError, match="max-cache-len"):
        pte(IDS, 30)


@pytest.mark.slow
@torch.no_grad()
def test_8da4w_program_matches_quantized_pytorch_and_keeps_tied_int8_once(exported):
    from sharp.io.executorch import prepare
    from sharp.io.executorch_quant import Int8Embedding
    from sharp.io.pte import PteModel

    folders, model = exported
    q = copy.deepcopy(model)
    prepare(q, ExportConfig(quant="8da4w", max_cache_len=32, recovery_bits=8))
    emb = q.get_input_embeddings()
    assert isinstance(emb, Int8Embedding)
    assert _count(_bytes(folders["8da4w"]), emb.qdata) == 1  # the int8 LM head matrix, read by the gather too
    ref = q(IDS).logits[0, -1]
    pte = PteModel(folders["8da4w"])
    got = pte(IDS, 0)[0]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    fp32_bytes = sum(f.stat().st_size for f in folders["fp32"].iterdir() if f.suffix in (".pte", ".ptd"))
    q_bytes = sum(f.stat().st_size for f in folders["8da4w"].iterdir() if f.suffix in (".pte", ".ptd"))
    assert q_bytes < 0.4 * fp32_bytes


@pytest.mark.slow
@torch.no_grad()
def test_program_perplexity_and_greedy_tokens_match_pytorch(exported):
    from sharp.evaluation.perplexity import response_perplexity
    from sharp.io.pte import PteModel, pte_nll

    folders, model = exported
    pte = PteModel(folders["fp32"])
    labels = IDS.clone()
    labels[0, :4] = -100  # a prompt of 4 tokens, then the scored response
    examples = [{"input_ids": IDS[0], "labels": labels[0]}, {"input_ids": IDS[0, :7], "labels": IDS[0, :7]}]
    got, n = pte_nll(pte, examples)
    want = response_perplexity(model, examples, batch_size=1)
    assert n == want["tokens"] == 6 + 6
    assert abs(got / n - want["nll"]) < 1e-4 * want["nll"]
    ids = IDS[:, :3]
    for _ in range(4):  # PyTorch greedy, recomputing the whole sequence each time
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=-1)
    assert torch.equal(pte.generate(IDS[:, :3], 4), ids[:, 3:])


_LOAD_RSS = """
import sys, psutil
from sharp.io.pte import PteModel, load_runtime
runtime = load_runtime(weight_cache=sys.argv[2] == "on")
before = psutil.Process().memory_info().rss
model = PteModel(sys.argv[1], runtime)
print(psutil.Process().memory_info().rss - before)
"""


@pytest.mark.slow
def test_weight_cache_packs_a_shared_mlp_once(tmp_path):
    """XNNPACK repacks weights at load: with its weight cache on, the reference MLP both layers read is packed once
    (load adds about its bytes less memory than with the cache off; each load runs in a fresh process)."""
    _executorch()
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, LlamaConfig

    from sharp.io.executorch import export_executorch
    from sharp.io.pte import load_runtime, set_xnnpack_weight_cache

    load_runtime()
    assert set_xnnpack_weight_cache(False) is False and set_xnnpack_weight_cache(True) is True
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    sharp.share(model, "next:0-1", "lora:8")
    export_executorch(sharp.save(model, tmp_path / "ckpt"), tmp_path / "pte", ExportConfig(max_cache_len=8))
    added = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", _LOAD_RSS, str(tmp_path / "pte"), mode], capture_output=True,
                              text=True, check=True)
        added[mode] = int(proc.stdout.split()[-1])
    shared = 3 * 512 * 2048 * 4  # the reference MLP in fp32
    assert added["off"] - added["on"] >= 0.75 * shared, added
