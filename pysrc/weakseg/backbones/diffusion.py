"""Stable Diffusion backbone (diffusers): VAE encoding, noising, one UNet pass with attention capture,
class-token re-weighting, and image generation.

Used by DiffSegmenter and iSeg (cross/self-attention maps, docs/specs/diffsegmenter_iseg.md §1-§2) and by
DiCLIP (self-attention q/k and probabilities, image generation for the key-value cache;
docs/specs/diclip.md §2a, §3a).

Layouts: ``stabilityai/stable-diffusion-2-1-base`` (the default; per-block head counts 5/10/20/20 of
width 64, linear projections in the transformers, OpenCLIP-H text encoder of width 1024, pad token "!")
and ``runwayml/stable-diffusion-v1-5`` (8 heads in every layer, conv projections, CLIP-L text encoder
of width 768, pad token = end-of-text). :meth:`StableDiffusionBackbone.tiny` builds either layout with
the same block structure and layer names (``up_blocks.3.attentions.1.transformer_blocks.0.attn1`` ...)
at toy widths with random weights.

Prompt weighting (``encode_prompt``): DiffSegmenter builds its prompt embeddings with Compel, whose
``word++`` syntax gives the word weight 1.1² = 1.21 and, for a weight w > 1, replaces each of the
word's token embeddings e by ``e_empty + w·(e − e_empty)``, where e_empty is the text encoder's output
for the empty prompt at the same position (spec §1). That is what is implemented, for ``word+…``,
``(several words)+…`` and ``(several words)1.3`` (explicit weight ≥ 1). Compel's down-weighting
(``word-``, weights < 1) works differently (it re-encodes the prompt without the fragment) and is not
described by the specs, so it is rejected with an error. iSeg's category enhancement is the plain
scaling of the selected text-encoder output rows by γ: :meth:`StableDiffusionBackbone.reweight`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from weakseg.backbones.attention import AttentionStore, LayerCapture, attention_layer_info, install_capture
from weakseg.backbones.configs import RANDOM_SEED, STABLE_DIFFUSION as SD_CONFIGS
from weakseg.backbones.configs import STABLE_DIFFUSION_ALIASES as SD_CONFIG_ALIASES, resolve as resolve_config
from weakseg.backbones.hub import hub_error, require_hub
from weakseg.backbones.tokenizer import CLIP_VOCAB_SIZE, EOS_TOKEN, make_clip_tokenizer
from weakseg.core import BACKBONES, FromSpec, check_images

__all__ = ["StableDiffusionBackbone", "DEFAULT_MODEL", "LAYOUTS", "parse_prompt_weights"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
LAYOUTS = ("sd21", "sd15")
SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
RESAMPLES = ("nearest", "bilinear", "lanczos")
_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", clip_sample=False)

# --------------------------------------------------------------------------------------------------
# prompt weighting (the Compel "++" subset DiffSegmenter uses)

_WEIGHT_RX = re.compile(
    r"\((?P<group>[^()]*)\)(?P<gw>\++|-+|\d+(?:\.\d+)?)"  # (several words)++ / (words)1.3
    r"|(?P<word>[^\s()+]+?)(?P<ww>\++|-+)(?=[\s,.;:!?]|$)"  # word++ (the signs end the word)
)


def parse_prompt_weights(prompt: str) -> tuple[str, list[tuple[int, int, float]]]:
    """Strip Compel-style weights from ``prompt``.

    Returns the plain text and the weighted character spans ``(start, end, weight)`` in it:
    ``word+`` × n gives 1.1**n, ``(a phrase)`` followed by pluses or a number gives that weight.
    Weights below 1 (``word-``, ``(x)0.5``) are rejected: the specs describe only up-weighting.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
    out, spans, pos = [], [], 0
    for m in _WEIGHT_RX.finditer(prompt):
        out.append(prompt[pos:m.start()])
        text = m.group("group") if m.group("group") is not None else m.group("word")
        sign = m.group("gw") if m.group("group") is not None else m.group("ww")
        if sign[0] == "+":
            weight = 1.1 ** len(sign)
        elif sign[0] == "-":
            raise ValueError(f"prompt {prompt!r}: down-weighting {m.group(0)!r} is not supported "
                             "(only Compel's up-weighting 'word++' / '(words)1.3' with weight >= 1)")
        else:
            weight = float(sign)
            if weight < 1:
                raise ValueError(f"prompt {prompt!r}: weight {weight} of {m.group(0)!r} is below 1; only "
                                 "up-weighting (weight >= 1) is supported")
        start = sum(len(s) for s in out)
        out.append(text)
        spans.append((start, start + len(text), weight))
        pos = m.end()
    out.append(prompt[pos:])
    return "".join(out), spans


