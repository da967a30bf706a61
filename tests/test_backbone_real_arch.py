"""``random:<model>``: every backbone family builds the real architecture of a named model with random
weights, offline (backbones/configs.py + each family's ``from_config``).

The parameter counts are those of the real checkpoints; the architectures are built on the meta device,
so these tests allocate no weights. Where the count comes from:

- SD-2.1-base UNet 865,910,724 / SD-1.5 UNet 859,520,964 / the SD VAE 83,653,863: the parameter counts of
  the hub checkpoints' unet and vae (diffusers), the same for every UNet2DConditionModel built from those
  configs;
- OpenCLIP ViT-H/14 text tower (SD-2.1's text encoder) 340,387,840: 23 layers x 12,596,224 (attention
  4 x (1024² + 1024), MLP 2 x 1024 x 4096 + 4096 + 1024, two LayerNorms 4 x 1024) + token embedding
  49,408 x 1024 + positions 77 x 1024 + final LayerNorm 2 x 1024;
- CLIP ViT-L/14 text tower (SD-1.5's) 123,060,480, the openai checkpoint's text model;
- open_clip ViT-B-16 149,620,737 (openai CLIP ViT-B/16, logit scale included);
- DINOv2-base 86,580,480: patch embedding 768 x 3 x 14² + 768, CLS and mask tokens 2 x 768, positions
  (1 + 37²) x 768, 12 layers x 7,089,408, final LayerNorm 2 x 768;
- SAM ViT-B 93,735,728: segment-anything's sam_vit_b (image encoder 89,670,912 + prompt encoder + mask
  decoder 4,058,340) plus the 2 x 128 random Fourier matrix that transformers keeps as a parameter.
"""

from __future__ import annotations

import pytest
import torch

from weakseg.backbones import configs
from weakseg.core import BACKBONES, PROPOSERS


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("spec, unet, text, cross, heads, pad", [
    ("random:stabilityai/stable-diffusion-2-1-base", 865_910_724, 340_387_840, 1024, {5, 10, 20}, "!"),
    ("random:sd21", 865_910_724, 340_387_840, 1024, {5, 10, 20}, "!"),
    ("random:stable-diffusion-v1-5/stable-diffusion-v1-5", 859_520_964, 123_060_480, 768, {8}, "<|endoftext|>"),
    ("random:runwayml/stable-diffusion-v1-5", 859_520_964, 123_060_480, 768, {8}, "<|endoftext|>"),
    ("random:sd15", 859_520_964, 123_060_480, 768, {8}, "<|endoftext|>"),
])
def test_stable_diffusion_real_sizes(spec, unet, text, cross, heads, pad):
    sd = BACKBONES.build("stable-diffusion", spec, device="meta", cache_dir=None)
    assert sd.device.type == "meta"
    assert count(sd.unet_model) == unet
    assert count(sd.vae) == 83_653_863
    assert count(sd.text_encoder) == text
    assert sd.unet_model.config.cross_attention_dim == cross
    assert {h for _, h in sd.attention_layers().values()} == heads
    assert sd.vae.config.scaling_factor == 0.18215 and sd.vae_scale_factor == 8
    assert sd.tokenizer.pad_token == pad and sd.tokenizer.model_max_length == 77
    assert type(sd.scheduler).__name__ == "PNDMScheduler"
    assert sd.timestep(50, 45) == 101  # DiCLIP's timestep on SD's schedule
    # the 512² input: 64x64 latents, the largest self-attention P = 4096 (up_blocks.3, the highest resolution)
    assert sd.unet_model.config.sample_size == 64
    act = sd.text_encoder.config.hidden_act
    assert act == ("gelu" if pad == "!" else "quick_gelu")


