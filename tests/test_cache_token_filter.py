"""mlsae_cache.token_filter: the position and norm rules against brute force, the median, the counts,
and one-line errors for bad thresholds (issue 12 item 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from models import assert_one_line_error

from mlsae_cache.errors import MlsaeError
from mlsae_cache.token_filter import (
    FilterCounts,
    TokenFilter,
    check_settings,
    describe,
    identity_entry,
    median_norms,
    parse_norm_thresholds,
)

B, S, L, D = 3, 7, 4, 5


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """acts [B, S, L, d] with a planted sequence-start outlier at every layer >= 1, and a stored mask
    whose special tokens sit at (0, 3) and (2, 0)."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(B, S, L, D, generator=gen)
    acts[:, 0, 1:] *= 100.0  # position 0: huge at layers 1..3, normal at layer 0
    acts[1, 4, 2] *= 50.0  # one mid-sequence outlier at layer 2 only
    stored = torch.ones(B, S, dtype=torch.bool)
    stored[0, 3] = stored[2, 0] = False
    return acts, stored


def reference(acts: torch.Tensor, stored: torch.Tensor, skip: int, thresholds) -> tuple[np.ndarray, dict]:
    """Token by token, as the module docstring defines it."""
    a, s = acts.numpy().astype(np.float64), stored.numpy()
    keep = np.zeros((B, S), dtype=bool)
    counts = {"by_position": 0, "by_norm": 0, "by_norm_layer": [0] * L}
    for b in range(B):
        for p in range(S):
            if not s[b, p]:
                continue
            if p < skip:
                counts["by_position"] += 1
                continue
            over = [thresholds is not None and np.linalg.norm(a[b, p, layer]) > thresholds[layer] for layer in range(L)]
            if any(over):
                counts["by_norm"] += 1
                for layer in range(L):
                    counts["by_norm_layer"][layer] += int(over[layer])
                continue
            keep[b, p] = True
    return keep, counts


def test_defaults_keep_every_stored_token(batch) -> None:
    acts, stored = batch
    keep, counts = TokenFilter().keep(stored, acts)
    assert torch.equal(keep, stored) and counts == FilterCounts(0, 0, [0] * L)


@pytest.mark.parametrize("skip", [0, 1, 2])
@pytest.mark.parametrize("ratio", [None, 5.0])
def test_keep_mask_and_counts_equal_brute_force(batch, skip: int, ratio) -> None:
    acts, stored = batch
    thresholds = None
    if ratio is not None:
        candidates = stored & (torch.arange(S) >= skip)[None]
        thresholds = (ratio * median_norms(acts, candidates)).tolist()
    keep, counts = TokenFilter(skip, thresholds).keep(stored, acts)
    expected_keep, expected_counts = reference(acts, stored, skip, thresholds)
    assert np.array_equal(keep.numpy(), expected_keep)
    assert counts.to_json() == expected_counts
    if ratio is not None and skip == 0:  # the planted outliers: position 0 everywhere but (2, 0), special; (1, 4) at layer 2
        assert counts.by_norm == 3 and counts.by_norm_layer == [0, 2, 3, 2]
    if ratio is not None and skip >= 1:
        assert counts.by_norm == 1 and counts.by_norm_layer == [0, 0, 1, 0]


def test_median_is_numpys_over_the_candidates(batch) -> None:
    acts, stored = batch
    for candidates in (stored, stored & (torch.arange(S) >= 1)[None]):
        norms = np.linalg.norm(acts.numpy().astype(np.float64), axis=-1)[candidates.numpy()]  # [n, L]
        np.testing.assert_allclose(median_norms(acts, candidates).numpy(), np.median(norms, axis=0), rtol=1e-6)
    with pytest.raises(MlsaeError, match="--skip-positions"):
        median_norms(acts, torch.zeros(B, S, dtype=torch.bool))


def test_counts_add_and_round_trip_through_json() -> None:
    total = FilterCounts(1, 2, [0, 2]).add(FilterCounts(3, 1, [1, 0]))
    assert total == FilterCounts(4, 3, [1, 2])
    assert FilterCounts.from_json(json.loads(json.dumps(total.to_json()))) == total
    assert FilterCounts().add(FilterCounts(0, 1, [0, 1])) == FilterCounts(0, 1, [0, 1])


def test_describe_says_what_was_left_out() -> None:
    entry = {"by_position": 0, "by_norm": 0, "by_norm_layer": {"3": 0, "4": 0}}
    assert describe(entry, 100) == "token filter: no token left out (100 stored)"
    line = describe({"by_position": 8, "by_norm": 2, "by_norm_layer": {"3": 0, "4": 2}}, 990)
    assert line.startswith("token filter: left out 10 tokens (1.00%): 8 at the first positions") and "layer 4: 2" in line
    assert "layer 3" not in line and "\n" not in line


