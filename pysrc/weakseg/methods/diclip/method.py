"""The registered ``"diclip"`` segmenter (docs/specs/diclip.md; the code's semantics and defaults, the
paper's variants as options; its config is :mod:`weakseg.methods.diclip.config`).

``mode="cam"`` (training-free, the code's LAM inference): per image, resized to ``size``² —

1. one SD pass (null prompt, t = 101) -> q, k of the VCE layer and of the walk layer
   (:mod:`.vce`); the ACR-refined SD affinity A_ref is added (weight 1.0, every head, after the
   softmaxes) to the surgery attention of the last 3 CLIP blocks;
2. the CLIP token features F (original-path CLS + surgery patches, divided by the norm over the token
   axis) -> the patch-text CAM (feature surgery against the class texts + background words, min-max);
3. ``cam_source``: "static" adds 0.5 × the static cache CAM (needs ``cache``), "dynamic" adds
   0.1 × relu of the trained adapter's foreground logits (needs ``checkpoint``), "patch" neither;
4. ``refine`` steps on the present classes: "caa" (CLIP-attention affinity with box masks, 0.88),
   "walk" (random walk on SD attention, 10 steps), "par" (PAR on the image);
5. upsample, per-class min-max, background = 1 − max, argmax.

``mode="head"``: the trained segmentation head on the frozen CLIP layers (no SD), multi-scale
(0.7 / 1.0 / 1.2 / 1.5 of ``size``) with flips (the code flips only the scales ≠ 1), optional DenseCRF.

Models: ``clip_model`` / ``sd_model`` are hub names or local directories, ``"tiny"`` (random tiny
models for tests) or ``"toy"`` (the toy-world weights). Presets: ``voc`` (the defaults), ``coco``,
``toy``, ``tiny``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from weakseg.core import (BACKBONES, METHODS, SegmentationOutput, WeightsFileError, check_images,
                          check_segment_inputs, check_weights, read_safetensors_file)
from weakseg.methods.common import BackgroundRule, StageTimer, minmax_per_class, scores_to_labels
from weakseg.methods.diclip import cam as camlib
from weakseg.methods.diclip import refine as reflib
from weakseg.methods.diclip import vce as vcelib
from weakseg.methods.diclip.cache import KVCache
from weakseg.methods.diclip.config import DiCLIPConfig
from weakseg.methods.diclip.modules import KVAdapter, SegHead

__all__ = ["DiCLIP", "load_clip", "load_sd", "read_checkpoint_weights"]


# ----------------------------------------------------------------------------------------- models

def load_clip(config: DiCLIPConfig):
    """The CLIP backbone ``config.clip_model`` names (always float32: the CAM maths is small)."""
    return BACKBONES.build("clip", config.clip_model, pretrained=config.clip_pretrained, cache_dir=config.cache_dir,
                           pos_interp=config.pos_interp, device=config.device)


def load_sd(name: str, config: DiCLIPConfig):
    """The Stable Diffusion backbone the model spec ``name`` names (``tiny``: random, 4 heads per layer)."""
    dtype = config.torch_dtype()
    sd = BACKBONES.build("stable-diffusion", name, cache_dir=config.cache_dir, device=config.device, dtype=dtype)
    if sd.device != torch.device(config.device) or sd.dtype != dtype:
        sd.to(config.device, dtype if sd.dtype != dtype else None)
    return sd


def read_checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter and head tensors, metadata) of a DiCLIP training checkpoint (``model.safetensors``, or the
    resumable ``last.safetensors``, whose optimizer state and random streams are left out), with clear errors.
    The tensors are checked against the model by :meth:`DiCLIP.load_checkpoint`."""
    tensors, info = read_safetensors_file(path, ("weakseg-diclip-checkpoint",), "checkpoint",
                                          "train one with `weakseg train diclip`")
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))}
    return tensors, info


@dataclass
class Forward:
    """One CAM forward: features, CLIP outputs, SD attention (or None), the patch grid."""

    feats: torch.Tensor
    out: Any
    grid: tuple[int, int]
    sd: Any
    bias: torch.Tensor | None


# ----------------------------------------------------------------------------------------- segmenter