def test_clip_real_sizes():
    c = BACKBONES.build("clip", "random:ViT-B-16", pretrained="openai", cache_dir=None, pos_interp="bilinear",
                        device="meta")
    assert count(c.model) == 149_620_737
    assert c.patch_size == (16, 16) and c.native_grid == (14, 14) and c.embed_dim == 512
    assert c.pos_interp == "bilinear"
    # the openai tag's architecture switch (QuickGELU) and normalisation, nothing loaded
    from open_clip.transformer import QuickGELU

    assert isinstance(c.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert torch.allclose(torch.tensor(c.model.visual.image_mean), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    plain = BACKBONES.build("clip", "random:ViT-B/16", device="meta")
    assert count(plain.model) == 149_620_737
    assert not isinstance(plain.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    dense = BACKBONES.build("clip-dense", "random:ViT-B-16", surgery_layers=3, pretrained="openai", cache_dir=None,
                            device="meta")
    assert (dense.dim, dense.patch_size, dense.surgery_layers) == (512, 16, 3)


def test_dinov2_and_sam_real_sizes():
    d = BACKBONES.build("dinov2", "random:facebook/dinov2-base", layer=-1, layernorm=False, pad="zero", cache_dir=None,
                        device="meta")
    assert count(d.model) == 86_580_480
    assert (d.dim, d.patch_size, d.layernorm) == (768, 14, False)
    assert count(BACKBONES.build("dinov2", "random:dinov2-small", device="meta").model) == 22_056_576
    s = PROPOSERS.build("sam", "random:facebook/sam-vit-base", cache_dir=None, device="meta", points_per_side=16)
    assert count(s.model) == 93_735_728
    assert count(s.model.vision_encoder) == 89_670_912 and count(s.model.mask_decoder) == 4_058_340
    assert s.points_per_side == 16 and s._target_size() == 1024


@pytest.mark.parametrize("family, registry", [("stable-diffusion", BACKBONES), ("clip", BACKBONES),
                                              ("dinov2", BACKBONES), ("sam", PROPOSERS)])
def test_unknown_models_list_the_known_ones(family, registry):
    with pytest.raises(ValueError, match="known") as e:
        registry.build(family, "random:no-such-model", device="meta")
    known = {"stable-diffusion": "stabilityai/stable-diffusion-2-1-base", "clip": "ViT-B-16",
             "dinov2": "facebook/dinov2-base", "sam": "facebook/sam-vit-base"}[family]
    assert known in str(e.value)


def test_sam2_has_no_random_configs():
    pytest.importorskip("transformers", minversion="4.56")
    with pytest.raises(ValueError, match="sam2"):
        PROPOSERS.build("sam2", "random:facebook/sam2.1-hiera-tiny", device="meta")


def test_configs_are_data_with_their_sources():
    text = (configs.__file__ and open(configs.__file__, encoding="utf-8").read())
    for name in list(configs.STABLE_DIFFUSION) + list(configs.DINOV2) + list(configs.SAM):
        assert f"# {name}" in text, f"{name}: the comment naming the hub file it mirrors is missing"
    canonical, entry = configs.resolve("sd15", configs.STABLE_DIFFUSION, configs.STABLE_DIFFUSION_ALIASES, "sd")
    entry["unet"]["cross_attention_dim"] = 1  # a copy: the table stays as it is
    assert configs.STABLE_DIFFUSION[canonical]["unet"]["cross_attention_dim"] == 768


def test_random_weights_are_seeded_and_leave_the_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = BACKBONES.build("dinov2", "random:facebook/dinov2-small")
    b = BACKBONES.build("dinov2", "random:facebook/dinov2-small")
    c = BACKBONES.build("dinov2", "random:facebook/dinov2-small", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    wa, wb, wc = (m.model.embeddings.patch_embeddings.projection.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    x = torch.randint(0, 256, (1, 3, 70, 84), dtype=torch.uint8)
    assert a(x).tokens.shape == (1, 384, 5, 6)


def test_create_runs_on_a_random_real_architecture(tmp_path):
    """One real (small) build through weakseg.create: ModuSeg on DINOv2-small's architecture."""
    import weakseg
    from weakseg.methods.moduseg import FeatureBank

    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(12, 384, generator=g), dim=1)
    bank = FeatureBank(vectors, torch.arange(12) % 3, torch.zeros(12, dtype=torch.int64), ["s0"],
                       ["background", "cat", "dog"], "random-vectors")
    bank.save(tmp_path / "bank.safetensors")
    seg = weakseg.create("moduseg", backbone="dinov2", backbone_model="random:facebook/dinov2-small",
                         proposer="superpixel", bank=str(tmp_path / "bank.safetensors"), check_backbone=False,
                         min_area=16)
    img = torch.randint(0, 256, (3, 56, 70), dtype=torch.uint8, generator=g)
    out = seg.segment([img], ["background", "cat", "dog"])
    assert out.scores.shape == (1, 3, 56, 70) and out.labels.shape == (1, 56, 70)
