"""The residual stream as read by the cache: SPEC 1 block outputs, generic block discovery."""

from __future__ import annotations

import pytest
import torch
from models import build_tiny_model

from mlsae_cache.errors import MlsaeError
from mlsae_cache.lm import ResidualReader, decoder_blocks, load_model, load_tokenizer, resolve_model_name


def final_norm(model):
    """The final norm, found independently of the code under test (by architecture)."""
    base = model.base_model
    for name in ("final_layer_norm", "norm", "ln_f"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError("no final norm")


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_block_outputs_match_hidden_states_and_last_is_before_final_norm(arch, pythia_tokenizer_dir, tmp_path):
    model_dir = build_tiny_model(tmp_path / arch, pythia_tokenizer_dir, arch=arch, n_layers=4)
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    ids = torch.tensor([tokenizer.encode("When John and Mary went to the store, John gave a drink to")])
    acts = ResidualReader(model, [0, 1, 2, 3]).read(ids)  # [1, S, 4, d]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings + 4 blocks
    assert len(hidden) == 5
    for layer in range(3):
        torch.testing.assert_close(acts[:, :, layer], hidden[layer + 1], rtol=0, atol=0)
    last = acts[:, :, 3]
    # transformers' last hidden state is the final norm of the last block's output, not the output itself
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(last), hidden[-1], rtol=1e-5, atol=1e-5)
    assert (last - hidden[-1]).abs().max() > 1e-2


def test_reading_a_subset_stops_early_and_equals_the_full_read(pythia_tokenizer_dir, tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", pythia_tokenizer_dir, n_layers=4)
    model = load_model(str(model_dir))
    ids = torch.randint(1, 50000, (2, 16))
    full = ResidualReader(model, [0, 1, 2, 3]).read(ids)
    calls = []
    handle = decoder_blocks(model)[3].register_forward_hook(lambda *a: calls.append(1))
    part = ResidualReader(model, [1]).read(ids)
    handle.remove()
    torch.testing.assert_close(part[:, :, 0], full[:, :, 1], rtol=0, atol=0)
    assert calls == []  # block 3 never ran


def test_pythia_names_resolve_to_eleutherai_ids():
    assert resolve_model_name("pythia-70m") == "EleutherAI/pythia-70m"
    assert resolve_model_name("pythia-1.4b-deduped") == "EleutherAI/pythia-1.4b-deduped"
    assert resolve_model_name("pythia-12b") == "EleutherAI/pythia-12b"
    assert resolve_model_name("gpt2") == "gpt2"
    assert resolve_model_name("pythia-71m") == "pythia-71m"


def test_layer_out_of_range_is_refused(pythia_tokenizer_dir, tmp_path):
    model = load_model(str(build_tiny_model(tmp_path / "m", pythia_tokenizer_dir, n_layers=2)))
    with pytest.raises(MlsaeError, match="layer 2 is out of range"):
        ResidualReader(model, [0, 2])
