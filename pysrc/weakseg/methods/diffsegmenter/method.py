"""DiffSegmenter: Stable Diffusion cross-attention maps, fused over resolutions and propagated once by
the UNet's 64x64 self-attention (docs/specs/diffsegmenter_iseg.md, prefix DS).

Per image and candidate class ``c`` (one conditional UNet item each, batched):

1. the image is resized bilinearly to ``image_size`` (512), encoded by the VAE as a **posterior
   sample**, noised to each timestep of ``timesteps`` (t = 100) with one noise draw per image (all of
   its classes and timesteps share it; ``noise_draws`` > 1, not the reference's: that many draws, the
   maps of every (timestep, draw) averaged in step 5); the generator is re-seeded with ``config.seed`` for every image,
   so an image's result does not depend on the batch it comes in;
2. prompt ``"a photograph of {c}++"`` with the reference's class words (``rename_classes``: VOC's
   plane, buses, table, people, plant, monitor by default; the ``code-context`` / ``code-coco`` presets
   write the Context / COCO scripts' words and ``"a photography of {c}++"``) + an optional caption
   continuation; ``word++`` = Compel weight 1.21 on the class tokens (``StableDiffusionBackbone.
   encode_prompt``); one UNet pass at t;
3. cross-attention of every cross layer, averaged over layers and heads per resolution (8/16/32/64 for
   a 512² input; in general latent/8 … latent), the class token column(s) selected (with the token
   after the class if the next whitespace word ends in "ing", ``fuse_ing`` / ``ing_rule``), bilinearly
   upsampled to the latent grid, min-max normalised and weighted ``cross_weights`` = [0.3, 0.5, 0.1, 0.1]
   → ``x`` (P,), P = latent pixels;
4. ``M = mean_{l,h} softmax(Q_lh K_lhᵀ/√d) · x`` over the 64x64 self-attention layers
   (``down_blocks.0`` ×2 + ``up_blocks.3`` ×3, every head). ``propagation="reference"`` (what "auto",
   the default, picks on the CPU while two P x P float32 maps per item fit ``attention_budget_mib``)
   keeps one running mean of the probabilities in the UNet pass, the captured layers computing their
   output from the same probabilities (each map formed once, as in the reference's processor), then
   A @ x; ``propagation="fused"`` (auto on CUDA or over the budget) is plain attention with V = x:
   ``scaled_dot_product_attention(q, k, x)`` per layer from the captured q/k, never forming a P x P map
   (tested to agree);
5. M averaged over timesteps (and noise draws), bilinearly upsampled to the image size, per-class min-max; (optional, not
   DiffSegmenter's: ``pamr_iterations`` of PAMR on the image;) background = constant τ (``bg_threshold``),
   label = argmax over [τ, M_1, …].

``baseline=True`` skips step 4 (the fused cross-attention maps with the same background rule).

Differences from the reference code, all output-preserving or documented (docs/methods.md):

- the reference runs the batch [uncond "", prompt] and keeps the conditional half's attention; the noise
  prediction is never used and UNet batch items are independent, so only the conditional item is run;
- the reference reads fixed token positions (4, and 5 for the "ing" word; Context / COCO 3 + L) after
  renaming classes to its words; here the positions are found by tokenizing, so multi-token class names
  work (``class_token``: mean of all their tokens by default, or the first / last); the COCO script's
  "ing" token 5 + L (the token after the "ing" word) is read as 4 + L;
- captions: the reference seeds BLIP-large with "a photograph of {c}" and appends BLIP's continuation;
  here a caption is optional: ``segment(..., captions=[...])`` (one user text per image, appended after
  the class phrase), or BLIP when ``config.captioner`` names a ``BlipForConditionalGeneration`` model, or
  none (the default: the prompt is just "a photograph of {c}++", so the "ing" fusion has nothing to fuse);
- min-max without the reference's 0 / 0 on constant maps: a range at the rounding level of the values
  gives 0 (``methods.common.minmax_per_class``);
- candidate classes: the image-level labels when given (weakly-supervised), else CLIP zero-shot tagging
  (``open_vocab="clip"``, the reference reads a precomputed JSON whose generator is unpublished) or every
  class (``open_vocab="all"``);
- τ: the reference reports the best τ of a sweep 0.30…0.74 **on the evaluation set**; the default here
  is a fixed 0.5 and :func:`sweep_bg_threshold` reproduces the sweep for those who want the protocol.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from weakseg.backbones.attention import LayerCapture
from weakseg.core import BACKBONES, METHODS, SegmentationOutput, check_segment_inputs
from weakseg.methods.common import (BackgroundRule, StageTimer, clip_tag_classes, has_background, image_label_mask,
                                    load_tagger_clip, minmax_per_class, pamr_maps, resize_maps, scores_to_labels)
from weakseg.methods.diffsegmenter.attention import fuse_cross_attention, propagate_fused, propagate_reference
from weakseg.methods.diffsegmenter.config import CROSS_ATTENTION_LAYERS, SELF_ATTENTION_LAYERS, DiffSegmenterConfig
from weakseg.methods.diffsegmenter.prompts import (build_prompt, caption_continuation, caption_seed,
                                                   class_token_positions)

__all__ = ["DiffSegmenter"]


# ----------------------------------------------------------------------------------------- backbone hook

def _torch_dtype(config: "DiffSegmenterConfig") -> torch.dtype:
    name = config.dtype
    if name == "auto":
        name = "float16" if str(config.device).startswith("cuda") else "float32"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load_backbone(config: "DiffSegmenterConfig"):
    dtype = _torch_dtype(config)
    sd = BACKBONES.build("stable-diffusion", config.model, cache_dir=config.cache_dir, device=config.device,
                         dtype=dtype)
    return sd.to(config.device, dtype) if sd.dtype != dtype or sd.device != torch.device(config.device) else sd


# ----------------------------------------------------------------------------------------- method

@METHODS.register("diffsegmenter", config=DiffSegmenterConfig)
class DiffSegmenter:
    """DiffSegmenter (module docstring). ``backbone``, ``clip`` and ``captioner`` may be given ready-made
    (a ``StableDiffusionBackbone``, a ``CLIPBackbone``, a ``(model, processor)`` BLIP pair); otherwise
    they come from the config (CLIP and BLIP lazily, when first needed)."""

    def __init__(self, config: DiffSegmenterConfig | None = None, backbone=None, clip=None, captioner=None):
        self.config = config if config is not None else DiffSegmenterConfig()
        self.timer = StageTimer()  # seconds per stage: "unet", "refine"
        if not isinstance(self.config, DiffSegmenterConfig):
            raise TypeError(f"DiffSegmenter: expected a DiffSegmenterConfig, got {type(self.config).__name__}")
        self.sd = backbone if backbone is not None else _load_backbone(self.config)
        self._clip = clip
        self._captioner = captioner

    # ------------------------------------------------------------------ helpers
    def _renamed(self, names: Sequence[str]) -> list[str]:
        table = self.config.rename_classes
        if table is None:
            return list(names)
        from weakseg.data.classnames import CLASS_RENAMES, rename_classes

        dataset = {"voc": "voc", "context": "context59", "coco": "coco_object"}[table]
        return rename_classes(names, CLASS_RENAMES[dataset]["diffsegmenter"])

    def self_attention_layers(self) -> list[str]:
        """The names of the UNet's self-attention layers that the propagation averages."""
        from fnmatch import fnmatchcase

        return [n for n in self.sd.attention_layers("self") if any(fnmatchcase(n, p) for p in SELF_ATTENTION_LAYERS)]

    def propagation_for(self, items: int, pixels: int) -> str:
        """The propagation ("fused" / "reference") of a UNet call over ``items`` prompts at ``pixels``
        latent pixels: ``config.propagation`` unless "auto" (see :class:`DiffSegmenterConfig`)."""
        cfg = self.config
        if cfg.propagation != "auto":
            return cfg.propagation
        if self.sd.device.type != "cpu":
            return "fused"
        need = 2 * items * pixels * pixels * 4
        return "reference" if need <= cfg.attention_budget_mib * 2 ** 20 else "fused"

    def capture_specs(self, propagation: str | None = None) -> list[LayerCapture]:
        """What one UNet pass records: every cross layer's per-resolution head mean (N, P_r, 77); for the
        propagation, the 64x64 self layers' q/k (fused) or their per-resolution mean (reference).
        ``propagation``: "fused" / "reference" (default: ``config.propagation``, "auto" read as
        "fused")."""
        propagation = propagation or self.config.propagation
        if self.config.baseline or propagation in ("fused", "auto"):
            specs = [LayerCapture(CROSS_ATTENTION_LAYERS, store="mean", group="resolution")]
            if not self.config.baseline:
                specs.append(LayerCapture(SELF_ATTENTION_LAYERS, store="qk"))
            return specs
        # every map formed once in the UNet pass, its output computed from it (the references' processors)
        return [LayerCapture(CROSS_ATTENTION_LAYERS, store="mean", group="resolution", reuse=True),
                LayerCapture(SELF_ATTENTION_LAYERS, store="mean", group="resolution", reuse=True)]

    def _tagger(self):
        if self._clip is None:
            c = self.config
            self._clip = load_tagger_clip(c.clip_model, c.clip_pretrained, c.cache_dir, c.device)
        return self._clip

    def _blip(self):
        if self._captioner is None:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            name = self.config.captioner
            local = os.path.isdir(os.path.expanduser(name))
            src = os.path.expanduser(name) if local else name
            try:
                proc = BlipProcessor.from_pretrained(src, cache_dir=self.config.cache_dir, local_files_only=local)
                model = BlipForConditionalGeneration.from_pretrained(src, cache_dir=self.config.cache_dir,
                                                                     local_files_only=local)
            except (OSError, ValueError) as e:
                raise OSError(f"DiffSegmenterConfig.captioner={name!r}: could not load a BLIP captioning model "
                              f"(expected a hub name or a directory with a BlipForConditionalGeneration and its "
                              f"processor): {e}") from e
            dtype = _torch_dtype(self.config)
            self._captioner = (model.to(self.config.device, dtype).eval(), proc)
        return self._captioner

    @torch.no_grad()
    def caption(self, image: torch.Tensor, name: str) -> str:
        """BLIP conditional caption of ``image`` seeded with "a photograph of {name}"; returns the
        continuation after the seed (what DS appends to its prompt)."""
        model, proc = self._blip()
        seed = caption_seed(self.config.prompt_template).format(c=name)
        inputs = proc(images=image.permute(1, 2, 0).cpu().numpy(), text=seed, return_tensors="pt")
        inputs = {k: (v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device))
                  for k, v in inputs.items()}
        kw = {} if self.config.caption_max_new_tokens is None else {"max_new_tokens": self.config.caption_max_new_tokens}
        out = model.generate(**inputs, **kw)
        return caption_continuation(proc.decode(out[0], skip_special_tokens=True), name,
                                    caption_seed(self.config.prompt_template))

    def prompts_for(self, name: str, continuation: str = "") -> tuple[str, list[int]]:
        """(prompt, token positions) of class ``name`` (already renamed) with a caption continuation."""
        cfg = self.config
        prompt = build_prompt(cfg.prompt_template, name, continuation, cfg.weight_words)
        return prompt, class_token_positions(self.sd, prompt, name, cfg.class_token, cfg.fuse_ing, cfg.ing_rule)

    # ------------------------------------------------------------------ the pipeline
    def candidates(self, images: list[torch.Tensor], class_names: Sequence[str],
                   image_labels: torch.Tensor | None) -> torch.Tensor:
        """(B, C) bool: the classes run through the UNet per image (background never is)."""
        B, C = len(images), len(class_names)
        if image_labels is not None:
            return image_label_mask(image_labels, B, C, "cpu")
        if self.config.open_vocab == "all":
            return torch.ones(B, C, dtype=torch.bool)
        same = all(im.shape == images[0].shape for im in images)
        batch = torch.stack(images) if same else images
        return clip_tag_classes(self._tagger(), batch, class_names, topk=self.config.tag_topk,
                                threshold=self.config.tag_threshold).cpu()

    @torch.no_grad()
    def class_maps(self, images: list[torch.Tensor], items: list[tuple[int, str, str]]) -> torch.Tensor:
        """Score maps at the latent grid for (image index, class name, caption continuation) items:
        (N, h, w) float32, averaged over the configured timesteps, before min-max."""
        cfg, sd = self.config, self.sd
        # per image: its own generator, so batching never changes an image's noise
        latents, noises = [], []
        for im in images:
            g = torch.Generator(device=sd.device).manual_seed(cfg.seed)
            z = sd.encode_images([im], size=cfg.image_size, sample=True, generator=g, resample="bilinear")
            noises.append([torch.randn(z.shape, generator=g, device=z.device, dtype=torch.float32).to(z.dtype)
                           for _ in range(cfg.noise_draws)])
            latents.append(z)
        z = torch.cat(latents)
        eps = [torch.cat([n[d] for n in noises]) for d in range(cfg.noise_draws)]  # per draw: (B, 4, h, w)
        hw = tuple(z.shape[-2:])
        prompts, tokens = [], []
        for _, name, cont in items:
            p, t = self.prompts_for(name, cont)
            prompts.append(p)
            tokens.append(t)
        out = torch.zeros(len(items), *hw, dtype=torch.float32, device=sd.device)
        self_names = self.self_attention_layers()
        for s in range(0, len(items), cfg.batch_size):
            chunk = list(range(s, min(s + cfg.batch_size, len(items))))
            idx = torch.tensor([items[i][0] for i in chunk], device=sd.device)
            embeds, _ = sd.encode_prompt([prompts[i] for i in chunk])
            acc = torch.zeros(len(chunk), *hw, dtype=torch.float32, device=sd.device)
            propagation = self.propagation_for(len(chunk), hw[0] * hw[1])
            for t in cfg.timesteps:
                for noise in eps:
                    with self.timer("unet", sd.device):
                        zt, _ = sd.add_noise(z[idx], t, noise=noise[idx])
                        _, store = sd.unet(zt, t, embeds, capture=self.capture_specs(propagation))
                    with self.timer("refine", sd.device):
                        x = self._refine(store, tokens, chunk, hw, self_names, propagation)
                    acc += x
                    store.reset()
            out[s:s + len(chunk)] = acc / (len(cfg.timesteps) * len(eps))
        return out

    def _refine(self, store, tokens, chunk, hw, self_names, propagation: str) -> torch.Tensor:
        """Fused cross-attention maps of a chunk, propagated once by the 64x64 self-attention."""
        cfg = self.config
        cross = [store.resolution_mean("cross", r) for r in reversed(store.resolutions("cross"))]
        x = fuse_cross_attention(cross, [tokens[i] for i in chunk], cfg.cross_weights, hw)
        if cfg.baseline:
            return x
        grids = {store.grid(n) for n in self_names}
        if grids != {hw}:
            raise ValueError(f"DiffSegmenter: the self-attention layers {self_names} run at "
                             f"{sorted(grids)}, not at the latent grid {hw}")
        flat = x.flatten(1)
        if propagation == "fused":
            m = propagate_fused([store.qk(n) for n in self_names], flat)
        else:
            m = propagate_reference(store.resolution_mean("self", hw), flat)
        return m.view_as(x)

    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None,
                captions: Sequence[str | None] | None = None) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of (3, H, W) of one size; class_names: the C
        candidates (channel 0 = background when it is named so); image_labels: (B, C) bool of the
        classes present (weakly-supervised), else the candidates come from ``open_vocab``;
        captions: optional text per image (or None entries) appended after the class phrase of every
        prompt of that image (overrides ``config.captioner``). Scores (B, C, H, W) in [0, 1]."""
        inp = check_segment_inputs(images, class_names, image_labels)
        items_in, names, B = inp.images, inp.class_names, inp.batch
        if captions is not None and (isinstance(captions, str) or len(captions) != B):
            raise ValueError(f"captions: expected a list of {B} strings or None (one per image), got {captions!r}")
        bg = int(has_background(names))
        fg_names = self._renamed(names[bg:])
        allowed = self.candidates(items_in, names, image_labels)
        items, where = [], []
        for b in range(B):
            for j, name in enumerate(fg_names):
                if not allowed[b, bg + j]:
                    continue
                if captions is not None:
                    cont = caption_continuation(captions[b], name, caption_seed(self.config.prompt_template))
                elif self.config.captioner is not None or self._captioner is not None:
                    cont = self.caption(items_in[b], name)
                else:
                    cont = ""
                items.append((b, name, cont))
                where.append((b, j))
        H, W = inp.size
        device = self.sd.device
        fg = torch.zeros(B, len(fg_names), H, W, dtype=torch.float32, device=device)
        if items:
            maps = self.class_maps(items_in, items)
            up = minmax_per_class(resize_maps(maps[:, None], (H, W)))[:, 0]
            for n, (b, j) in enumerate(where):
                fg[b, j] = up[n]
        fg = pamr_maps(items_in, fg, self.config.pamr_iterations, self.config.pamr_dilations)
        scores, labels = scores_to_labels(fg, names, allowed.to(device),
                                          BackgroundRule("constant", self.config.bg_threshold))
        return SegmentationOutput(scores.cpu(), labels.cpu(), names)
