import pytest
import torch

import sharp
from sharp.arch import ADAPTERS, get_adapter
from sharp.errors import SharpError
from sharp.sharing.shared import merge_sharing, shared_linears
from tests.conftest import randomize_recovery, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gemma3_text", "phi3"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_adapter_finds_layers_and_projections(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    assert len(layers) == model.config.num_hidden_layers
    for block, proj in adapter.projections("all"):
        assert isinstance(getattr(getattr(layers[0], block), proj), torch.nn.Linear)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("modules", ["mlp", "attn", "all"])
def test_share_then_merge_matches_on_each_architecture(model_type, modules):
    model = tiny_model(model_type)
    ids = torch.randint(0, 128, (2, 10))
    sharp.share(model, "next:1-4", "lora+scale:2", modules=modules)
    n_proj = len(get_adapter(model).projections(modules))
    assert len(shared_linears(model)) == 2 * n_proj  # targets 2 and 4
    randomize_recovery(model)
    with torch.no_grad():
        shared_logits = model(ids).logits
        merge_sharing(model)
        merged_logits = model(ids).logits
    assert not shared_linears(model)
    torch.testing.assert_close(shared_logits, merged_logits, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_one_clear_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(SharpError) as e:
        sharp.share(model, "next:0-1", "none")
    msg = str(e.value)
    assert "gpt2" in msg and "\n" not in msg
    for name in ADAPTERS:
        assert name in msg
