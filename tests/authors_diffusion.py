"""A faithful transcription of the parts of the iSeg (linsun449/iseg.code) and DiffSegmenter
(VCG-team/DiffSegmenter) authors' code that weakseg's prompts and DiffSegmenter's propagation are
checked against — a test oracle and the benchmarks' baseline, not part of the package.

Sources:

* iSeg @87debb0: data/voc/voc_name20.py (``VOC12_NAME``), data/coco14/coco_name80.py (``COCO14_NAME``),
  data/voc_context/context_name59.py (``ORI_CONTEXT_NAME``, ``VOC_CONTEXT_NAME``); the prompt loop of
  wsss/iSeg.py ``test_step`` / ovs/diff_for_openvocabulary.py ``test_step`` (text and token_sel_ids).
* DiffSegmenter @3878b39: the ``embs`` class lists of open_vocabulary/voc12/ptp_stable_best.py (VOC),
  open_vocabulary/voc10/ptp_stable_voc10.py (PASCAL Context, VOC2010 images) and
  open_vocabulary/coco/ptp_stable_coco.py (COCO-Object); their prompt construction and the token indices
  of the cross-attention read-out (incl. the ``endswith("ing")`` fusion); ptp_utils' attention
  ``forward`` (explicit ``softmax(q kᵀ·scale)``, the probabilities handed to the controller, then
  ``attn @ v``), ``AttentionStore`` (``forward`` appends, ``between_steps``, ``get_average_attention``)
  and ``aggregate_all_attention`` + the product ``self_att @ cross_att_map``.

Changes from the originals, none of them semantic: no ``.cuda()`` / ``.cpu()``, no ``einops`` (the
``rearrange`` patterns written as view/permute), the BLIP output is an argument, the per-class loops
are functions of one class.
"""

from __future__ import annotations

import torch

# ------------------------------------------------------------------ iSeg class tables
ISEG_VOC12_NAME = {
    "plane": [1, [0]], "bicycle": [1, [0]], "bird": [1, [0]], "boat": [1, [0]], "bottle": [1, [0]],
    "bus": [1, [0]], "car": [1, [0]], "cat": [1, [0]], "chair": [1, [0]], "cow": [1, [0]],
    "dining table": [2, [0, 1]], "dog": [1, [0]], "horse": [1, [0]], "motorbike": [1, [0]], "person": [1, [0]],
    "potted plant": [2, [1]], "sheep": [1, [0]], "sofa": [1, [0]], "train": [1, [0]], "tv monitor": [2, [1]],
}

ISEG_ORI_CONTEXT_NAME = [
    'airplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'table', 'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train', 'monitor',
    'bag', 'bed', 'bench', 'book', 'building', 'cabinet', 'ceiling', 'cloth', 'computer', 'cup',
    'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'keyboard', 'light', 'mountain',
    'mouse', 'curtain', 'platform', 'sign', 'plate', 'road', 'rock', 'shelves', 'sidewalk', 'sky',
    'snow', 'bedclothes', 'track', 'tree', 'truck', 'wall', 'water', 'window', 'wood']
# VOC_CONTEXT_NAME: every entry is [1, [0]] (one token, take it); the keys in the same order as ORI_CONTEXT_NAME
ISEG_VOC_CONTEXT_NAME = {k: [1, [0]] for k in [
    'plane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'table', 'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train', 'monitor',
    'bag', 'bed', 'bench', 'book', 'building', 'cabinet', 'ceiling', 'cloth', 'laptop', 'cup',
    'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'keyboard', 'light', 'mountain',
    'mouse', 'curtain', 'platform', 'sign', 'plate', 'road', 'rock', 'shelves', 'sidewalk', 'sky',
    'snow', 'bedding', 'track', 'tree', 'truck', 'wall', 'water', 'window', 'wood']}

ISEG_COCO14_NAME = {
    'people': [1, [0]], 'bicycle': [1, [0]], 'car': [1, [0]], 'motorbike': [1, [0]], 'plane': [1, [0]],
    'bus': [1, [0]], 'train': [1, [0]], 'truck': [1, [0]], 'boat': [1, [0]], 'traffic light': [2, [1]],
    'fire hydrant': [2, [1]], 'stop sign': [2, [0, 1]], 'parking meter': [2, [0, 1]], 'bench': [1, [0]],
    'bird': [1, [0]], 'cat': [1, [0]], 'dog': [1, [0]], 'horse': [1, [0]], 'sheep': [1, [0]], 'cow': [1, [0]],
    'elephant': [1, [0]], 'bear': [1, [0]], 'zebra': [1, [0]], 'giraffe': [1, [0]], 'backpack': [1, [0]],
    'umbrella': [1, [0]], 'handbag': [1, [0]], 'tie': [1, [0]], 'suitcase': [1, [0]], 'frisbee': [1, [0]],
    'skis': [1, [0]], 'snowboard': [1, [0]], 'sports ball': [2, [0, 1]], 'kite': [1, [0]],
    'baseball bat': [2, [1]], 'baseball glove': [2, [1]], 'skateboard': [1, [0]], 'surfboard': [2, [0, 1]],
    'tennis racket': [2, [1]], 'bottle': [1, [0]], 'wine glass': [2, [1]], 'cup': [1, [0]], 'fork': [1, [0]],
    'knife': [1, [0]], 'spoon': [1, [0]], 'bowl': [1, [0]], 'banana': [1, [0]], 'apple': [1, [0]],
    'sandwich': [1, [0]], 'orange': [1, [0]], 'broccoli': [1, [0]], 'carrot': [1, [0]], 'hot dog': [2, [0, 1]],
    'pizza': [1, [0]], 'donut': [1, [0]], 'cake': [1, [0]], 'chair': [1, [0]], 'sofa': [1, [0]],
    'potted plant': [2, [1]], 'bed': [1, [0]], 'dining table': [2, [0, 1]], 'toilet': [1, [0]],
    'tv monitor': [2, [1]], 'laptop': [1, [0]], 'mouse': [1, [0]], 'remote': [1, [0]], 'keyboard': [1, [0]],
    'cell phone': [2, [0, 1]], 'microwave': [1, [0]], 'oven': [1, [0]], 'toaster': [1, [0]], 'sink': [1, [0]],
    'refrigerator': [1, [0]], 'book': [1, [0]], 'clock': [1, [0]], 'vase': [1, [0]], 'scissors': [1, [0]],
    'teddy bear': [2, [0, 1]], 'hair drier': [2, [0, 1]], 'toothbrush': [1, [0]],
}