def test_identity_is_none_when_off_so_older_caches_still_match() -> None:
    assert identity_entry(0, None, None) is None
    assert identity_entry(1, None, None) == {"skip_positions": 1, "max_norm_ratio": None, "norm_thresholds": None}
    assert identity_entry(0, 10.0, None) != identity_entry(0, 20.0, None)


def test_parse_thresholds_values_files_and_errors(tmp_path) -> None:
    layers = [2, 5, 7]
    assert parse_norm_thresholds("100", layers) == [100.0] * 3
    assert parse_norm_thresholds("1,2,3.5", layers) == [1.0, 2.0, 3.5]
    (tmp_path / "t.json").write_text(json.dumps({"2": 1, "5": 2, "7": 3, "9": 4}))
    assert parse_norm_thresholds(str(tmp_path / "t.json"), layers) == [1.0, 2.0, 3.0]
    (tmp_path / "t.txt").write_text("10 20\n30\n")
    assert parse_norm_thresholds(str(tmp_path / "t.txt"), layers) == [10.0, 20.0, 30.0]
    (tmp_path / "partial.json").write_text(json.dumps({"2": 1}))
    for spec, message in (("1,2", "gives 2 thresholds for 3 cached layers"), ("1,-2,3", "threshold -2.0 is not a positive"),
                          ("a,b,c", "is not a list of numbers"), (str(tmp_path / "nope.json"), "no such file"),
                          (str(tmp_path / "partial.json"), "no threshold for layer 5"), ("1,inf,2", "threshold inf")):  # fmt: skip
        with pytest.raises(MlsaeError, match=message) as info:
            parse_norm_thresholds(spec, layers)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings, message",
    [((-1, None, None), "--skip-positions must be 0 or more"), ((8, None, None), "every position"),
     ((0, 0.0, None), "--max-norm-ratio must be a positive"), ((0, float("nan"), None), "--max-norm-ratio"),
     ((0, 5.0, "100"), "give one of them")],  # fmt: skip
)
def test_impossible_settings_are_refused(settings, message) -> None:
    with pytest.raises(MlsaeError, match=message):
        check_settings(*settings, seq_len=8)
    check_settings(7, 5.0, None, seq_len=8)  # the largest skip that leaves a position


# ----------------------------------------------------------------------------- mlsae-cache end to end

SEQ_LEN, N_SEQUENCES, BATCH = 32, 6, 2


@pytest.fixture(scope="module")
def tiny(pythia_tokenizer_dir, tmp_path_factory):
    from models import build_tiny_model, write_english

    root = tmp_path_factory.mktemp("filter")
    return build_tiny_model(root / "model", pythia_tokenizer_dir, n_layers=3, d_model=16, context=64), write_english(root / "text", n_files=2, words_per_file=150)


def run_cache(tiny, out, *extra) -> int:
    from mlsae_cache.cli import main as cache_main

    model_dir, text_dir = tiny
    return cache_main(["--model", str(model_dir), "--dataset", str(text_dir), "--out", str(out), "--seq-len", str(SEQ_LEN),
                       "--tokens", str(SEQ_LEN * N_SEQUENCES), "--batch-size", str(BATCH), "--shard-mb", "0.005",
                       "--dtype", "float32", "--no-progress", *extra])  # fmt: skip


