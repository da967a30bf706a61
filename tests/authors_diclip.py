"""A faithful transcription of the parts of the DiCLIP authors' code (zwyang6/DiCLIP) that weakseg is
checked against — a test oracle and the benchmarks' baseline, not part of the package.

Sources (read at the commits docs/specs/diclip.md names):

* clip/clip_custom.py (7da9c28): ``Attention.forward`` (the surgery blocks: original path + the q-q /
  k-k surgery path, ``ex_feats`` added to every head's patch block, the original attention returned
  summed over the heads), ``ResidualAttentionBlock.forward`` (dual path with its in-place residual
  adds), ``Transformer.forward`` (per-block attention and tokens), ``VisionTransformer.forward`` (the
  CLS of the original path written into the new path);
* clip/clip.py (7da9c28): ``generate_clip_fts`` (features divided by their norm over the tokens, the
  per-block attention stacked);
* utils/affutils.py (638f857): ``compute_trans_mat``, ``scoremap2bbox``, ``refine_cams_with_aff``.

Changes from the originals, none of them semantic: ``.cuda()`` dropped (CPU), the layouts are the
originals' (LND inside the transformer); the blocks before the surgery ones are
``nn.MultiheadAttention`` as in OpenAI CLIP (``need_weights=True`` returns the head mean), loaded from
an open_clip model's weights (:func:`from_open_clip`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_CONTOUR_INDEX = 1 if cv2.__version__.split('.')[0] == '3' else 0


# ------------------------------------------------------------------ clip/clip_custom.py
class Attention(nn.Module):
    def __init__(self, out_dim, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0., settings=''):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.settings = settings

    def forward(self, x, return_weights, ex_feats):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        # original self-attention for the original path
        attn_ori = (q @ k.transpose(-2, -1)) * self.scale
        attn_ori = attn_ori.softmax(dim=-1)
        attn_ori = self.attn_drop(attn_ori)

        scale = self.scale
        attn1 = (q @ q.transpose(-2, -1)) * scale
        attn2 = (k @ k.transpose(-2, -1)) * scale

        if ex_feats is None:
            attn = (attn1).softmax(dim=-1) + 2 * (attn2).softmax(dim=-1)
        else:
            attn = ((attn1).softmax(dim=-1) + 2 * (attn2).softmax(dim=-1))
            attn_feats = attn[:, :, 1:, 1:] + ex_feats
            attn[:, :, 1:, 1:] = attn_feats

        attn = self.attn_drop(attn)
        attn = torch.sum(attn, dim=1, keepdim=True)

        x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)  # clip_surgery
        x = self.proj_drop(self.proj(x))
        x_ori = self.proj_drop(self.proj(x_ori))

        attn_ori = torch.sum(attn_ori, dim=1)

        if return_weights:
            return x, x_ori, attn_ori
        else:
            return x, x_ori


class ResidualAttentionBlock(nn.Module):
    def __init__(self, attn, ln_1, mlp, ln_2):
        super().__init__()
        self.attn = attn
        self.ln_1 = ln_1
        self.mlp = mlp
        self.ln_2 = ln_2
        self.attn_mask = None

    def attention(self, x: torch.Tensor, return_weights, ex_feats):
        if isinstance(self.attn, Attention):
            x = x.transpose(0, 1)
            x, x_ori, attn = self.attn(x, return_weights, ex_feats)
            return [x.transpose(0, 1), x_ori.transpose(0, 1), attn]
        else:
            return self.attn(x, x, x, need_weights=return_weights, attn_mask=self.attn_mask)

    def forward(self, x, return_weights, ex_feats):
        # dual paths for blocks deeper than "d"
        if isinstance(self.attn, Attention):
            if isinstance(x, list) and len(x) == 3:
                x, x_ori, attn_ori = x
                x_res = self.attention(self.ln_1(x_ori), return_weights, ex_feats)
                x_res, x_ori_res, attn2 = x_res
                x_ori += x_ori_res
                x_ori = x_ori + self.mlp(self.ln_2(x_ori))
                x += x_res  # skip ffn for the new path
                return [x, x_ori, attn2]
            # start of dual path
            else:
                x_res = self.attention(self.ln_1(x), return_weights, ex_feats)
                if isinstance(x_res, list) and len(x_res) == 3:
                    x_res, x_ori_res, attn = x_res
                    x_ori = x + x_ori_res
                    x_ori = x_ori + self.mlp(self.ln_2(x_ori))
                    x += x_res
                    return [x, x_ori, attn]
        # single path before "d"
        else:
            x_, attn = self.attention(self.ln_1(x), return_weights, ex_feats)
            x = x + x_
            x = x + self.mlp(self.ln_2(x))
            return x, attn


def transformer_forward(resblocks, x, return_weights, ex_feats):
    """``Transformer.forward``."""
    attn_weights = []
    all_feats = []
    with torch.no_grad():
        for i in range(len(resblocks)):
            x_ = resblocks[i](x, return_weights, ex_feats)
            if len(x_) == 2:
                x, attn = x_
                x_cured = x.permute(1, 0, 2)
            elif len(x_) == 3:
                x = x_
                x_cured = x[1].permute(1, 0, 2)
                attn = x[-1]
            attn_weights.append(attn)
            all_feats.append(x_cured)
    if isinstance(x, list):
        return x[0], x[1], attn_weights, all_feats
    else:
        return x, attn_weights


def from_open_clip(visual, surgery_layers: int = 3):
    """The authors' resblocks built from an open_clip ``VisionTransformer``'s weights, with
    ``reload_self_attn(layers=surgery_layers + 1)``: the last ``surgery_layers`` blocks get an
    ``Attention`` holding the block's in_proj / out_proj weights."""
    blocks = []
    n = len(visual.transformer.resblocks)
    for i, ob in enumerate(visual.transformer.resblocks):
        d, heads = ob.attn.embed_dim, ob.attn.num_heads
        if i >= n - surgery_layers:
            attn = Attention(d, d, heads, True)
            attn.qkv.weight.data = ob.attn.in_proj_weight.clone()
            attn.qkv.bias.data = ob.attn.in_proj_bias.clone()
            attn.proj.weight.data = ob.attn.out_proj.weight.clone()
            attn.proj.bias.data = ob.attn.out_proj.bias.clone()
        else:
            attn = nn.MultiheadAttention(d, heads)
            attn.load_state_dict(ob.attn.state_dict())
        blocks.append(ResidualAttentionBlock(attn, ob.ln_1, ob.mlp, ob.ln_2).eval())
    return blocks