def iseg_prompt(img_label, all_tokens, bg_context="ground, land, grass, tree, building, wall, sky, lake, water",
                ovs=False):
    """wsss/iSeg.py test_step (``ovs=False``: "... and background, " + bg) or ovs/diff_for_openvocabulary.py
    (``ovs=True``: "... and background" + bg): the prompt text and the token_sel_ids per class."""
    token_start_ids, token_sel_ids = [], []
    text = "a photograph of "
    last_cls = None
    for idx, cls in enumerate(img_label):
        text += cls + " and "
        token_start_ids.append(token_start_ids[idx - 1] + 1 + all_tokens[last_cls][0] if idx > 0 else 4)
        token_sel_ids.append([token_start_ids[-1] + sel_id for sel_id in all_tokens[cls][1]])
        last_cls = cls
    if ovs:
        text = text[:-5] + " and other object and background" + bg_context
    else:
        text = text[:-5] + " and other object and background, " + bg_context
    return text, token_sel_ids


# ------------------------------------------------------------------ DiffSegmenter class lists (``embs``)
DS_VOC12_EMBS = ["plane", "bicycle", "bird", "boat", "bottle", "buses", "car", "cat", "chair", "cow", "table",
                 "dog", "horse", "motorbike", "people", "plant", "sheep", "sofa", "train", "monitor"]
DS_VOC10_EMBS = [
    'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book',
    'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow',
    'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse',
    'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'plant', 'road',
    'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree',
    'truck', 'monitor', 'wall', 'water', 'window', 'wood']
DS_COCO_EMBS = [
    'person', 'bicycle', 'car', 'motorbike', 'aeroplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'sofa', 'pottedplant', 'bed', 'diningtable', 'toilet',
    'tvmonitor', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrus']


def ds_voc12_prompt(cls, out_prompt=None):
    """ptp_stable_best.py: the prompt and the token indices read for class ``cls`` given BLIP's output
    ``out_prompt`` (seeded with "a photograph of {cls}"; None = BLIP returned the seed only)."""
    prompt = f"a photograph of {cls}"
    out_prompt = prompt if out_prompt is None else out_prompt
    prompt = [prompt + "++" + out_prompt[len(prompt):]]
    if len(prompt[0].split(" ")) > 4 and prompt[0].split(" ")[4].endswith("ing"):
        return prompt[0], [4, 5]
    return prompt[0], [4]


def ds_voc10_coco_prompt(cls, tokenizer, out_prompt=None, coco=False):
    """ptp_stable_voc10.py (``coco=False``) / ptp_stable_coco.py (``coco=True``): BLIP's output (seeded with
    "a photography of {cls}") with the class's last word turned into "word++"; the token indices read."""
    prompt = f"a photography of {cls}"
    out_prompt = prompt if out_prompt is None else out_prompt
    embs_len = len(tokenizer.encode(cls)) - 2
    word_len = len(cls.split(" "))
    out_prompt = out_prompt.split(" ")
    last_word = cls.split(" ")[-1]
    out_prompt[2 + word_len] = f"{last_word}++"
    prompt = [" ".join(out_prompt)]
    try:
        if prompt[0].split(" ")[3 + word_len].endswith("ing"):
            return prompt[0], [3 + embs_len, (5 if coco else 4) + embs_len]
        return prompt[0], [3 + embs_len]
    except IndexError:
        return prompt[0], [3 + embs_len]


# ------------------------------------------------------------------ DiffSegmenter's attention, store, product
def ds_attention_forward(q, k, v, scale, store):
    """ptp_utils ``register_attention_control`` ``forward`` for one layer, q/k/v already split into heads as
    ``(b h) n d``: explicit scores and softmax, the probabilities handed to the controller (the
    AttentionStore of a [cond]-only batch appends them), then ``attn @ v``."""
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * scale
    attn = sim.softmax(dim=-1)
    store.append(attn)  # AttentionStore.forward: step_store[key].append(attn) (attn.shape[1] <= 64 ** 2)
    return torch.einsum("b i j, b j d -> b i d", attn, v)


def ds_self_attention_product(stored, n_prompts, res, cross_att_map):
    """``get_average_attention`` (every item / cur_step, cur_step = 1), ``aggregate_all_attention`` at the
    64x64 resolution (the layers' maps reshaped to (n_prompts, -1, res, res, P), prompt 0, concatenated
    over layers, summed and divided by their number) and ``torch.matmul(self_att, cross_att_map)``."""
    average = [item / 1 for item in stored]
    att = torch.cat([item.reshape(n_prompts, -1, res, res, item.shape[-1])[0] for item in average], dim=0)
    att = att.sum(0) / att.shape[0]
    self_att = att.view(res * res, res * res).float()
    return torch.matmul(self_att, cross_att_map.view(res * res, 1)).view(res, res)
