"""The configurations of the real models behind ``random:<model>`` specs (real architecture, random
weights, no download), as data.

Each entry mirrors a configuration file of the model's hub repository (named in the comment above it);
only the fields the libraries read are kept (no ``_diffusers_version``, ``architectures``, ...), and
fields a library fills with the same default may be left out. The builders are the ``from_config``
classmethods of the backbone families (``StableDiffusionBackbone``, ``CLIPBackbone``,
``DINOv2Features``, ``CLIPDenseFeatures``, ``SAMProposer``); :func:`resolve` maps the accepted spellings
of a model name to its canonical name, refusing unknown names with the list of known ones.

open_clip models need no table: open_clip ships its model configurations (``open_clip.get_model_config``)
and builds random weights offline with ``pretrained=None``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = ["STABLE_DIFFUSION", "STABLE_DIFFUSION_ALIASES", "DINOV2", "DINOV2_ALIASES", "SAM", "SAM_ALIASES", "SAM_IMAGE_PROCESSOR",
           "resolve", "RANDOM_SEED"]

#: the seed of every ``random:<model>`` build unless ``seed=`` is given
RANDOM_SEED = 0

_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_VAE_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,  # absent from both hub files; diffusers' default, written out
}

_TEXT_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}

_SCHEDULER_COMMON: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: Stable Diffusion pipelines: canonical hub name -> component configs, the tokenizer's pad token
STABLE_DIFFUSION: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-2-1-base": {
        # stabilityai/stable-diffusion-2-1-base: unet/config.json
        "unet": dict(_UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True),
        # stabilityai/stable-diffusion-2-1-base: vae/config.json
        "vae": dict(_VAE_COMMON, sample_size=768),
        # stabilityai/stable-diffusion-2-1-base: text_encoder/config.json (the OpenCLIP ViT-H/14 text tower)
        "text_encoder": dict(_TEXT_COMMON, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                             num_attention_heads=16, num_hidden_layers=23, projection_dim=512),
        # stabilityai/stable-diffusion-2-1-base: scheduler/scheduler_config.json
        "scheduler": dict(_SCHEDULER_COMMON, prediction_type="epsilon"),
        # stabilityai/stable-diffusion-2-1-base: tokenizer/special_tokens_map.json (pad_token "!")
        "pad_token": "!",
        "layout": "sd21",
    },
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        # stable-diffusion-v1-5/stable-diffusion-v1-5 (= runwayml/stable-diffusion-v1-5): unet/config.json
        "unet": dict(_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False),
        # stable-diffusion-v1-5/stable-diffusion-v1-5: vae/config.json
        "vae": dict(_VAE_COMMON, sample_size=512),
        # stable-diffusion-v1-5/stable-diffusion-v1-5: text_encoder/config.json (the CLIP ViT-L/14 text tower)
        "text_encoder": dict(_TEXT_COMMON, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                             num_attention_heads=12, num_hidden_layers=12, projection_dim=768),
        # stable-diffusion-v1-5/stable-diffusion-v1-5: scheduler/scheduler_config.json
        "scheduler": dict(_SCHEDULER_COMMON),
        # stable-diffusion-v1-5/stable-diffusion-v1-5: tokenizer/special_tokens_map.json (pad = end-of-text)
        "pad_token": "<|endoftext|>",
        "layout": "sd15",
    },
}
STABLE_DIFFUSION_ALIASES: dict[str, str] = {
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "stable-diffusion-2-1-base": "stabilityai/stable-diffusion-2-1-base",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}

_DINOV2_COMMON: dict[str, Any] = {
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "image_size": 518,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "num_channels": 3,
    "patch_size": 14,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}

#: DINOv2 (transformers ``Dinov2Config``): canonical hub name -> config
DINOV2: dict[str, dict[str, Any]] = {
    # facebook/dinov2-small: config.json
    "facebook/dinov2-small": dict(_DINOV2_COMMON, hidden_size=384, num_attention_heads=6, num_hidden_layers=12),
    # facebook/dinov2-base: config.json
    "facebook/dinov2-base": dict(_DINOV2_COMMON, hidden_size=768, num_attention_heads=12, num_hidden_layers=12),
    # facebook/dinov2-large: config.json
    "facebook/dinov2-large": dict(_DINOV2_COMMON, hidden_size=1024, num_attention_heads=16, num_hidden_layers=24),
    # facebook/dinov2-giant: config.json
    "facebook/dinov2-giant": dict(_DINOV2_COMMON, hidden_size=1536, num_attention_heads=24, num_hidden_layers=40,
                                  use_swiglu_ffn=True),
}
DINOV2_ALIASES: dict[str, str] = {f"dinov2-{s}": f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant")}


def _sam(hidden: int, layers: int, heads: int, global_attn: list[int]) -> dict[str, Any]:
    return {
        "vision_config": {
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "global_attn_indexes": global_attn, "mlp_dim": 4 * hidden, "output_channels": 256,
            "image_size": 1024, "patch_size": 16, "window_size": 14, "num_pos_feats": 128,
            "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True, "hidden_act": "gelu",
            "layer_norm_eps": 1e-06, "mlp_ratio": 4.0, "num_channels": 3,
        },
        "prompt_encoder_config": {
            "hidden_size": 256, "image_size": 1024, "patch_size": 16, "image_embedding_size": 64,
            "mask_input_channels": 16, "num_point_embeddings": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-06,
        },
        "mask_decoder_config": {
            "hidden_size": 256, "mlp_dim": 2048, "num_hidden_layers": 2, "num_attention_heads": 8,
            "attention_downsample_rate": 2, "num_multimask_outputs": 3, "iou_head_depth": 3,
            "iou_head_hidden_dim": 256, "hidden_act": "relu", "layer_norm_eps": 1e-06,
        },
        "initializer_range": 0.02,
    }


#: the image processor of every SAM checkpoint: facebook/sam-vit-*: preprocessor_config.json
SAM_IMAGE_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "pad_size": {"height": 1024, "width": 1024}, "resample": 2, "rescale_factor": 1 / 255,
    "size": {"longest_edge": 1024},
}

#: SAM (transformers ``SamConfig``): canonical hub name -> config
SAM: dict[str, dict[str, Any]] = {
    # facebook/sam-vit-base: config.json
    "facebook/sam-vit-base": _sam(768, 12, 12, [2, 5, 8, 11]),
    # facebook/sam-vit-large: config.json
    "facebook/sam-vit-large": _sam(1024, 24, 16, [5, 11, 17, 23]),
    # facebook/sam-vit-huge: config.json
    "facebook/sam-vit-huge": _sam(1280, 32, 16, [7, 15, 23, 31]),
}
SAM_ALIASES: dict[str, str] = {f"sam-vit-{s}": f"facebook/sam-vit-{s}" for s in ("base", "large", "huge")}
SAM_ALIASES.update({"vit_b": "facebook/sam-vit-base", "vit_l": "facebook/sam-vit-large",
                    "vit_h": "facebook/sam-vit-huge"})


def resolve(name: str, table: Mapping[str, Any], aliases: Mapping[str, str], family: str) -> tuple[str, Any]:
    """(canonical name, a deep copy of its entry) for ``name`` (canonical or an alias); an unknown name is a
    ValueError listing the known names."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{family}: random:<model> needs a model name, got {name!r}")
    key = name.strip()
    key = aliases.get(key, key)
    if key not in table:
        known = sorted(set(table) | set(aliases))
        raise ValueError(f"{family}: no real-architecture config for {name!r} (random:<model>); known: "
                         f"{', '.join(known)}")
    return key, copy.deepcopy(table[key])
