from transformers import CLIPTokenizer

from sdtune.models import load
from sdtune.toy import pretrain as P
from sdtune.toy import world as tw


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
    assert record["continued"][0]["command"].startswith(f"python -m sdtune.toy.pretrain --continue-from {folder}")
    assert record["continued"][0]["command"].endswith("--style-rate 0.5") and record["continued"][0]["style_rate"] == 0.5
    assert not folder.with_name("m.partial").exists() and not folder.with_name("m.old").exists()


def test_continue_pretraining_makes_a_v_prediction_twin(tmp_path):
    import json

    folder = P.pretrain(tmp_path / "m", vae_steps=1, unet_steps=1, n_images=8, vae_batch=2, unet_batch=2, seed=3)
    twin = P.continue_pretraining(folder, unet_steps=1, n_images=8, unet_batch=2, out=tmp_path / "v",
                                  prediction_type="v_prediction", zero_terminal_snr=True)
    sched = load(twin).pipeline.scheduler.config
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr
    assert sched.timestep_spacing == "trailing"
    assert load(folder).pipeline.scheduler.config.prediction_type == "epsilon"  # the source is left as it was
    stage = json.loads((twin / "PRETRAINING.json").read_text())["continued"][-1]
    assert stage["prediction_type"] == "v_prediction" and stage["zero_terminal_snr"]
    assert stage["command"].endswith(f"--out {twin} --prediction-type v_prediction --zero-terminal-snr")


def test_sdxl_base_has_sdxls_module_tree_and_pretrains(tmp_path):
    """The embedded SDXL base's layout: every U-Net module name of the published SDXL exists in it with the same
    block structure (A1111 maps SDXL adapters by that structure), it fits the size budget, and a few pretraining
    steps write a StableDiffusionXLPipeline folder that loads offline as SDXL and samples."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from sdtune.archs import build_unet
    from sdtune.models import EMBEDDED
    from sdtune.sample import SampleRequest, generate

    published = build_unet("sdxl", device="meta")
    tok = CLIPTokenizer.from_pretrained(EMBEDDED / "tokenizer")
    unet, tes = P.build_sdxl(tok)
    assert [n for n, _ in unet.named_modules()] == [n for n, _ in published.named_modules()]
    assert [type(m).__name__ for m in unet.modules()] == [type(m).__name__ for m in published.modules()]
    n_params = sum(p.numel() for m in (unet, *tes) for p in m.parameters())
    assert n_params * 2 < 20e6  # fp16 bytes: with the 2.7 MB VAE, well under 25 MB

    # a snapshot at step 1 (written in fp16) must not touch the EMA that trains on to step 2
    folder = P.pretrain_sdxl(tmp_path / "xl", base=EMBEDDED, unet_steps=2, n_images=8, unet_batch=2, seed=1,
                             snapshot_every=1)
    assert (tmp_path / "xl.snapshot" / "model_index.json").is_file()
    model = load(folder)
    assert model.arch == "sdxl" and isinstance(model.pipeline, StableDiffusionXLPipeline)
    assert model.pipeline.unet.dtype == torch.float32 and model.resolution == tw.IMAGE_SIZE
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 25e6
    image = generate(model, SampleRequest(["a red star"], steps=2), progress=False)[0].image
    assert image.size == (tw.IMAGE_SIZE, tw.IMAGE_SIZE)

    # a time-capped run goes on from its folder: both text encoders train, the folder stays fp16 SDXL
    before = {k: v.clone() for k, v in model.pipeline.text_encoder_2.state_dict().items()}
    P.continue_pretraining(folder, unet_steps=1, n_images=8, unet_batch=2, out=tmp_path / "xl2")
    again = load(tmp_path / "xl2")
    assert again.arch == "sdxl"
    after = again.pipeline.text_encoder_2.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    weights = next((tmp_path / "xl2" / "unet").glob("*.safetensors"))
    with safe_open(weights, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