@METHODS.register("diclip", config=DiCLIPConfig)
class DiCLIP:
    """DiCLIP (module docstring). ``DiCLIP(config, clip=None, sd=None)``: ``clip`` (a CLIPBackbone) and
    ``sd`` (a StableDiffusionBackbone) replace the models ``config`` names; SD is loaded only when a step
    needs it (VCE, the walk, cache generation)."""

    def __init__(self, config: DiCLIPConfig | None = None, clip=None, sd=None, gen_sd=None):
        config = config or DiCLIPConfig()
        if not isinstance(config, DiCLIPConfig):
            raise TypeError(f"DiCLIP: expected a DiCLIPConfig, got {type(config).__name__}")
        self.config = config
        self.timer = StageTimer()  # seconds per stage: "unet" (SD pass), "vce" (affinity + ACR), "clip", "refine"
        self.clip = (load_clip(config) if clip is None else clip.to(config.device)).eval()
        self._sd = sd
        self._gen_sd = gen_sd
        self._text_cache: dict[Any, Any] = {}
        self.cache: KVCache | None = KVCache.load(config.cache) if config.cache else None
        self.adapter: KVAdapter | None = None
        self.head: SegHead | None = None
        self.head_classes: list[str] | None = None
        if config.checkpoint:
            self.load_checkpoint(config.checkpoint)
        if config.cam_source == "static" and config.mode == "cam" and self.cache is None:
            import warnings

            warnings.warn("DiCLIP: cam_source='static' without a cache (DiCLIPConfig.cache): the CAM is the patch-text "
                          "CAM alone; build a cache with `weakseg cache build`", stacklevel=2)
        if config.cam_source == "dynamic" and config.mode == "cam" and self.adapter is None:
            raise ValueError("DiCLIPConfig.cam_source='dynamic' needs a checkpoint with a trained adapter")
        ph, pw = self.clip.patch_size
        if config.size % ph or config.size % pw:
            raise ValueError(f"DiCLIPConfig.size: {config.size} is not a multiple of CLIP's patch size {ph}x{pw}")
        self._par = None

    # ------------------------------------------------------------------ models
    @property
    def sd(self):
        if self._sd is None:
            self._sd = load_sd(self.config.sd_model, self.config)
        return self._sd

    def generation_sd(self):
        """The model that generates cache images (``gen_model``; None = the VCE model)."""
        if self.config.gen_model is None or self.config.gen_model == self.config.sd_model:
            return self.sd if self._gen_sd is None else self._gen_sd
        if self._gen_sd is None:
            self._gen_sd = load_sd(self.config.gen_model, self.config)
        return self._gen_sd

    @property
    def grid(self) -> tuple[int, int]:
        ph, pw = self.clip.patch_size
        return self.config.size // ph, self.config.size // pw

    def _check_sd(self) -> None:
        layers = self.sd.attention_layers()
        cfg = self.config
        for what, name, heads in (("vce_layer", cfg.vce_layer, cfg.vce_heads), ("walk_layer", cfg.walk_layer,
                                                                              cfg.walk_heads)):
            if name not in layers or layers[name][0] != "self":
                sample = [n for n, (k, _) in layers.items() if k == "self"][:6]
                raise ValueError(f"DiCLIPConfig.{what}: {name!r} is not a self-attention layer of the UNet "
                                 f"(self-attention layers: {sample} ...)")
            if max(heads) >= layers[name][1] or min(heads) < 0:
                raise ValueError(f"DiCLIPConfig.{what.replace('layer', 'heads')}: {list(heads)} out of range for "
                                 f"{name!r}, which has {layers[name][1]} heads")

    def load_checkpoint(self, path: str | Path) -> None:
        """Load the trained adapter and head of ``weakseg train diclip`` (weights + their metadata). The file's
        tensors must be exactly the adapter's and head's its metadata describes (names, shapes, float dtypes,
        finite values): :class:`~weakseg.core.WeightsFileError` names the file and what differs."""
        tensors, info = read_checkpoint_weights(path)
        names = info.get("class_names")
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"checkpoint {str(path)!r}: metadata lacks class_names (a list of at least 2 names)")
        C1 = len(names)
        arch = info.get("arch")
        try:
            M, P = int(arch["adapter_keys"]), int(arch["adapter_prompts"])
            L, width = int(arch["head_layers"]), int(arch["head_in_width"])
            dim, blocks, heads = int(arch["head_dim"]), int(arch["head_blocks"]), int(arch["head_heads"])
            ad_drop, head_drop = float(arch.get("adapter_dropout", 0.1)), float(arch.get("head_dropout", 0.1))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsFileError(f"checkpoint: {str(path)!r} has a malformed 'arch' entry in its metadata "
                                   f"({type(e).__name__}: {e})") from None
        D = self.clip.embed_dim
        fc1 = tensors.get("adapter.fc1.weight")
        if fc1 is not None and fc1.dim() == 2 and fc1.shape[1] != D:
            raise ValueError(f"checkpoint {str(path)!r}: the adapter takes {fc1.shape[1]}-d features, this CLIP gives "
                             f"{D}-d ones")
        if L != self.clip.num_layers or width != self.clip.width:
            raise ValueError(f"checkpoint {str(path)!r}: the head was trained on a CLIP with {L} layers of width "
                             f"{width}, this CLIP has {self.clip.num_layers} of {self.clip.width}")
        try:
            ad = KVAdapter(torch.zeros(M, D), torch.eye(C1)[torch.zeros(M, dtype=torch.long)], prompts=P,
                           dropout=ad_drop)
            head = SegHead(width, L, C1, dim=dim, blocks=blocks, heads=heads, dropout=head_drop)
        except (ValueError, RuntimeError) as e:
            raise WeightsFileError(f"checkpoint: {str(path)!r} has an impossible 'arch' entry in its metadata "
                                   f"({e})") from None
        expected = {**{f"adapter.{k}": v for k, v in ad.state_dict().items()},
                    **{f"head.{k}": v for k, v in head.state_dict().items()}}
        check_weights(tensors, expected, path, "checkpoint", "train one with `weakseg train diclip`")
        ad.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
        head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
        self.head_classes = list(names)
        self.adapter = ad.to(self.config.device).eval()
        self.head = head.to(self.config.device).eval()

    # ------------------------------------------------------------------ text
    def prompt_name(self, name: str) -> str:
        return self.config.class_prompts.get(name, name)

    def text_rows(self, fg_names: Sequence[str]):
        """(rows (C + G, D) float32, ClassEmbeddings) for the foreground classes + background words."""
        key = tuple(fg_names)
        if key not in self._text_cache:
            cfg = self.config
            emb = self.clip.class_embeddings([self.prompt_name(n) for n in fg_names], templates=cfg.templates,
                                             background_words=list(cfg.background_words) or None,
                                             synonym_sep=cfg.synonym_sep)
            self._text_cache[key] = emb
        emb = self._text_cache[key]
        return emb.embeddings.float(), emb

    def text_weights_for(self, keys: torch.Tensor, values: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """The text-weighted values of a cache (§3b step 2) with this model's text rows."""
        _, emb = self.text_rows(list(class_names)[1:])
        t21 = camlib.cache_text_rows(emb.classes.float(), emb.background.float())
        return camlib.text_weighted_values(keys.float().cpu(), values.float().cpu(), t21.cpu())

    # ------------------------------------------------------------------ the CAM pipeline
    def resize_batch(self, images) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (the originals, uint8 (B, 3, size, size) bilinear + antialias, what CLIP and SD see)."""
        items = check_images(images)
        s = self.config.size
        sized = torch.cat([F.interpolate(im[None].float(), size=(s, s), mode="bilinear", align_corners=False,
                                         antialias=True) if tuple(im.shape[-2:]) != (s, s) else im[None].float()
                           for im in items]).round().clamp(0, 255).to(torch.uint8)
        return items, sized

    def _generator(self, generator):
        if generator is not None:
            return generator
        return torch.Generator().manual_seed(int(self.config.seed))

    def needs_sd(self) -> bool:
        cfg = self.config
        return cfg.mode == "cam" and (cfg.vce or "walk" in cfg.refine)

    @torch.no_grad()
    def forward(self, sized: torch.Tensor, *, vce: bool | None = None, need_sd: bool | None = None,
                generator: torch.Generator | None = None, return_attn: bool = True,
                return_layers: bool = False) -> Forward:
        """The SD pass (when VCE or the walk needs it) and the CLIP forward on ``sized`` uint8 (B, 3, S, S)."""
        cfg = self.config
        vce = cfg.vce if vce is None else vce
        need_sd = bool(vce or "walk" in cfg.refine) if need_sd is None else bool(need_sd or vce)
        sda, bias = None, None
        if need_sd:
            self._check_sd()
            with self.timer("unet", self.sd.device):
                sda = vcelib.sd_pass(self.sd, sized, vce_layer=cfg.vce_layer, vce_heads=cfg.vce_heads,
                                     walk_layer=cfg.walk_layer, walk_heads=cfg.walk_heads, t=cfg.t,
                                     prompt=cfg.sd_prompt, generator=self._generator(generator))
        grid = self.grid
        if vce:
            with self.timer("vce", self.clip.device):
                bias = self.vce_bias(sda, grid)
        with self.timer("clip", self.clip.device):
            out = self.clip(sized.to(self.clip.device), surgery_layers=cfg.surgery_layers,
                            attn_bias=None if bias is None else cfg.vce_weight * bias.to(self.clip.device),
                            return_attn=return_attn, return_layers=return_layers, pos_interp=cfg.pos_interp)
            feats = camlib.token_features(out.cls, out.patch, cfg.feature_norm)
        return Forward(feats=feats, out=out, grid=tuple(out.grid), sd=sda, bias=bias)

    def vce_bias(self, sda: vcelib.SDAttention, grid: tuple[int, int]) -> torch.Tensor:
        """A_ref (B, P, P) on CLIP's grid from the SD pass (§2b)."""
        cfg = self.config
        q = vcelib.upsample_tokens(sda.vce_q, sda.vce_grid, grid)
        k = vcelib.upsample_tokens(sda.vce_k, sda.vce_grid, grid)
        a = vcelib.sd_affinity(q, k, cfg.vce_threshold, cfg.vce_head_mode)
        if cfg.acr:
            a, _ = vcelib.acr(a, grid, cfg.acr_clusters, cfg.acr_kmeans_iterations, cfg.acr_iterations,
                              cfg.acr_recluster, cfg.acr_exact_seeds)
        return a

    def patch_cam(self, feats: torch.Tensor, fg_names: Sequence[str]) -> torch.Tensor:
        """cam_pt (B, N, C) (§1)."""
        rows, _ = self.text_rows(fg_names)
        return camlib.patch_text_cam(feats, rows.to(feats.device), len(fg_names))

    def static_cam(self, feats: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """The static cache CAM (B, N, C) (§3b); class_names with the background first."""
        if self.cache is None:
            raise ValueError("DiCLIPConfig.cache: the static CAM needs a key-value cache file (weakseg cache build)")
        self.cache.check(class_names, feats.shape[-1])
        c = self.cache
        return camlib.static_cache_cam(feats, c.keys.to(feats.device), c.text_weights.to(feats.device),
                                       self.config.cache_activation, self.config.cache_beta)

    def cams(self, fwd: Forward, class_names: Sequence[str], source: str | None = None,
             adapter_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The CAM (B, N, C_fg) of ``source`` ("static" falls back to "patch" without a cache)."""
        cfg = self.config
        source = source or cfg.cam_source
        fg = list(class_names)[1:]
        cam_pt = self.patch_cam(fwd.feats, fg)
        if source == "static" and self.cache is not None:
            return camlib.combine_cams(cam_pt, self.static_cam(fwd.feats, class_names), cfg.static_weight)
        if source == "dynamic":
            if adapter_logits is None:
                if self.adapter is None:
                    raise ValueError("the dynamic CAM needs a trained adapter (checkpoint=...)")
                if self.head_classes is not None and list(class_names) != self.head_classes:
                    raise ValueError(f"class_names: the adapter was trained on {self.head_classes}, got "
                                     f"{list(class_names)}")
                adapter_logits = self.adapter(fwd.feats[:, 1:].to(next(self.adapter.parameters()).device))
            return camlib.combine_cams(cam_pt, adapter_logits[..., 1:].float().clamp_min(0).to(cam_pt.device),
                                       cfg.dynamic_weight)
        return cam_pt

    def refine_maps(self, cams: torch.Tensor, fwd: Forward, allowed: torch.Tensor, sized: torch.Tensor, *,
                    steps: Sequence[str] | None = None, caa_threshold: float | None = None,
                    walk_steps: int | None = None, seg_attn: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per image, the maps (K_b, h, w) of its allowed classes after the refinement ``steps`` (§4),
        on the grid of the last step (CLIP's, the walk layer's, or the image for PAR)."""
        cfg = self.config
        steps = cfg.refine if steps is None else tuple(steps)
        caa_threshold = cfg.caa_threshold if caa_threshold is None else caa_threshold
        walk_steps = cfg.walk_steps if walk_steps is None else walk_steps
        B, N, C = cams.shape
        h, w = fwd.grid
        aff = None
        if "caa" in steps:
            aff = reflib.caa_attention(fwd.out.attn, cfg.caa_layers, cfg.caa_attention, cfg.surgery_layers,
                                       fwd.out.surgery_attn, seg_attn)
        out = []
        for b in range(B):
            idx = torch.nonzero(allowed[b]).flatten().tolist()
            m = cams[b][:, idx].T.reshape(len(idx), h, w).float()
            for st in steps:
                if not idx:
                    break
                if st == "caa":
                    if m.shape[-2:] != (h, w):
                        m = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                    m = reflib.caa_refine(m, aff[b].cpu(), caa_threshold)
                elif st == "walk":
                    sda = fwd.sd
                    gh, gw = sda.walk_grid
                    x = F.interpolate(m[None], size=(gh, gw), mode="bilinear", align_corners=False)[0]
                    x = x.flatten(1).T[None].to(sda.walk_q.device)
                    r = reflib.sd_walk(sda.walk_q[b:b + 1], sda.walk_k[b:b + 1], x, walk_steps, cfg.walk_ent,
                                       sda.walk_scale)
                    m = r[0].T.reshape(len(idx), gh, gw).cpu()
                else:  # par
                    if self._par is None:
                        self._par = reflib.PAR(cfg.par_dilations, cfg.par_iterations)
                    img = (sized[b:b + 1].float() / 255.0 - self.clip.mean.cpu()) / self.clip.std.cpu()
                    m = self._par(img, minmax_per_class(m[None], eps=1e-12))[0]
            out.append(m)
        return out

    def labels_from_maps(self, maps: list[torch.Tensor], allowed: torch.Tensor, class_names: Sequence[str],
                         size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image maps of the allowed classes -> (scores (B, C, H, W), labels (B, H, W)): upsampled,
        per-class min-max, bg = 1 − max (power 1), argmax over the present classes."""
        B = len(maps)
        H, W = size
        fg = torch.zeros(B, len(class_names) - 1, H, W)
        for b, m in enumerate(maps):
            idx = torch.nonzero(allowed[b]).flatten().tolist()
            if idx:
                up = F.interpolate(m[None].float(), size=(H, W), mode="bilinear", align_corners=False)
                fg[b, idx] = minmax_per_class(up, eps=1e-12)[0].cpu()
        full = torch.cat([torch.ones(B, 1, dtype=torch.bool), allowed.cpu()], dim=1)
        return scores_to_labels(fg, class_names, full, BackgroundRule("power", 1.0))

    # ------------------------------------------------------------------ cache building
    @torch.no_grad()
    def pseudo_mask_features(self, image: torch.Tensor, class_names: Sequence[str], class_ids: Sequence[int], *,
                             caa_threshold: float = 0.79, walk_steps: int = 10, pooling: str = "nearest"):
        """For one image with its present class ids (0 = background included): the training-free pseudo
        mask (patch CAM with VCE -> CAA -> walk -> argmax) at the image's own size (the code's masks are
        made at the size of its 512 px generated images) and the VCE token features pooled under each
        present class's mask -> {class id: (D,) feature} (classes with an empty mask left out)."""
        from weakseg.methods.diclip.cache import _pool

        _, sized = self.resize_batch([image])
        fwd = self.forward(sized, vce=self.config.vce, need_sd=True)
        C = len(class_names)
        allowed = torch.zeros(1, C - 1, dtype=torch.bool)
        for c in class_ids:
            if c > 0:
                allowed[0, c - 1] = True
        cams = self.cams(fwd, class_names, source="patch")
        maps = self.refine_maps(cams, fwd, allowed, sized, steps=("caa", "walk"), caa_threshold=caa_threshold,
                                walk_steps=walk_steps)
        _, labels = self.labels_from_maps(maps, allowed, class_names, tuple(image.shape[-2:]))
        return _pool(self, sized, labels, fwd.feats, fwd.grid, [list(class_ids)], pooling)[0]

    # ------------------------------------------------------------------ trained head
    @torch.no_grad()
    def head_logits(self, sized_float: torch.Tensor) -> torch.Tensor:
        """Head logits (B, C, h, w) for float RGB 0..255 images (B, 3, S, S) (S a patch multiple)."""
        x = sized_float.round().clamp(0, 255).to(torch.uint8)
        out = self.clip(x.to(self.clip.device), return_layers=True, pos_interp=self.config.pos_interp)
        logits, _ = self.head(out.layers, tuple(out.grid))
        return logits

    @torch.no_grad()
    def segment_head(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Multi-scale (+ flip) head logits of each image, merged at merge_scale × its size and resized
        to it -> (B, C, H, W) (all images one size)."""
        cfg = self.config
        ph, _ = self.clip.patch_size
        H, W = items[0].shape[-2:]
        mh, mw = max(1, round(cfg.merge_scale * H)), max(1, round(cfg.merge_scale * W))
        batch = torch.stack(items).float()
        acc = None
        for s in cfg.test_scales:
            side = max(ph, int(round(cfg.size * s / ph)) * ph)
            x = F.interpolate(batch, size=(side, side), mode="bilinear", align_corners=False)
            lg = self.head_logits(x)
            flip = cfg.flip == "all" or (cfg.flip == "code" and s != 1.0)
            if flip:
                lg = lg + self.head_logits(x.flip(-1)).flip(-1)
            lg = F.interpolate(lg.float(), size=(mh, mw), mode="bilinear", align_corners=False)
            acc = lg if acc is None else acc + lg
        return F.interpolate(acc, size=(H, W), mode="bilinear", align_corners=False).cpu()

    def _crf(self, image: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        try:
            import pydensecrf.densecrf as dcrf
            from pydensecrf.utils import unary_from_softmax
        except ImportError:
            raise ImportError("DiCLIPConfig.crf=True needs pydensecrf (pip install pydensecrf2)") from None
        import numpy as np

        cfg = self.config
        C, H, W = probs.shape
        d = dcrf.DenseCRF2D(W, H, C)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.numpy().astype(np.float32))))
        d.addPairwiseGaussian(sxy=cfg.crf_pos_xy, compat=cfg.crf_pos_w)
        img = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
        d.addPairwiseBilateral(sxy=cfg.crf_bi_xy, srgb=cfg.crf_bi_rgb, rgbim=img, compat=cfg.crf_bi_w)
        q = np.array(d.inference(cfg.crf_iterations)).reshape(C, H, W)
        return torch.from_numpy(q).float()

    # ------------------------------------------------------------------ Segmenter
    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None
                ) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of same-sized (3, H, W); class_names: background first;
        image_labels: optional (B, C) bool (the classes present). Returns per-class scores and labels."""
        items = check_images(images)
        inp = check_segment_inputs(items, class_names, image_labels, background="required", min_foreground=1)
        class_names, allowed, (H, W) = inp.class_names, inp.allowed, inp.size
        if self.config.mode == "head":
            return self._segment_head(items, class_names, allowed if image_labels is not None else None)
        _, sized = self.resize_batch(items)
        fwd = self.forward(sized, return_attn="caa" in self.config.refine)
        with self.timer("refine", self.clip.device):  # CAMs, CAA, walk / PAR, labels
            cams = self.cams(fwd, class_names)
            maps = self.refine_maps(cams, fwd, allowed[:, 1:], sized)
            scores, labels = self.labels_from_maps(maps, allowed[:, 1:], class_names, (H, W))
        return SegmentationOutput(scores=scores, labels=labels, class_names=class_names)

    def _segment_head(self, items, class_names, allowed) -> SegmentationOutput:
        if self.head is None:
            raise ValueError("mode='head': the checkpoint has no segmentation head")
        if class_names != self.head_classes:
            raise ValueError(f"class_names: the head was trained on {self.head_classes}, got {class_names}")
        logits = self.segment_head(items)
        if allowed is not None and self.config.head_use_image_labels:
            logits = logits.masked_fill(~allowed[:, :, None, None], float("-inf"))
        probs = logits.softmax(dim=1)
        if self.config.crf:
            probs = torch.stack([self._crf(im.cpu(), p) for im, p in zip(items, probs)])
        return SegmentationOutput(scores=probs, labels=probs.argmax(dim=1), class_names=class_names)

    # ------------------------------------------------------------------ deployment
    def export_graphs(self, variant: str = "auto"):
        """The deployable graphs (:class:`weakseg.export.ExportGraphs`): CLIP image tower + trained head
        (``variant="head"``, the default when a head is loaded) or the training-free patch-text CAM
        (``"cam"``), text embeddings as an input; SD, VCE/ACR, CAA and the walk stay out of the graph.
        See :mod:`weakseg.methods.diclip.export` for the exact semantics."""
        from weakseg.methods.diclip.export import diclip_export_graphs

        return diclip_export_graphs(self, variant)
