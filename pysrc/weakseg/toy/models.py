"""Configurations and builders of the toy world's models, and the CLIP text-tower conversion.

The toy models use the component types of the real ones, so every real code path runs on them:

- CLIP: an ``open_clip.model.CLIP`` (ViT image tower, causal text transformer over CLIP's 49,408-token
  BPE vocabulary) built by :meth:`weakseg.backbones.CLIPBackbone.tiny` from :data:`CLIP_CONFIG`;
- Stable Diffusion: a diffusers ``AutoencoderKL`` (:data:`VAE_CONFIG`, 64x64 RGB -> 16x16x4 latents), a
  diffusers ``UNet2DConditionModel`` with SD's block types (:data:`UNET_CONFIG`; cross-attention at the
  16x16, 8x8 and 4x4 latent levels), a transformers ``CLIPTextModel`` that is the toy CLIP's text tower
  converted by :func:`text_tower_to_hf` (same weights, same hidden states), the offline CLIP BPE
  tokenizer with SD 2.x's "!" padding (ids equal open_clip's), and SD's scheduler configuration.

The sizes keep the committed weights (fp16 storage) under 20 MB: CLIP ~5.1 MB (of which the 49,408 x 32
token embedding is 3.2 MB and the image tower's ConvStem 0.2 MB), SD ~14.0 MB (UNet 2.8M parameters = 5.6 MB, text encoder 3.3 MB, tokenizer
files 3.6 MB, VAE 0.7M parameters = 1.4 MB). The two copies of the token embedding dominate, hence the
text width of 32.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

__all__ = ["CLIP_CONFIG", "VAE_CONFIG", "UNET_CONFIG", "build_clip", "build_vae", "build_unet",
           "text_tower_to_hf", "assemble_sd"]

# open_clip CLIP through CLIPBackbone.tiny (keyword arguments of that constructor)
# conv_stem: a ConvStem (three 3x3 stride-2 convolutions) instead of the linear 8x8 patchify, with which the
# tiny ViT learned shape slowly (benchmarks/results/toyworld_training_notes.md).
CLIP_CONFIG: dict[str, Any] = dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, embed_dim=64,
                                   text_width=32, text_layers=4, text_heads=2, context_length=77, quick_gelu=False,
                                   conv_stem=[32, 64, 128])
# diffusers AutoencoderKL: 3 levels -> a 4x downsampling, 64x64 images -> 16x16x4 latents
VAE_CONFIG: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                                  block_out_channels=[16, 32, 64], norm_num_groups=16, sample_size=64,
                                  scaling_factor=1.0)
# diffusers UNet2DConditionModel with SD's block types (sd21-style: linear projections, per-level heads)
UNET_CONFIG: dict[str, Any] = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                   block_out_channels=[64, 64, 64, 64],
                                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                                   attention_head_dim=[2, 2, 2, 2], cross_attention_dim=32, norm_num_groups=32,
                                   use_linear_projection=True)


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(base))
    for k, v in (overrides or {}).items():
        if k not in cfg:
            raise KeyError(f"unknown config key {k!r}; expected one of {sorted(cfg)}")
        cfg[k] = v
    return cfg


def build_clip(seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A random-weight toy CLIP (:class:`weakseg.backbones.CLIPBackbone`), deterministic in ``seed``."""
    from weakseg.backbones.clip import CLIPBackbone

    cfg = _merged(CLIP_CONFIG, overrides)
    return CLIPBackbone.tiny(seed=seed, **cfg)