# --------------------------------------------------------------------------------------------------
# tiny configs

def _tiny_components(seed: int, layout: str, sample_size: int, unet_channels: Sequence[int],
                     heads: Sequence[int] | int | None, text_width: int, text_layers: int,
                     vae_channels: Sequence[int], scheduler: str, tokenizer_dir: str | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unet_channels = tuple(int(c) for c in unet_channels)
    if len(unet_channels) != 4:
        raise ValueError(f"unet_channels: expected 4 block widths (the SD layouts have 4 levels), got {unet_channels}")
    if heads is None:
        # sd21: per-block head counts of constant width (as 5/10/20/20 x 64); sd15: one head count for all
        heads = [max(1, c // unet_channels[0]) for c in unet_channels] if layout == "sd21" else 2
    groups = math.gcd(*unet_channels)
    groups = 8 if groups % 8 == 0 else groups
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=unet_channels,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=list(heads) if isinstance(heads, (list, tuple)) else int(heads),
            cross_attention_dim=text_width, norm_num_groups=groups,
            use_linear_projection=(layout == "sd21"),
        )
        vgroups = math.gcd(*vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=tuple(vae_channels), norm_num_groups=8 if vgroups % 8 == 0 else vgroups,
            sample_size=sample_size * 2 ** (len(vae_channels) - 1), scaling_factor=0.18215,
        )
        text_cfg = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=text_width, intermediate_size=2 * text_width,
            num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=77,
            projection_dim=text_width, hidden_act="gelu" if layout == "sd21" else "quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )
        text_encoder = CLIPTextModel(text_cfg)
    tokenizer = make_clip_tokenizer(tokenizer_dir, pad_token="!" if layout == "sd21" else EOS_TOKEN)
    return vae, unet, text_encoder, tokenizer, make_scheduler(scheduler)


def make_scheduler(kind: str, config: Mapping[str, Any] | None = None):
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "pndm":
        cfg = dict(config or _SD_SCHEDULER)
        cfg["skip_prk_steps"] = True
        return PNDMScheduler.from_config(cfg)
    if kind == "ddim":
        return DDIMScheduler.from_config(dict(config or _SD_SCHEDULER))
    raise ValueError(f"scheduler must be 'pndm' or 'ddim', got {kind!r}")


def _looks_like_hub_name(name: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name) is not None and not name.startswith((".", "~"))
            and ".." not in name)


# --------------------------------------------------------------------------------------------------

@BACKBONES.register("stable-diffusion")
class StableDiffusionBackbone(FromSpec):
    """Stable Diffusion components and the few operations the segmentation methods need.

    Attributes: ``vae`` (AutoencoderKL), ``unet_model`` (UNet2DConditionModel), ``text_encoder``
    (CLIPTextModel), ``tokenizer`` (CLIPTokenizer), ``scheduler`` (PNDM or DDIM, SD's scaled-linear betas).
    All inference runs under ``torch.no_grad()``.
    """

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler, name: str = "custom"):
        self.vae = vae.eval()
        self.unet_model = unet.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.name = name
        self._store: AttentionStore | None = None
        self._empty_embeds: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    FAMILY = "stable-diffusion"
    DEFAULT_SPEC = DEFAULT_MODEL

    @classmethod
    def _tiny(cls, variant: str | None, *, device="cpu", dtype: torch.dtype | None = None,
              cache_dir: str | None = None, **kw) -> "StableDiffusionBackbone":
        """``tiny``: the SD-2.1 layout with 4 heads in every attention layer (seed 0); ``tiny:sd15`` the SD-1.5
        layout with 4 heads. ``cache_dir`` holds the offline tokenizer files."""
        layout = variant or "sd21"
        if layout not in ("sd21", "sd15"):
            raise ValueError(f"stable-diffusion: tiny variants are tiny (SD-2.1 layout) and tiny:sd15, got "
                             f"tiny:{variant}")
        return cls.tiny(seed=0, layout=layout, heads=4, tokenizer_dir=cache_dir).to(device, dtype)

    @classmethod
    def tiny(cls, seed: int = 0, layout: str = "sd21", sample_size: int = 8, *,
             unet_channels: Sequence[int] = (16, 32, 32, 64), heads: Sequence[int] | int | None = None,
             text_width: int = 32, text_layers: int = 2, vae_channels: Sequence[int] = (8, 8, 16, 16),
             scheduler: str = "pndm", tokenizer_dir: str | None = None) -> "StableDiffusionBackbone":
        """Random weights, deterministic for ``seed``, in the ``layout`` ("sd21" or "sd15") of the real
        models: 4 UNet levels (3 cross-attention down blocks + a plain one, mirrored up), 2 layers per
        block, per-block head counts (sd21; default 1, 2, 2, 4) or one head count (sd15; default 2),
        linear transformer projections for sd21, an 8x VAE, a CLIP text encoder of width ``text_width``
        over the full 49,408-token CLIP vocabulary (offline tokenizer, see ``backbones/tokenizer.py``).
        ``sample_size`` is the default latent side of :meth:`generate`."""
        parts = _tiny_components(seed, layout, sample_size, unet_channels, heads, text_width, text_layers,
                                 vae_channels, scheduler, tokenizer_dir)
        return cls(*parts, name=f"tiny-{layout}")

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, cache_dir: str | None = None, device="cpu",
                        dtype: torch.dtype | None = None, **kw) -> "StableDiffusionBackbone":
        """Load a diffusers pipeline layout (subfolders vae, unet, text_encoder, tokenizer, scheduler)
        from a hub name (downloaded into ``cache_dir``) or a local directory (read with
        ``local_files_only=True``; never touches the network). Extra keywords (e.g. ``variant="fp16"``)
        go to every component's ``from_pretrained``."""
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path: expected a hub name or a directory, got {type(name_or_path).__name__}")
        name = os.fspath(name_or_path)
        path = Path(name).expanduser()
        expected = ("a diffusers Stable Diffusion pipeline directory with subfolders " + ", ".join(SUBFOLDERS) +
                    f", or a hub name such as {DEFAULT_MODEL!r}")
        local = path.is_dir()
        if local:
            missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
            if missing:
                raise FileNotFoundError(f"Stable Diffusion: {str(path)!r} lacks the subfolder(s) {', '.join(missing)}; "
                                        f"expected {expected}")
            source = str(path)
        elif path.exists() or not _looks_like_hub_name(name):
            what = "is not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"Stable Diffusion: {name!r} {what}; expected {expected}")
        else:
            source = name
            require_hub(name, "Stable Diffusion model")
        where = dict(cache_dir=cache_dir, local_files_only=local)
        common = dict(where, **kw)
        try:
            sched_cfg = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler", **where)
            sched_cls = getattr(diffusers, sched_cfg.get("_class_name", ""), None)
            if sched_cls is None:
                raise OSError(f"unknown scheduler class {sched_cfg.get('_class_name')!r} in {source}/scheduler")
            scheduler = sched_cls.from_config(sched_cfg)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **where)
            dkw = {} if dtype is None else {"torch_dtype": dtype}
            if importlib.util.find_spec("accelerate") is None:  # what diffusers falls back to, without its warning
                dkw["low_cpu_mem_usage"] = False
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **common, **dkw)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common, **dkw)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common,
                                                         **({} if dtype is None else {"dtype": dtype}))
        except (OSError, ValueError) as e:
            if not local and isinstance(e, OSError):
                raise hub_error(e, name, "Stable Diffusion model") from None
            where = f"directory {str(path)!r}" if local else f"hub model {name!r} (cache_dir={cache_dir!r})"
            raise OSError(f"Stable Diffusion: could not load the {where}: {e}; expected {expected}") from e
        sd = cls(vae, unet, text_encoder, tokenizer, scheduler, name=name)
        return sd.to(device, dtype)

    @classmethod
    def from_config(cls, model: str = DEFAULT_MODEL, *, cache_dir: str | None = None, device="cpu",
                    dtype: torch.dtype | None = None, seed: int = RANDOM_SEED, **kw) -> "StableDiffusionBackbone":
        """``random:<model>``: the real architecture of ``model`` (UNet, VAE, text encoder and scheduler
        configs of its hub repository, :data:`weakseg.backbones.configs.STABLE_DIFFUSION`) with random
        weights drawn from ``seed`` (the global RNG is left untouched), no download. ``model``: a hub name
        (``stabilityai/stable-diffusion-2-1-base``, ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
        ``runwayml/stable-diffusion-v1-5``) or ``sd21`` / ``sd15``. ``device="meta"`` builds without
        allocating (parameter counts). ``cache_dir`` holds the offline tokenizer files; other keywords
        (what :meth:`from_pretrained` passes to the hub) have nothing to load and are ignored."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        import diffusers
        from transformers import CLIPTextConfig, CLIPTextModel

        canonical, cfg = resolve_config(model, SD_CONFIGS, SD_CONFIG_ALIASES, cls.FAMILY)
        meta = torch.device(device).type == "meta"
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(int(seed))
            unet = UNet2DConditionModel.from_config(cfg["unet"])
            vae = AutoencoderKL.from_config(cfg["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        sched = cfg["scheduler"]
        scheduler = getattr(diffusers, sched["_class_name"]).from_config(sched)
        tokenizer = make_clip_tokenizer(cache_dir, pad_token=cfg["pad_token"])
        sd = cls(vae, unet, text_encoder, tokenizer, scheduler, name=f"random:{canonical}")
        return sd if meta and dtype is None else sd.to(device, dtype)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the diffusers pipeline layout (model_index.json and one subfolder per component,
        safetensors weights) that :meth:`from_pretrained` reads."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self._pipeline().save_pretrained(str(out), safe_serialization=True)
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusionBackbone":
        for m in (self.vae, self.unet_model, self.text_encoder):
            m.to(device=device)
            if dtype is not None and next(m.parameters()).dtype != dtype:  # (diffusers warns on any dtype cast)
                m.to(dtype=dtype)
        self._empty_embeds = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet_model.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_scheduler(self, kind: str) -> None:
        """Swap in a PNDM ("pndm", skip_prk_steps, SD's default) or DDIM ("ddim", what DiffSegmenter and
        iSeg use) scheduler with the same betas. Noising (:meth:`add_noise`) is identical for both."""
        cfg = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        self.scheduler = make_scheduler(kind, cfg)

    def timestep(self, num_inference_steps: int, index: int) -> int:
        """The UNet timestep at position ``index`` of the scheduler's ``num_inference_steps``-step schedule
        (DiCLIP: PNDM, 50 steps, index 45 -> t = 101). Leaves ``self.scheduler`` untouched."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(int(num_inference_steps))
        ts = sched.timesteps
        if not -len(ts) <= index < len(ts):
            raise IndexError(f"timestep: index {index} out of range for a {len(ts)}-entry schedule")
        return int(ts[index])

    # ------------------------------------------------------------------ images -> latents
    @torch.no_grad()
    def encode_images(self, images, size: int | tuple[int, int] = 512, sample: bool = False,
                      generator: torch.Generator | None = None, resample: str = "nearest") -> torch.Tensor:
        """RGB uint8 images (B, 3, H, W) or a list of (3, H, W) -> latents (B, 4, h/8, w/8) in the model's
        dtype: resized to ``size`` (an int for a square, or (h, w); multiples of 8), scaled to [-1, 1],
        VAE posterior mean (``sample=False``, iSeg, DiCLIP) or a posterior sample (DiffSegmenter) drawn
        with ``generator``, times the VAE's ``scaling_factor``.

        ``resample``: "nearest" is what diffusers' VaeImageProcessor does with tensor input (DiCLIP);
        "lanczos" what it does with PIL images; "bilinear" (align_corners=False) what DiffSegmenter and
        iSeg do."""
        items = check_images(images)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        f = self.vae_scale_factor
        if h <= 0 or w <= 0 or h % f or w % f:
            raise ValueError(f"encode_images: size must be positive multiples of {f}, got {size!r}")
        if resample not in RESAMPLES:
            raise ValueError(f"encode_images: resample must be one of {', '.join(RESAMPLES)}, got {resample!r}")
        from diffusers.image_processor import VaeImageProcessor

        proc = VaeImageProcessor(vae_scale_factor=f, resample="lanczos")
        batch = []
        for im in items:
            if resample == "lanczos":
                from PIL import Image

                pil = Image.fromarray(im.permute(1, 2, 0).cpu().numpy())
                x = proc.preprocess(pil, height=h, width=w)
            elif resample == "nearest":
                x = proc.preprocess(im[None].float().div(255), height=h, width=w)
            else:
                x = F.interpolate(im[None].float().div(255), size=(h, w), mode="bilinear", align_corners=False)
                x = x.clamp(0, 1) * 2 - 1
            batch.append(x)
        x = torch.cat(batch).to(device=self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return (z * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> RGB uint8 images (B, 3, 8h, 8w)."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    def _timesteps(self, t, batch: int) -> torch.Tensor:
        tt = torch.as_tensor(t, device=self.device)
        if tt.is_floating_point() and not torch.equal(tt, tt.round()):
            raise ValueError(f"timestep t must be integer-valued, got {t!r}")
        tt = tt.long().reshape(-1)
        if tt.numel() == 1:
            tt = tt.expand(batch)
        if tt.numel() != batch:
            raise ValueError(f"timestep t: expected one value or one per batch item ({batch}), got {tt.numel()}")
        n = self.scheduler.config.num_train_timesteps
        if int(tt.min()) < 0 or int(tt.max()) >= n:
            raise ValueError(f"timestep t must lie in [0, {n}), got {tt.tolist()}")
        return tt

    @torch.no_grad()
    def add_noise(self, latents: torch.Tensor, t, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward diffusion to timestep ``t`` (int or one per item) with the scheduler:
        ``√ᾱ_t · z + √(1−ᾱ_t) · ε``. ``noise`` defaults to a standard normal draw from ``generator``.
        Returns ``(noisy_latents, noise)``."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError(f"add_noise: expected latents of shape (B, 4, h, w), got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        elif noise.shape != latents.shape:
            raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} differs from latents {tuple(latents.shape)}")
        tt = self._timesteps(t, latents.shape[0]).to(latents.device)
        return self.scheduler.add_noise(latents, noise.to(latents), tt), noise

    # ------------------------------------------------------------------ prompts
    def _prompts(self, prompts) -> list[str]:
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if not items or not all(isinstance(p, str) for p in items):
            raise TypeError(f"prompts: expected a string or a non-empty list of strings, got {prompts!r}")
        return items

    def _tokenize(self, texts: list[str], offsets: bool = False):
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt", return_offsets_mapping=offsets)

    def prompt_token_weights(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, 77) of the prompts with the weight syntax removed, and each token's weight
        (B, 77) float32 (1 except inside ``word++`` / ``(words)++`` / ``(words)1.3``)."""
        items = self._prompts(prompts)
        parsed = [parse_prompt_weights(p) for p in items]
        enc = self._tokenize([t for t, _ in parsed], offsets=True)
        weights = torch.ones(enc.input_ids.shape, dtype=torch.float32)
        for b, (_, spans) in enumerate(parsed):
            for i, (s, e) in enumerate(enc.offset_mapping[b].tolist()):
                if e <= s:
                    continue  # special and padding tokens
                for (a, z, w) in spans:
                    if s < z and e > a:
                        weights[b, i] = w
        return enc.input_ids, weights

    @torch.no_grad()
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeds (B, 77, D) in the model's dtype, input_ids (B, 77) int64): the text encoder's
        last hidden state (after its final layer norm), as diffusers' pipeline computes it without clip
        skip. Compel-style ``word++`` weights are applied to the weighted tokens (module docstring);
        prompts without weight syntax are encoded unchanged."""
        ids, weights = self.prompt_token_weights(prompts)
        embeds = self._encode_ids(ids)
        if (weights != 1).any():
            empty = self._empty_prompt_embeds().to(embeds)
            w = weights.to(embeds.device, torch.float32)[..., None]
            weighted = (empty.float() + w * (embeds.float() - empty.float())).to(embeds.dtype)
            embeds = torch.where(w != 1, weighted, embeds)
        return embeds.to(self.dtype), ids

    def _empty_prompt_embeds(self) -> torch.Tensor:
        if self._empty_embeds is None:
            self._empty_embeds = self._encode_ids(self._tokenize([""]).input_ids)
        return self._empty_embeds

    def token_indices(self, prompt: str, phrase: str, occurrence: int = 0) -> list[int]:
        """Positions in the tokenized ``prompt`` (position 0 = the start-of-text token; weight syntax
        removed) of the tokens of ``phrase`` (one or more words, one or more BPE tokens each): the
        ``occurrence``-th (0-based) exact occurrence of the phrase's token sequence. Raises ValueError
        naming both strings if the phrase does not occur (or was cut by the 77-token limit)."""
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"token_indices: phrase must be a non-empty string, got {phrase!r}")
        text, _ = parse_prompt_weights(prompt)
        full = self.tokenizer(text, add_special_tokens=True).input_ids
        kept = full[: self.tokenizer.model_max_length - 1]  # the encoder sees 76 tokens + end-of-text
        target = self.tokenizer(phrase.strip(), add_special_tokens=False).input_ids
        L = len(target)
        hits = [i for i in range(len(kept) - L + 1) if kept[i:i + L] == target]
        if occurrence < len(hits):
            return list(range(hits[occurrence], hits[occurrence] + L))
        everywhere = [i for i in range(len(full) - L + 1) if full[i:i + L] == target]
        toks = self.tokenizer.convert_ids_to_tokens(target)
        if len(everywhere) > len(hits) and occurrence < len(everywhere):
            raise ValueError(f"token_indices: phrase {phrase!r} ({toks}) lies beyond the 77-token limit in prompt "
                             f"{prompt!r}")
        raise ValueError(f"token_indices: phrase {phrase!r} (tokens {toks}) occurs {len(hits)} time(s) in prompt "
                         f"{prompt!r}; occurrence {occurrence} requested")

    @staticmethod
    def reweight(embeds: torch.Tensor, indices: Sequence[int] | Sequence[Sequence[int]], gamma: float) -> torch.Tensor:
        """A copy of ``embeds`` (B, T, D) with the rows ``indices`` multiplied by ``gamma`` (iSeg's
        category-enhanced cross-attention, γ = 1.6). ``indices``: positions for every batch item, or one
        list per item."""
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise ValueError(f"reweight: expected embeds of shape (B, T, D), got "
                             f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
        B, T, _ = embeds.shape
        idx = list(indices)
        per_item = bool(idx) and all(isinstance(i, (list, tuple, torch.Tensor)) for i in idx)
        rows = [list(map(int, r)) for r in idx] if per_item else [list(map(int, idx))] * B
        if len(rows) != B:
            raise ValueError(f"reweight: {len(rows)} index lists for a batch of {B}")
        scale = torch.ones(B, T, 1, dtype=torch.float32)
        for b, r in enumerate(rows):
            bad = [i for i in r if not -T <= i < T]
            if bad:
                raise IndexError(f"reweight: indices {bad} out of range for {T} tokens")
            scale[b, r] = float(gamma)
        return (embeds.float() * scale.to(embeds.device)).to(embeds.dtype)

    # ------------------------------------------------------------------ UNet + capture
    def attention_layers(self, kind: str | None = None) -> dict[str, tuple[str, int]]:
        """Attention layer name -> (kind "self"/"cross", head count), optionally of one kind."""
        info = attention_layer_info(self.unet_model)
        return {n: (i.kind, i.heads) for n, i in info.items() if kind is None or i.kind == kind}

    @contextmanager
    def capture(self, *specs: LayerCapture | Mapping[str, Any] | str) -> Iterator[AttentionStore]:
        """``with sd.capture(spec, ...) as cap:`` record attention of the matched layers during the UNet
        calls in the block (see :mod:`weakseg.backbones.attention`); the default processors are back on
        exit. Specs: :class:`LayerCapture`, a layer pattern, or ``{pattern: {store, heads, group, cond_only}}``."""
        if self._store is not None:
            raise RuntimeError("capture: a capture is already active on this backbone; captures do not nest")
        with install_capture(self.unet_model, specs) as store:
            self._store = store
            try:
                yield store
            finally:
                self._store = None

    @torch.no_grad()
    def unet(self, latents_noisy: torch.Tensor, t, embeds: torch.Tensor, capture=None):
        """One UNet forward: noise prediction (B, 4, h, w) for latents (B, 4, h, w) at timestep ``t``
        (int or one per item) conditioned on ``embeds`` (B or 1, 77, D). With ``capture`` (specs as
        :meth:`capture` takes) returns ``(noise_pred, AttentionStore)`` for this call."""
        if capture is not None:
            specs = capture if isinstance(capture, (list, tuple)) else [capture]
            with self.capture(*specs) as store:
                return self.unet(latents_noisy, t, embeds), store
        C = self.unet_model.config.in_channels
        if not isinstance(latents_noisy, torch.Tensor) or latents_noisy.dim() != 4 or latents_noisy.shape[1] != C:
            got = tuple(latents_noisy.shape) if isinstance(latents_noisy, torch.Tensor) else latents_noisy
            raise ValueError(f"unet: expected latents of shape (B, {C}, h, w), got {got!r}")
        B = latents_noisy.shape[0]
        D = self.unet_model.config.cross_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[2] != D or \
                embeds.shape[0] not in (1, B):
            raise ValueError(f"unet: expected embeds of shape ({B} or 1, T, {D}), got "
                             f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else embeds!r}")
        if embeds.shape[0] != B:
            embeds = embeds.expand(B, -1, -1)
        if self._store is not None:
            self._store.latent_hw = tuple(latents_noisy.shape[-2:])
        tt = self._timesteps(t, B)
        out = self.unet_model(latents_noisy.to(self.device, self.dtype), tt,
                              encoder_hidden_states=embeds.to(self.device, self.dtype)).sample
        return out

    # ------------------------------------------------------------------ generation
    def _pipeline(self, scheduler=None):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet_model, scheduler=scheduler or self.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 generator: torch.Generator | int | None = None, height: int | None = None,
                 width: int | None = None, negative_prompt: str | Sequence[str] | None = None) -> torch.Tensor:
        """Text-to-image through diffusers' ``StableDiffusionPipeline`` on these components (a copy of the
        scheduler, so ``self.scheduler`` keeps its state). ``generator``: a torch.Generator or an int seed.
        Returns RGB uint8 images (B, 3, height, width); height/width default to the UNet's sample size × 8.
        (DiCLIP's cache: 45 steps, guidance 10, seed 4307, 384², docs/specs/diclip.md §3a.)"""
        items = self._prompts(prompts)
        if isinstance(generator, int):
            generator = torch.Generator(device=self.device).manual_seed(generator)
        f = self.vae_scale_factor
        for nm, v in (("height", height), ("width", width)):
            if v is not None and (v <= 0 or v % f):
                raise ValueError(f"generate: {nm} must be a positive multiple of {f}, got {v}")
        sched = type(self.scheduler).from_config(self.scheduler.config)
        out = self._pipeline(sched)(items, num_inference_steps=int(num_inference_steps),
                                    guidance_scale=float(guidance_scale), generator=generator, height=height,
                                    width=width, negative_prompt=negative_prompt, output_type="pt")
        return (out.images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
