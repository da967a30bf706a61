"""The package's layering, read from the source: every import goes down (or sideways within its own
subpackage), no module uses a private name of another subpackage, and a new backbone is one decorated
class that a method can use by its spec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import weakseg
from weakseg.core import BACKBONES, FromSpec, ModelSpec

PKG = Path(weakseg.__file__).resolve().parent

# bottom to top; a module may import its own subpackage and any lower layer. The root package
# (weakseg/__init__.py) is the entry point: it names core and ops and declares the built-in entries by
# module path (strings, resolved on first lookup), so it sits with ops.
LAYERS = [
    {"io"},
    {"core", "distributed"},
    {"ops", "data", "<root>"},
    {"backbones"},
    {"eval", "export"},
    {"methods"},
    {"train"},
    {"toy"},
    {"demo", "bench", "cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
COMPILED = {"_C", "_C_emu"}  # the compiled extension modules, loaded by weakseg.ops only


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return "<root>" if len(parts) == 1 else parts[1]


def _imports(module: str, path: Path):
    """(imported module, imported names, line) of every weakseg import in the file, relative ones resolved."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "weakseg":
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "weakseg":
                yield target, [a.name for a in node.names], node.lineno


def _targets(target: str, names: list[str]):
    """The modules an import statement reaches: ``from weakseg import ops`` reaches weakseg.ops."""
    if target == "weakseg" and names:
        return [f"weakseg.{n}" for n in names]
    return [target]


def test_every_subpackage_has_a_layer():
    subs = {_subpackage(m) for m, _ in _modules()} - COMPILED
    assert subs <= set(RANK), f"subpackages without a layer in this test: {sorted(subs - set(RANK))}"


