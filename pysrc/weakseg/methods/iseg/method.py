"""iSeg (``weakseg.create("iseg")``): training-free segmentation from one Stable Diffusion 2.1 pass,
by entropy-reduced self-attention and N-step iterative propagation of cross-attention maps
(docs/specs/diffsegmenter_iseg.md §1-§4, §7; the reference code's semantics and defaults).

Per image (batched through the UNet, one prompt per image):

1. Image -> 512x512 (bilinear), VAE posterior mean x 0.18215 -> latent z (4, 64, 64); noise drawn from
   a generator re-seeded with ``seed`` (1101) for every image; ``z_t = add_noise(z, eps, t=100)``.
   (``noise_draws`` > 1, not the reference's: steps 3-7 run once per draw, the draws coming in turn from
   that generator, and the class maps are averaged before step 8's min-max.)
2. Prompt ``"a photograph of A and B ... and other object and background, <stuff words>"`` with the
   image's classes only (image-level labels, or the classes CLIP tags in the open-vocabulary setting).
   Token bookkeeping: class 1 starts at position 4, every next class after "and"; multi-token names
   are counted by the tokenizer; per-class token subsets from ``token_words`` ("potted plant" -> the
   "plant" tokens). Category-enhanced cross-attention: the text-encoder output rows of the selected
   class tokens are multiplied by ``gamma`` = 1.6 (so K and V of every cross-attention layer).
3. One conditional UNet call capturing the cross-attention of the 32x32 layers (``down_blocks.1.
   attentions.1``, ``up_blocks.2.attentions.0/1``) and 16x16 layers (``down_blocks.2.attentions.0/1``,
   ``up_blocks.1.attentions.0/1/2``), heads concatenated in forward order (optional head subsets, the
   VOC presets use the reference's 9 of 30 and 41 of 100), and of the self-attention layer
   ``up_blocks.3.attentions.1.transformer_blocks.0.attn1`` (64x64), heads [1, 2].
4. Cross fusion: per resolution, mean over the chosen heads, each token map divided by its sum over
   pixels, bilinear to 64x64, weights 0.7 (16) / 0.3 (32), summed -> (77, 64, 64).
5. KL clustering (``use_cluster``, on as in the code): the 4096 per-pixel 77-d vectors are clustered
   by ``weakseg.ops.kl_kmeans`` (symmetric KL) from a grid of seeds (rows/cols 0, 11, ..., 55 at 64x64:
   step ``side // sqrt(cluster_number)``, cluster_number 32), 20 iterations; each pixel's vector is
   replaced by its cluster mean.
6. Per class: mean of its selected token columns -> C0 (4096, K).
7. Refinement (``weakseg.ops.refine_propagate``, exact code order): ``T = A / colmax(A)``,
   ``T += ent * log10(e*T)`` (T > 0), clamp >= 0, row-normalise, then ``steps`` times
   ``C = P @ C`` with per-class min/sum normalisation. ``fused_qk=True`` captures only q, k of the
   self-attention layer and calls ``refine_propagate_qk`` (no P x P float32 matrix on CUDA);
   ``fused_qk=False`` captures the head-mean probabilities and calls ``refine_propagate``.
   ``use_ers=False``: the code's non-ERS path, one product with the all-head mean self-attention.
   ``baseline=True``: no self-attention at all, the fused cross maps C0 are the output.
8. Maps (K, 64, 64) -> bilinear to the image size -> per-class min-max -> (optional, not iSeg's:
   ``pamr_iterations`` of PAMR on the image) -> background rule (``(1 - max)^2``, or a threshold,
   ``methods.common.scores_to_labels``).

Deliberate differences from the reference code (docs/methods.md): the maps are resized straight to the
image size (the code goes through 512x512 and then to the mask size); the final min-max has no eps, as
the code, but a range at the rounding level of the values gives 0 (the code's 0 / 0 gives NaN); the KL
distance clamps at 1e-5 (the code replaces exact zeros by 1e-6); token counts come from the tokenizer
rather than a hand-written table (the prompt words are the tables': voc_name20, coco_name80,
context_name59).

Presets (:data:`PRESETS`, ``ISegConfig.from_preset(name)`` or ``create("iseg", preset=name)``):
``voc-wsss``, ``coco-wsss`` (pseudo-masks with image-level labels), ``voc-ovs``, ``context-ovs``,
``coco-ovs`` (open vocabulary). The OVS presets replicate the code's prompt "... and background" +
stuff words without a separator (``background_separator=""``); set it to ", " to fix that.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.core import BACKBONES, METHODS, SegmentationOutput, check_segment_inputs
from weakseg.methods.common import (StageTimer, clip_tag_classes, grid_seeds, image_label_mask, load_tagger_clip,
                                    minmax_per_class, pamr_maps, resize_maps, scores_to_labels)
from weakseg.methods.diffusion_common import (ClassPrompt, build_class_prompt, fuse_cross_attention,
                                              select_token_maps)
from weakseg.methods.iseg.config import ISegConfig

__all__ = ["ISeg", "cluster_seeds", "load_stable_diffusion"]


def load_stable_diffusion(config: ISegConfig):
    """The backbone named by ``config.model`` on ``config.device`` in ``config.torch_dtype()``."""
    dtype = config.torch_dtype()
    sd = BACKBONES.build("stable-diffusion", config.model, cache_dir=config.cache_dir, device=config.device,
                         dtype=dtype)
    sd.set_scheduler("ddim")
    return _to(sd, config.device, dtype)


def _to(sd, device, dtype: torch.dtype):
    """Move/cast only when needed (diffusers warns on every dtype cast)."""
    if sd.device != torch.device(device) or sd.dtype != dtype:
        sd.to(device, dtype if sd.dtype != dtype else None)
    return sd


def _colnorm(c: torch.Tensor) -> torch.Tensor:
    """(B, P, K): each column minus its minimum, divided by its sum (0 where the sum is 0)."""
    c = c - c.amin(dim=1, keepdim=True)
    s = c.sum(dim=1, keepdim=True)
    return torch.where(s > 0, c / torch.where(s > 0, s, 1), torch.zeros_like(c))


def cluster_seeds(h: int, w: int, number: int = 32, device=None) -> torch.Tensor:
    """The seed pixels of iSeg's KL clustering (:func:`weakseg.methods.common.grid_seeds`; 64x64, 32 ->
    a stride of 11, 36 seeds)."""
    return grid_seeds(h, w, number, device)


@METHODS.register("iseg", config=ISegConfig)
class ISeg:
    """iSeg segmenter (module docstring). ``ISeg(config, backbone=None, clip=None)``: ``backbone`` (a
    ``StableDiffusionBackbone``) and ``clip`` (a ``CLIPBackbone`` for open-vocabulary tagging) replace
    the models ``config`` names."""

    def __init__(self, config: ISegConfig, backbone=None, clip=None):
        if not isinstance(config, ISegConfig):
            raise TypeError(f"ISeg: expected an ISegConfig, got {type(config).__name__}")
        self.config = config
        self.timer = StageTimer()  # seconds per stage: "unet", "refine"
        self.sd = load_stable_diffusion(config) if backbone is None else _to(backbone, config.device,
                                                                              config.torch_dtype())
        self._clip = clip
        self._plan_cross = {16: self._head_plan(config.cross_layers_16, config.heads_16, "16"),
                            32: self._head_plan(config.cross_layers_32, config.heads_32, "32")}
        layers = self.sd.attention_layers()
        if config.self_layer not in layers or layers[config.self_layer][0] != "self":
            raise ValueError(f"ISegConfig.self_layer: {config.self_layer!r} is not a self-attention layer of the UNet")
        n = layers[config.self_layer][1]
        if max(config.self_heads) >= n or min(config.self_heads) < 0:
            raise ValueError(f"ISegConfig.self_heads: {list(config.self_heads)} out of range for {config.self_layer!r}, "
                             f"which has {n} heads")

    # ------------------------------------------------------------------ plans
    def _head_plan(self, layer_names: Sequence[str], heads, res: str) -> list[tuple[str, tuple[int, ...] | None]]:
        """[(layer, local heads or None)] for one resolution; global head indices run over the layers'
        heads concatenated in the given order."""
        info = self.sd.attention_layers()
        weight = getattr(self.config, f"cross_weight_{res}")
        if weight == 0:
            return []
        if not layer_names:
            raise ValueError(f"ISegConfig.cross_layers_{res}: expected at least one layer (its weight is {weight})")
        counts = []
        for name in layer_names:
            if name not in info or info[name][0] != "cross":
                raise ValueError(f"ISegConfig.cross_layers_{res}: {name!r} is not a cross-attention layer of the UNet")
            counts.append(info[name][1])
        if heads is None:
            return [(n, None) for n in layer_names]
        total = sum(counts)
        bad = [h for h in heads if not 0 <= h < total]
        if bad or not heads:
            raise ValueError(f"ISegConfig.heads_{res}: head indices {bad or list(heads)} out of range; the layers "
                             f"cross_layers_{res} have {total} heads in all ({counts})")
        plan, start = [], 0
        for name, c in zip(layer_names, counts):
            local = tuple(sorted(h - start for h in heads if start <= h < start + c))
            if local:
                plan.append((name, local))
            start += c
        return plan

    def capture_specs(self) -> list:
        """The ``LayerCapture`` specs of one UNet call (what the spec names: layers, heads, store)."""
        from weakseg.backbones.attention import LayerCapture

        cfg = self.config
        specs = [LayerCapture(name, store="probs", heads=heads)
                 for res in (16, 32) for name, heads in self._plan_cross[res]]
        if not cfg.baseline:
            heads = tuple(cfg.self_heads) if cfg.use_ers else None
            specs.append(LayerCapture(cfg.self_layer, store="qk" if cfg.fused_qk else "mean", heads=heads))
        return specs

    # ------------------------------------------------------------------ prompts and candidates
    def prompt(self, names: Sequence[str]) -> ClassPrompt:
        """The prompt of one image with the (dataset) class ``names`` (renamed by ``class_renames``)."""
        cfg = self.config
        words = [cfg.class_renames.get(n, n) for n in names]
        suffix = cfg.background_prompt + cfg.background_separator + cfg.background_words
        if not words:  # no class: "a photograph of other object and background, ..."
            suffix = suffix[len(" and "):] if suffix.startswith(" and ") else suffix.lstrip()
        return build_class_prompt(self.sd.tokenizer, words, prefix=cfg.prompt_prefix, joiner=cfg.class_joiner,
                                  suffix=suffix, select_words=cfg.token_words)

    def clip(self):
        if self._clip is None:
            cfg = self.config
            self._clip = load_tagger_clip(cfg.clip_model, cfg.clip_pretrained or None, cfg.cache_dir, cfg.device)
        return self._clip

    def candidates(self, images: list[torch.Tensor], class_names: Sequence[str],
                   image_labels: torch.Tensor | None) -> torch.Tensor:
        """(B, C) bool of the classes put in each image's prompt: the image-level labels (WSSS); else
        CLIP zero-shot tagging (``tagger="clip"``) or every class (``"all"``)."""
        B, C = len(images), len(class_names)
        if image_labels is not None or self.config.tagger == "all":
            return image_label_mask(image_labels, B, C, torch.device("cpu"))
        cfg = self.config
        return clip_tag_classes(self.clip(), images, class_names, topk=cfg.tag_topk, threshold=cfg.tag_threshold,
                                templates=cfg.tag_templates).cpu()

    # ------------------------------------------------------------------ the pipeline
    @torch.no_grad()
    def class_maps(self, images: list[torch.Tensor], names: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Per image, the (K_b, h, w) float32 maps of its K_b classes ``names[b]`` on the latent grid,
        before upsampling and min-max (step 7 of the module docstring)."""
        out: list[torch.Tensor] = []
        bs = self.config.batch_size
        for i in range(0, len(images), bs):
            out.extend(self._class_maps_batch(images[i:i + bs], names[i:i + bs]))
        return out

    def _noise(self, B: int, shape) -> list[torch.Tensor]:
        """``noise_draws`` noise tensors (B, *shape), drawn in turn from a generator seeded with ``seed``: the
        same draws for every image (the reference re-seeds per image), the first one the reference's."""
        g = torch.Generator().manual_seed(int(self.config.seed))
        draws = [torch.randn((1, *shape), generator=g) for _ in range(self.config.noise_draws)]
        return [one.expand(B, *shape).contiguous() for one in draws]

    def _class_maps_batch(self, images, names) -> list[torch.Tensor]:
        cfg, sd = self.config, self.sd
        out = None
        with self.timer("unet", sd.device):  # VAE and text encoder
            z = sd.encode_images(images, size=cfg.size, sample=False, resample="bilinear")
            B, _, h, w = z.shape
            prompts = [self.prompt(n) for n in names]
            embeds, _ = sd.encode_prompt([p.text for p in prompts])
            if cfg.gamma != 1:
                embeds = sd.reweight(embeds, [p.selected_flat for p in prompts], cfg.gamma)
        for noise in self._noise(B, z.shape[1:]):
            with self.timer("unet", sd.device):  # the UNet pass with capture
                zt, _ = sd.add_noise(z, cfg.t, noise.to(z))
                _, store = sd.unet(zt, cfg.t, embeds, capture=self.capture_specs())
            with self.timer("refine", sd.device):  # cross fusion, KL clustering, ERS + propagation
                maps = self._refine_maps(store, names, prompts, B, h, w)
            out = maps if out is None else [a + m for a, m in zip(out, maps)]
        return [m / cfg.noise_draws for m in out]  # exact for one draw

    def _refine_maps(self, store, names, prompts, B: int, h: int, w: int) -> list[torch.Tensor]:
        cfg = self.config

        per_res, weights = {}, {16: cfg.cross_weight_16, 32: cfg.cross_weight_32}
        for res, plan in self._plan_cross.items():
            if not plan:
                continue
            probs = torch.cat([store.probs(name) for name, _ in plan], dim=1)  # (B, heads, P, T)
            gh, gw = store.grid(plan[0][0])
            per_res[res] = probs.mean(1).transpose(1, 2).reshape(B, -1, gh, gw)
        fused = fuse_cross_attention(per_res, weights, (h, w), norm="sum", order="norm-resize")  # (B, T, h, w)
        x = fused.flatten(2).transpose(1, 2).contiguous()  # (B, P, T)
        if cfg.use_cluster:
            from weakseg.ops import kl_kmeans

            seeds = cluster_seeds(h, w, cfg.cluster_number, device=x.device)
            # the authors' DFC_KL replaces exact zeros by 1e-6 before clustering (the centroids are means of
            # the replaced maps); their fp16 cast is not reproduced (docs/methods.md)
            x = torch.where(x == 0, torch.full_like(x, 1e-6), x)
            labels, cents = kl_kmeans(x, seeds, cfg.cluster_iterations)
            x = torch.gather(cents.to(x.dtype), 1, labels[..., None].expand(-1, -1, x.shape[2]))
        c0 = select_token_maps(x.transpose(1, 2), [p.selected for p in prompts]).transpose(1, 2)  # (B, P, K)
        c = self._refine(store, c0, (h, w)) if not cfg.baseline else c0.float()
        return [c[b, :, : len(names[b])].transpose(0, 1).reshape(-1, h, w).float() for b in range(B)]

    def _refine(self, store, c0: torch.Tensor, hw) -> torch.Tensor:
        from weakseg.ops import refine_propagate, refine_propagate_qk

        cfg = self.config
        if tuple(store.grid(cfg.self_layer)) != tuple(hw):
            raise ValueError(f"ISegConfig.self_layer: {cfg.self_layer!r} runs on a {store.grid(cfg.self_layer)} grid, "
                             f"not the {tuple(hw)} latent grid the cross maps are fused on")
        c0 = c0.float()
        if c0.shape[2] == 0:
            return c0
        if cfg.fused_qk:
            q, k = store.qk(cfg.self_layer)
            scale = store.scale(cfg.self_layer)
            if cfg.use_ers:
                return refine_propagate_qk(q, k, c0, float(cfg.ent), int(cfg.steps), scale).float()
            # non-ERS: one product with the all-head mean attention = mean_h SDPA(q_h, k_h, C)
            v = _colnorm(c0)[:, None].expand(-1, q.shape[1], -1, -1)
            return F.scaled_dot_product_attention(q.float(), k.float(), v, scale=scale).mean(1)
        attn = store.mean(cfg.self_layer)  # (B, P, P) head mean of the probabilities, rows = queries
        if cfg.use_ers:
            return refine_propagate(attn, c0, float(cfg.ent), int(cfg.steps)).float()
        return attn.float() @ _colnorm(c0)

    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None
                ) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of same-sized (3, H, W); class_names: the C classes
        (background first if the dataset has one); image_labels: optional (B, C) bool. Returns scores
        (B, C, H, W) (per-class min-max maps of the prompt classes, 0 for the others, the background
        from the rule) and labels (B, H, W)."""
        inp = check_segment_inputs(images, class_names, image_labels)
        items, class_names, bg = inp.images, inp.class_names, int(inp.background)
        allowed = self.candidates(items, class_names, image_labels)
        fg_idx = [torch.nonzero(allowed[b, bg:]).flatten().tolist() for b in range(len(items))]
        names = [[class_names[bg + j] for j in idx] for idx in fg_idx]
        maps = self.class_maps(items, names)
        H, W = inp.size
        fg = torch.zeros(len(items), len(class_names) - bg, H, W)
        for b, (m, idx) in enumerate(zip(maps, fg_idx)):
            if idx:
                # the maps live on a 1/P scale (propagated distributions): min-max without an eps, as
                # the code (a constant map gives 0)
                fg[b, idx] = minmax_per_class(resize_maps(m[None], (H, W)))[0].cpu()
        fg = pamr_maps(items, fg, self.config.pamr_iterations, self.config.pamr_dilations)
        scores, labels = scores_to_labels(fg, class_names, allowed, self.config.background_rule)
        return SegmentationOutput(scores=scores, labels=labels, class_names=class_names)
