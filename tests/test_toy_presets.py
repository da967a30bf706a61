"""The methods' "toy" presets run on the toy world's model architecture (random weights here; the demo
uses the trained ones): the layer names, heads, prompt form and sizes they name exist and fit."""

import pytest
import torch

from weakseg.core import DemoEntry
from weakseg.toy.world import CLASSES, ToyWorld


@pytest.fixture(scope="module")
def toy_sd():
    from weakseg.toy.models import assemble_sd, build_clip, build_unet, build_vae, text_tower_to_hf

    return assemble_sd(build_vae(1), build_unet(2), text_tower_to_hf(build_clip(3).model))


@pytest.fixture(scope="module")
def scenes():
    w = ToyWorld(64, "val", num_scenes=2)
    return [w[i] for i in range(2)]


def _labels(scenes):
    m = torch.zeros(len(scenes), len(CLASSES), dtype=torch.bool)
    for i, s in enumerate(scenes):
        m[i, s.image_labels] = True
    return m


@pytest.mark.parametrize("name", ["iseg", "diffsegmenter"])
def test_toy_demo_entries_segment_toy_scenes(name, toy_sd, scenes, tmp_path):
    from weakseg.core import TOY_DEMOS
    import weakseg.methods  # noqa: F401

    entry = TOY_DEMOS.get(name)(tmp_path, progress=False, backbone=toy_sd)
    assert isinstance(entry, DemoEntry) and entry.note
    assert entry.method.sd is entry.baseline.sd is toy_sd  # one backbone for both
    assert entry.baseline.config.baseline and not entry.method.config.baseline
    images = [s.image for s in scenes]
    labels = _labels(scenes)
    for seg in (entry.method, entry.baseline):
        out = seg.segment(images, list(CLASSES), labels)
        assert out.scores.shape == (2, len(CLASSES), 64, 64) and out.labels.shape == (2, 64, 64)
        for i in range(2):  # weakly supervised: only the image's classes can be predicted
            assert set(out.labels[i].unique().tolist()) <= set(scenes[i].image_labels)
    # the refinement changes the maps (it is not the baseline under another name)
    a = entry.method.segment(images, list(CLASSES), labels).scores
    b = entry.baseline.segment(images, list(CLASSES), labels).scores
    assert not torch.allclose(a, b)


def test_toy_prompts_use_the_toy_caption_form(toy_sd):
    from weakseg.methods.diffsegmenter import DiffSegmenterConfig, build_prompt
    from weakseg.methods.iseg import ISegConfig

    assert build_prompt(DiffSegmenterConfig.from_preset("toy").prompt_template, "circle") == "a photo of a circle"
    cfg = ISegConfig.from_preset("toy")
    assert cfg.prompt_prefix + cfg.class_joiner.join(["circle", "star"]) == "a photo of a circle and a star"