def build_vae(seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A random-weight diffusers ``AutoencoderKL`` from :data:`VAE_CONFIG` (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL

    cfg = _merged(VAE_CONFIG, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**cfg)


def build_unet(seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A random-weight diffusers ``UNet2DConditionModel`` from :data:`UNET_CONFIG` (deterministic in ``seed``)."""
    from diffusers import UNet2DConditionModel

    cfg = _merged(UNET_CONFIG, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg)


def text_tower_to_hf(clip_model: torch.nn.Module):
    """Convert the text tower of an ``open_clip.model.CLIP`` into a transformers ``CLIPTextModel``.

    The architectures are the same: token + position embeddings, causal pre-LN residual blocks
    (fused ``in_proj`` -> ``q_proj``/``k_proj``/``v_proj``, ``out_proj``, ``c_fc``/``c_proj`` -> ``fc1``/
    ``fc2``), final layer norm (``ln_final`` -> ``final_layer_norm``). The result's ``last_hidden_state``
    equals ``ln_final`` of open_clip's text transformer for every token (the text projection, which SD does
    not use, is dropped). Raises TypeError for towers that CLIPTextModel cannot express (non-causal, layer
    scale, another activation or pooling). Returns a float32 model in eval mode.
    """
    from open_clip.transformer import QuickGELU
    from transformers import CLIPTextConfig, CLIPTextModel

    need = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    missing = [n for n in need if not hasattr(clip_model, n)]
    if missing:
        raise TypeError(f"text_tower_to_hf: expected an open_clip CLIP with a built-in text tower, "
                        f"{type(clip_model).__name__} lacks {', '.join(missing)}")
    if getattr(clip_model, "attn_mask", None) is None:
        raise TypeError("text_tower_to_hf: the open_clip text tower is not causal (no attn_mask); CLIPTextModel is")
    if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
        raise TypeError(f"text_tower_to_hf: text_pool_type must be 'argmax' (the end-of-text token), got "
                        f"{clip_model.text_pool_type!r}")
    blocks = list(clip_model.transformer.resblocks)
    first = blocks[0]
    act = first.mlp.gelu
    if isinstance(act, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(act, torch.nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        raise TypeError(f"text_tower_to_hf: unsupported MLP activation {act!r} (expected nn.GELU or QuickGELU)")
    for b in blocks:
        if not isinstance(b.ls_1, torch.nn.Identity) or not isinstance(b.ls_2, torch.nn.Identity):
            raise TypeError("text_tower_to_hf: layer scale (ls_init_value) has no CLIPTextModel equivalent")
        if not isinstance(getattr(b.attn, "in_proj_weight", None), torch.Tensor):
            raise TypeError("text_tower_to_hf: expected nn.MultiheadAttention blocks with a fused in_proj_weight")
    W = clip_model.token_embedding.weight.shape[1]
    cfg = CLIPTextConfig(
        vocab_size=clip_model.token_embedding.weight.shape[0], hidden_size=W,
        intermediate_size=first.mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads, max_position_embeddings=clip_model.positional_embedding.shape[0],
        hidden_act=hidden_act, layer_norm_eps=clip_model.ln_final.eps,
        projection_dim=(clip_model.text_projection.shape[1] if isinstance(clip_model.text_projection, torch.Tensor)
                        else W),
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    hf = CLIPTextModel(cfg)
    sd: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": clip_model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": clip_model.positional_embedding,
        "text_model.final_layer_norm.weight": clip_model.ln_final.weight,
        "text_model.final_layer_norm.bias": clip_model.ln_final.bias,
    }
    for i, b in enumerate(blocks):
        p = f"text_model.encoder.layers.{i}."
        qw, kw, vw = b.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3, dim=0)
        sd.update({
            p + "self_attn.q_proj.weight": qw, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": kw, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": vw, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": b.attn.out_proj.weight, p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
            p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
            p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
            p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
            p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias,
        })
    own = hf.state_dict()
    # transformers < 5 nests the modules under ``text_model``; 5.x does not (its loader maps the hub's keys)
    nested = any(k.startswith("text_model.") for k in own)
    sd = {(k if nested else k[len("text_model."):]): v.detach().float().clone() for k, v in sd.items()}
    unexpected = sorted(set(sd) - set(own))
    absent = sorted(k for k in own if k not in sd and not k.endswith("position_ids"))
    if unexpected or absent:  # pragma: no cover - a transformers layout change
        raise RuntimeError(f"text_tower_to_hf: state-dict mismatch, unexpected {unexpected[:3]}, missing {absent[:3]}")
    hf.load_state_dict(sd, strict=False)
    return hf.float().eval()


def assemble_sd(vae, unet, text_encoder, tokenizer_dir: str | None = None):
    """A :class:`weakseg.backbones.StableDiffusionBackbone` from trained parts: the CLIP BPE tokenizer with
    SD 2.x's "!" padding (ids equal open_clip's, so the converted text tower sees what it was trained on)
    and SD's PNDM scheduler configuration."""
    from weakseg.backbones.diffusion import StableDiffusionBackbone, make_scheduler
    from weakseg.backbones.tokenizer import make_clip_tokenizer

    tok = make_clip_tokenizer(tokenizer_dir, pad_token="!")
    return StableDiffusionBackbone(vae, unet, text_encoder, tok, make_scheduler("pndm"), name="toyworld")