@torch.no_grad()
def encode_image(visual, blocks, x, pos, return_weights=True, ex_feats=None):
    """``VisionTransformer.forward`` on normalised pixels ``x`` with the position embedding ``pos``
    (1 + hw, width) already on the grid, then ``generate_clip_fts``: (features divided by their norm
    over the tokens, stacked per-block attention (L, B, 1+hw, 1+hw), stacked per-block tokens)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x.permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                                    device=x.device), x], dim=1)
    x = x + pos
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    x, x_ori, attn_weights, all_feats = transformer_forward(blocks, x, return_weights, ex_feats)
    x[0, :, :] = x_ori[0, :, :]  # clip_surgery
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x)
    x = x @ visual.proj
    image_features = x / x.norm(dim=1, keepdim=True)
    return image_features, torch.stack(attn_weights, dim=0), torch.stack(all_feats, dim=0)


# ------------------------------------------------------------------ utils/affutils.py
def compute_trans_mat(attn_weight):
    aff_mat = attn_weight

    trans_mat = aff_mat / torch.sum(aff_mat, dim=0, keepdim=True)
    trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)

    for _ in range(2):
        trans_mat = trans_mat / torch.sum(trans_mat, dim=0, keepdim=True)
        trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)
    trans_mat = (trans_mat + trans_mat.transpose(1, 0)) / 2

    for _ in range(1):
        trans_mat = torch.matmul(trans_mat, trans_mat)

    return trans_mat


def scoremap2bbox(scoremap, threshold, multi_contour_eval=False):
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, thr_gray_heatmap = cv2.threshold(
        src=scoremap_image,
        thresh=int(threshold * np.max(scoremap_image)),
        maxval=255,
        type=cv2.THRESH_BINARY)
    contours = cv2.findContours(
        image=thr_gray_heatmap,
        mode=cv2.RETR_TREE,
        method=cv2.CHAIN_APPROX_SIMPLE)[_CONTOUR_INDEX]

    if len(contours) == 0:
        return np.asarray([[0, 0, 0, 0]]), 1

    if not multi_contour_eval:
        contours = [max(contours, key=cv2.contourArea)]

    estimated_boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        x0, y0, x1, y1 = x, y, x + w, y + h
        x1 = min(x1, width - 1)
        y1 = min(y1, height - 1)
        estimated_boxes.append([x0, y0, x1, y1])

    return np.asarray(estimated_boxes), len(contours)


def refine_cams_with_aff(attr_map, attn_weights, cls_label, size, caa_thre=0.79, attn_layers=6, seg_attn=None,
                         patch=16):
    """``refine_cams_with_aff`` for one image: attr_map (hw, C) CAM, attn_weights (L, 1+hw, 1+hw)
    (``attn_weights[:, i]`` of the stacked attention), cls_label (C,), size = the input (H, W).
    ``patch``: the code's hard-coded 16 (the CLIP patch), a parameter here for small models."""
    h, w = size
    attn_weight = attn_weights[:, 1:, 1:][-attn_layers:]

    if seg_attn is not None:
        attn_diff = seg_attn - attn_weight
        attn_diff = torch.sum(attn_diff.flatten(1), dim=1)
        diff_th = torch.mean(attn_diff)

        attn_mask = torch.zeros_like(attn_diff)
        attn_mask[attn_diff <= diff_th] = 1
        attn_mask = attn_mask.reshape(-1, 1, 1)
        attn_mask = attn_mask.expand_as(attn_weight)

        attn_weight = torch.sum(attn_mask * attn_weight, dim=0) / (torch.sum(attn_mask, dim=0) + 1e-5)
        attn_weight = attn_weight.detach()
        attn_weight = attn_weight * seg_attn.squeeze(0).detach()
    else:
        attn_weight = torch.mean(attn_weight, dim=0)  # (1, hw, hw)
        attn_weight = attn_weight.detach()

    _trans_mat = compute_trans_mat(attn_weight)
    _trans_mat = _trans_mat.float()

    cls_lst = torch.where(cls_label)[0]
    cam_refined_list = []

    for i, cls in enumerate(cls_lst):
        grayscale_cam = attr_map[:, cls].cpu().numpy().reshape(h // patch, w // patch)
        box, cnt = scoremap2bbox(scoremap=grayscale_cam, threshold=caa_thre, multi_contour_eval=True)
        aff_mask = torch.zeros((grayscale_cam.shape[0], grayscale_cam.shape[1]))
        for i_ in range(cnt):
            x0_, y0_, x1_, y1_ = box[i_]
            aff_mask[y0_:y1_, x0_:x1_] = 1

        aff_mask = aff_mask.view(1, grayscale_cam.shape[0] * grayscale_cam.shape[1])
        trans_mat = _trans_mat * aff_mask

        cam_to_refine = torch.FloatTensor(grayscale_cam)
        cam_to_refine = cam_to_refine.view(-1, 1)

        cam_refined = torch.matmul(trans_mat, cam_to_refine).reshape(h // patch, w // patch)
        cam_refined_list.append(cam_refined)

    return cam_refined_list, cls_lst.detach().cpu()


# ------------------------------------------------------------------ maintain_kv_cache/both_fore_bkg/generate_kv_cache.py
def map_keys(feats, labels, resize_size=320, patch=16):
    """The per-image part of ``build_validation``: ``feats`` (1, 1 + hw, D) (the model's features),
    ``labels`` (1, H, W) the image's pseudo mask (class id, 0 = background) -> (fg key (1, D), bg key
    (1, D)), or None for an empty mask."""
    import torch.nn.functional as F  # noqa: F811 (as the script)

    labels_down = F.interpolate(labels.unsqueeze(0).float(), size=[resize_size // patch, resize_size // patch],
                                mode='nearest')[0]
    masks = labels_down.reshape(1, -1).unsqueeze(-1)
    masks_binary = masks > 0
    if masks_binary.sum() > 0:
        key = feats[:, 1:, :] * masks_binary
        key_norm = key.sum(1) / masks_binary.sum(1)
        key = feats[:, 1:, :] * (~masks_binary)
        bkg_norm = key.sum(1) / (~masks_binary).sum(1)
        return key_norm, bkg_norm
    return None


def cluster_keys(cache_key, num_cluster, class_list, bkg_clusters=20):
    """The clustering loop: per class (background first), sklearn ``KMeans(n_clusters, random_state=0)``
    on the stacked keys."""
    from sklearn.cluster import KMeans

    cluster_keys = []
    for i, cls_name in enumerate(class_list):
        cls_key = torch.cat(cache_key[cls_name]).cpu().numpy()
        n = bkg_clusters if cls_name == '_background_' else num_cluster
        kmeans = KMeans(n_clusters=n, random_state=0).fit(cls_key)
        cluster_keys.append(torch.tensor(kmeans.cluster_centers_))
    return torch.cat(cluster_keys)
