from transformers import CLIPTokenizer

from sdtune import pretrain as P
from sdtune import toyworld as tw
from sdtune.models import load


def test_tokenizer_spells_every_word_as_one_token(tmp_path):
    P.build_tokenizer_files(tmp_path, tw.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in tw.vocabulary():
        assert tok.tokenize(w) == [w + "</w>"], w
    assert tok.tokenize("dog") == ["do", "g</w>"]  # unknown words fall back to pieces, never to <unk>
    assert tok.model_max_length == P.MAX_TOKENS


def test_pretraining_script_runs_end_to_end_and_is_seeded(tmp_path):
    kw = dict(vae_steps=2, unet_steps=2, n_images=16, vae_batch=2, unet_batch=2, seed=5)
    a = load(P.pretrain(tmp_path / "a", **kw))
    b = load(P.pretrain(tmp_path / "b", **kw))
    assert a.arch == "sd1" and not (tmp_path / "a.partial").exists()
    pa, pb = dict(a.pipeline.unet.named_parameters()), dict(b.pipeline.unet.named_parameters())
    assert all((pa[k] == pb[k]).all() for k in pa)


def test_continue_pretraining_trains_on_and_records_the_stage(tmp_path):
    import json

    folder = P.pretrain(tmp_path / "m", vae_steps=1, unet_steps=1, n_images=8, vae_batch=2, unet_batch=2, seed=3)
    before = {k: v.clone() for k, v in load(folder).pipeline.unet.state_dict().items()}
    P.continue_pretraining(folder, unet_steps=2, n_images=8, unet_batch=2, seed=1, style_rate=0.5)
    after = load(folder).pipeline.unet.state_dict()
    assert any(not (before[k] == after[k]).all() for k in before)
    record = json.loads((folder / "PRETRAINING.json").read_text())
    assert record["continued"][0]["command"].startswith(f"python -m sdtune.pretrain --continue-from {folder}")
    assert record["continued"][0]["command"].endswith("--style-rate 0.5") and record["continued"][0]["style_rate"] == 0.5
    assert not folder.with_name("m.partial").exists() and not folder.with_name("m.old").exists()