def test_no_import_goes_up():
    upward = []
    for module, path in _modules():
        src = _subpackage(module)
        for target, names, line in _imports(module, path):
            for t in _targets(target, names):
                dst = _subpackage(t)
                if dst in COMPILED or dst == src:
                    continue
                if RANK[dst] > RANK[src]:
                    upward.append(f"{path.relative_to(PKG.parent)}:{line}: {src} (layer {RANK[src]}) imports {t} "
                                  f"(layer {RANK[dst]})")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_no_private_name_crosses_subpackages():
    crossing = []
    for module, path in _modules():
        src = _subpackage(module)
        for target, names, line in _imports(module, path):
            for t in _targets(target, names):
                dst = _subpackage(t)
                if dst == src or dst in COMPILED:
                    continue
                private = [p for p in t.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
                private += [n for n in names if n.startswith("_") and not n.startswith("__") and n not in COMPILED]
                if private:
                    crossing.append(f"{path.relative_to(PKG.parent)}:{line}: {module} uses {', '.join(private)} "
                                    f"of {t}")
    assert not crossing, "private names used across subpackages:\n" + "\n".join(crossing)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker itself: a planted upward import and a private cross import are found."""
    f = tmp_path / "weakseg" / "core.py"
    f.parent.mkdir()
    f.write_text("from weakseg.methods import iseg\nfrom weakseg.eval.runner import _safe_name\n")
    found = list(_imports("weakseg.core", f))
    assert ("weakseg.methods", ["iseg"], 1) in found and ("weakseg.eval.runner", ["_safe_name"], 2) in found
    assert RANK[_subpackage("weakseg.methods")] > RANK[_subpackage("weakseg.core")]


def test_importing_core_imports_no_method():
    import subprocess
    import sys

    code = ("import sys, weakseg.core; bad = [m for m in sys.modules if m.startswith(('weakseg.methods', "
            "'weakseg.toy', 'weakseg.train', 'weakseg.backbones'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the model-spec grammar and one decorated class per backbone -----------------------------------------------
def test_model_spec_grammar(tmp_path):
    assert ModelSpec.parse("tiny") == ModelSpec("tiny", None, "tiny")
    assert ModelSpec.parse("tiny:sd15").name == "sd15"
    assert ModelSpec.parse("toy").kind == "toy"
    assert ModelSpec.parse("random:stabilityai/stable-diffusion-2-1-base") == ModelSpec(
        "random", "stabilityai/stable-diffusion-2-1-base", "random:stabilityai/stable-diffusion-2-1-base")
    assert ModelSpec.parse("facebook/dinov2-base").kind == "hub"
    assert ModelSpec.parse(str(tmp_path)) == ModelSpec("path", str(tmp_path), str(tmp_path))
    for bad in ("", "  ", None, 3, "random:"):
        with pytest.raises(ValueError, match="model"):
            ModelSpec.parse(bad)


def test_tiny_means_one_thing_per_backbone():
    a = BACKBONES.build("stable-diffusion", "tiny")
    b = BACKBONES.build("stable-diffusion", "tiny")
    assert a.name == b.name == "tiny-sd21"
    assert {h for _, h in a.attention_layers().values()} == {4}
    assert BACKBONES.build("stable-diffusion", "tiny:sd15").name == "tiny-sd15"
    with pytest.raises(ValueError, match="tiny:sd15"):
        BACKBONES.build("stable-diffusion", "tiny:sdxl")


class _ColourPseudo:
    """Pseudo masks for the bank: each pixel unlike the image's corner goes to the first present object class."""

    def segment(self, images, class_names, image_labels=None):
        from weakseg.core import SegmentationOutput

        x = torch.stack(list(images)).float()
        fg = ((x - x[:, :, :1, :1]).abs().sum(1) > 60)
        present = image_labels.clone()
        present[:, 0] = False
        cls = present.float().argmax(1)
        labels = torch.where(fg, cls[:, None, None], torch.zeros_like(cls)[:, None, None])
        scores = torch.nn.functional.one_hot(labels, len(class_names)).permute(0, 3, 1, 2).float()
        return SegmentationOutput(scores, labels, list(class_names))


def test_a_new_backbone_is_one_decorated_class(tmp_path):
    """Register a dense-feature backbone under a new name and run ModuSeg on it by spec alone."""
    from weakseg.backbones.features import PatchFeatures, pad_to_patch_multiple
    from weakseg.methods.moduseg import ModuSeg, ModuSegConfig
    from weakseg.toy.world import ToyWorld

    @BACKBONES.register("test-colour-patches")
    class ColourPatches(FromSpec):
        """Mean colour of 8x8 patches, plus a constant channel: a weight-free dense feature extractor."""

        FAMILY = "test-colour-patches"
        patch_size = 8
        dim = 4
        device = torch.device("cpu")
        dtype = torch.float32

        @classmethod
        def tiny(cls, **options):
            return cls()

        def __call__(self, images):
            x = torch.stack(list(images)).float() / 255
            H, W = x.shape[-2:]
            x, padding = pad_to_patch_multiple(x, 8)
            g = torch.nn.functional.avg_pool2d(x, 8)
            return PatchFeatures(torch.cat([g, torch.ones_like(g[:, :1])], 1), 8, (H, W), tuple(x.shape[-2:]), padding)

    try:
        assert "test-colour-patches" in BACKBONES
        cfg = ModuSegConfig(backbone="test-colour-patches", backbone_model="tiny", proposer="superpixel",
                            min_area=1, k=1)
        seg = ModuSeg(cfg)
        assert isinstance(seg.backbone, ColourPatches)
        assert seg.backbone_id == "test-colour-patches:tiny"
        world = ToyWorld(64, "train", num_scenes=6)
        names = list(world.class_names)
        seg.build_bank(world, tmp_path / "bank.safetensors", pseudo=_ColourPseudo(), progress=False, rank=0,
                       world_size=1, dataset_name="toyworld")
        seg.config = seg.config.replace(bank=str(tmp_path / "bank.safetensors"))
        scene = ToyWorld(64, "test", num_scenes=1)[0]
        out = seg.segment([scene.image], names)
        assert out.labels.shape == (1, 64, 64) and out.scores.shape == (1, len(names), 64, 64)
        assert set(out.labels.unique().tolist()) <= set(range(len(names)))
    finally:
        BACKBONES._items.pop("test-colour-patches", None)