def expected_tokens(tiny, skip: int, ratio: float) -> tuple[set, dict]:
    """(sequence, position) of every token the filter keeps, and the counts, recomputed from the model."""
    from mlsae_cache.lm import ResidualReader, load_model, load_tokenizer
    from mlsae_cache.text import special_token_ids

    model_dir, text_dir = tiny
    tokenizer = load_tokenizer(str(model_dir))
    stream: list[int] = []
    for path in sorted(text_dir.glob("*.txt")):
        stream += tokenizer.encode(path.read_text(), add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = torch.tensor(stream[: N_SEQUENCES * SEQ_LEN]).view(N_SEQUENCES, SEQ_LEN)
    with torch.no_grad():
        acts = ResidualReader(load_model(str(model_dir)), [0, 1, 2]).read(ids).double()  # [N, S, L, d]
    norms = acts.norm(dim=-1).numpy()  # [N, S, L]
    stored = ~np.isin(ids.numpy(), special_token_ids(tokenizer))
    candidates = stored[:BATCH].copy()
    candidates[:, :skip] = False
    thresholds = ratio * np.median(norms[:BATCH][candidates], axis=0)  # [L] over the first batch
    kept, counts = set(), {"by_position": 0, "by_norm": 0, "by_norm_layer": [0, 0, 0]}
    for s in range(N_SEQUENCES):
        for p in range(SEQ_LEN):
            if not stored[s, p]:
                continue
            if p < skip:
                counts["by_position"] += 1
            elif (norms[s, p] > thresholds).any():
                counts["by_norm"] += 1
                counts["by_norm_layer"] = [c + int(o) for c, o in zip(counts["by_norm_layer"], norms[s, p] > thresholds)]
            else:
                kept.add((s, p))
    return kept, {**counts, "thresholds": thresholds}


def test_cache_leaves_out_and_counts_exactly_what_the_filter_says_and_resumes_alike(tiny, tmp_path, capsys) -> None:
    from mlsae_cache import open_cache
    from mlsae_cache import shard_format as sf

    out = tmp_path / "cache"
    assert run_cache(tiny, out, "--skip-positions", "1", "--max-norm-ratio", "1.3") == 0
    cache = open_cache(out)
    table = cache.token_table()
    kept, counts = expected_tokens(tiny, skip=1, ratio=1.3)
    assert counts["by_norm"] > 0 and counts["by_position"] == N_SEQUENCES  # the test means something
    assert set(zip(table["sequence"].to_list(), table["position"].to_list())) == kept and cache.n_tokens == len(kept)
    left_out = cache.manifest["tokens_left_out"]
    assert left_out["by_position"] == counts["by_position"] and left_out["by_norm"] == counts["by_norm"]
    assert list(left_out["by_norm_layer"].values()) == counts["by_norm_layer"]
    np.testing.assert_allclose(list(left_out["norm_thresholds"].values()), counts["thresholds"], rtol=1e-5)
    assert cache.manifest["token_filter"] == {"skip_positions": 1, "max_norm_ratio": 1.3, "norm_thresholds": None}

    # a resumed run (shard 0 and the last shard lost) uses the recorded thresholds and ends with the same files
    n_shards = cache.manifest["n_shards"]
    assert n_shards >= 3
    before = {p.name: p.read_bytes() for p in (out / sf.SHARD_DIR).iterdir()}
    for index in (0, n_shards - 1):
        (out / sf.SHARD_DIR / sf.sidecar_name(index)).unlink()
    (out / sf.MANIFEST).unlink()
    assert run_cache(tiny, out, "--skip-positions", "1", "--max-norm-ratio", "1.3") == 0
    assert {p.name: p.read_bytes() for p in (out / sf.SHARD_DIR).iterdir()} == before
    assert open_cache(out).manifest["tokens_left_out"] == left_out

    # other filter settings are another cache: refused in one line, nothing touched
    capsys.readouterr()
    assert run_cache(tiny, out, "--skip-positions", "2", "--max-norm-ratio", "1.3") == 2
    assert_one_line_error(capsys.readouterr().err, "token_filter", "--overwrite")
    assert {p.name: p.read_bytes() for p in (out / sf.SHARD_DIR).iterdir()} == before


def test_user_thresholds_and_the_default_leave_nothing_unsaid(tiny, tmp_path, capsys) -> None:
    from mlsae_cache import open_cache

    assert run_cache(tiny, tmp_path / "plain") == 0
    plain = open_cache(tmp_path / "plain").manifest
    assert plain.get("token_filter") is None and "tokens_left_out" not in plain  # the default: as before
    _, counts = expected_tokens(tiny, skip=0, ratio=1.3)
    values = ",".join(repr(float(t)) for t in counts["thresholds"])
    assert run_cache(tiny, tmp_path / "user", "--norm-thresholds", values, "--progress") == 0
    printed = capsys.readouterr().out
    manifest = open_cache(tmp_path / "user").manifest
    assert manifest["tokens_left_out"]["by_position"] == 0 and manifest["tokens_left_out"]["by_norm"] > 0
    assert manifest["token_filter"]["norm_thresholds"] == pytest.approx(counts["thresholds"].tolist(), rel=1e-6)
    assert f"token filter: left out {manifest['tokens_left_out']['by_norm']:,} tokens" in printed
    assert manifest["n_tokens"] == plain["n_tokens"] - manifest["tokens_left_out"]["by_norm"]
    for args, words in ((["--norm-thresholds", "1,2"], "gives 2 thresholds for 3 cached layers"),
                        (["--max-norm-ratio", "2", "--norm-thresholds", "5"], "give one of them"),
                        (["--skip-positions", str(SEQ_LEN)], "every position")):  # fmt: skip
        assert run_cache(tiny, tmp_path / "bad", *args) == 2
        assert_one_line_error(capsys.readouterr().err, words)
    assert not (tmp_path / "bad" / "config.json").exists()
