"""DiffSegmenter's self-attention propagation at SD 1.5's 64x64 layers (5 layers x 8 heads, head width 40,
320 channels; P = latent pixels): the authors' code against weakseg's two paths, on the same layers,
hidden states and fused cross-attention map x. Verifies first, then times.

- authors: tests/authors_diffusion.py — each layer's forward forms softmax(q kᵀ·scale) explicitly, hands
  it to the AttentionStore (kept, one map per layer and head), takes attn @ v; then
  get_average_attention + aggregate_all_attention (the mean of the 40 maps) and self_att @ x;
- weakseg "reference" (DiffSegmenter's propagation="auto" on the CPU when the maps fit its budget): the
  capture keeps one running float32 mean per resolution, each layer's output comes from the same
  probabilities (``LayerCapture(reuse=True)``), then one product A @ x;
- weakseg "fused" (propagation="fused"): the layers run scaled-dot-product attention, the capture keeps
  q/k only, then ``propagate_fused`` recomputes softmax(q kᵀ) x per layer and head (no P x P map).

Two views per P: "stage" = the five layers' attention with its capture + the product (what a UNet pass
plus the propagation costs at these layers; the q/k/v/out projections are included for all), and
"product" = the propagation alone from what the UNet pass kept. Ratios > 1 mean faster than the authors'.
Medians over interleaved repeats; the machine's load average is recorded.

    python benchmarks/bench_diffsegmenter.py [--sizes 32 64] [--repeats 5] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from authors_diffusion import ds_attention_forward, ds_self_attention_product  # noqa: E402

from weakseg.backbones.attention import LayerCapture, install_capture  # noqa: E402
from weakseg.bench import machine_facts  # noqa: E402
from weakseg.io import write_text  # noqa: E402
from weakseg.methods.diffsegmenter import propagate_fused, propagate_reference  # noqa: E402

LAYERS, HEADS, DIM = 5, 8, 320  # SD 1.5 at 64x64: down_blocks.0 x 2 + up_blocks.3 x 3, 8 heads of 40
PATTERN = "blocks.*.attn1"


class SelfLayers(torch.nn.Module, AttentionMixin):
    """Five diffusers self-attention layers named blocks.<i>.attn1 (what the capture matches)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn1": Attention(DIM, heads=HEADS, dim_head=DIM // HEADS)})
                                          for _ in range(LAYERS))

    def forward(self, hs):
        return [b["attn1"](h) for b, h in zip(self.blocks, hs)]


def authors_stage(layers: SelfLayers, hs, x, res: int):
    """The authors' forward of each layer (ptp_utils) + their aggregation and product."""
    stored, outs = [], []
    for b, h in zip(layers.blocks, hs):
        a = b["attn1"]
        q, k, v = a.to_q(h), a.to_k(h), a.to_v(h)
        B, P, _ = q.shape
        q, k, v = (t.view(B, P, HEADS, -1).permute(0, 2, 1, 3).reshape(B * HEADS, P, -1) for t in (q, k, v))
        out = ds_attention_forward(q, k, v, a.scale, stored)
        out = out.view(B, HEADS, P, -1).permute(0, 2, 1, 3).reshape(B, P, -1)
        outs.append(a.to_out[1](a.to_out[0](out)))
    return outs, stored, ds_self_attention_product(stored, 1, res, x)


def weakseg_stage(layers: SelfLayers, hs, x, res: int, path: str):
    spec = (LayerCapture(PATTERN, store="qk") if path == "fused"
            else LayerCapture(PATTERN, store="mean", group="resolution", reuse=True))
    with install_capture(layers, [spec], latent_hw=(res, res)) as store:
        outs = layers(hs)
    return outs, store, _weakseg_product(store, x, res, path)


def _weakseg_product(store, x, res, path):
    flat = x.reshape(1, -1)
    if path == "fused":
        m = propagate_fused([store.qk(n) for n in store.layers], flat)
    else:
        m = propagate_reference(store.resolution_mean("self", res), flat)
    return m.view(res, res)


def _median_ms(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]  # interleaved, rotating order
        for k in order:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def run(res: int, repeats: int) -> dict:
    P = res * res
    layers = SelfLayers().eval()
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(1, P, DIM, generator=g) for _ in range(LAYERS)]
    x = torch.rand(res, res, generator=g)  # the fused cross-attention map (weights x min-max maps)

    # correctness first: outputs of every layer and the product equal the authors'
    a_outs, a_store, a_m = authors_stage(layers, hs, x, res)
    a_bytes = sum(t.numel() * t.element_size() for t in a_store)
    checks, kept = {}, {}
    for path in ("reference", "fused"):
        outs, store, m = weakseg_stage(layers, hs, x, res, path)
        err_m = ((m - a_m).abs().max() / a_m.abs().max()).item()
        err_o = max(((o - ao).abs().max() / ao.abs().max()).item() for o, ao in zip(outs, a_outs))
        if not (err_m < 1e-5 and err_o < 1e-4):
            raise AssertionError(f"P={P} {path}: product rel. error {err_m:.2e}, layer output rel. error {err_o:.2e}")
        checks[path] = {"product_rel_err": err_m, "output_rel_err": err_o}
        kept[path] = store.stored_bytes()
        del store
    del a_store

    stage = _median_ms({"authors": lambda: authors_stage(layers, hs, x, res),
                        "reference": lambda: weakseg_stage(layers, hs, x, res, "reference"),
                        "fused": lambda: weakseg_stage(layers, hs, x, res, "fused")}, repeats)
    # the propagation alone, from what each path kept after the UNet pass
    _, a_kept, _ = authors_stage(layers, hs, x, res)
    _, r_kept, _ = weakseg_stage(layers, hs, x, res, "reference")
    _, f_kept, _ = weakseg_stage(layers, hs, x, res, "fused")
    product = _median_ms({"authors": lambda: ds_self_attention_product(a_kept, 1, res, x),
                          "reference": lambda: _weakseg_product(r_kept, x, res, "reference"),
                          "fused": lambda: _weakseg_product(f_kept, x, res, "fused")}, repeats)
    del a_kept, r_kept, f_kept
    return {"P": P, "grid": f"{res}x{res}", "checks": checks,
            "kept_mib": {"authors": a_bytes / 2 ** 20, **{k: v / 2 ** 20 for k, v in kept.items()}},
            "stage_ms": stage, "product_ms": product,
            "stage_ratio": {k: stage["authors"] / stage[k] for k in ("reference", "fused")},
            "product_ratio": {k: product["authors"] / product[k] for k in ("reference", "fused")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64], help="latent sides (64 -> P = 4096)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [run(r, a.repeats) for r in a.sizes]
    head = ("| P | kept MiB authors / reference / fused | stage ms authors / reference / fused | stage ratio "
            "reference / fused | product ms authors / reference / fused | product ratio reference / fused |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        k, s, p = r["kept_mib"], r["stage_ms"], r["product_ms"]
        lines.append(f"| {r['P']} | {k['authors']:.0f} / {k['reference']:.0f} / {k['fused']:.1f} | "
                     f"{s['authors']:.0f} / {s['reference']:.0f} / {s['fused']:.0f} | "
                     f"{r['stage_ratio']['reference']:.2f}x / {r['stage_ratio']['fused']:.2f}x | "
                     f"{p['authors']:.1f} / {p['reference']:.1f} / {p['fused']:.1f} | "
                     f"{r['product_ratio']['reference']:.2f}x / {r['product_ratio']['fused']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    facts = machine_facts(["cpu"])
    print(facts)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"diffsegmenter_propagation_cpu_{facts['date'][:10]}"
        write_text(stem.with_suffix(".md"),
                   "# DiffSegmenter propagation vs the authors' code (CPU)\n\n"
                   + "\n".join(f"- {k}: {v}" for k, v in facts.items())
                   + "\n- verified first: every layer output and the product equal the authors' (relative "
                     "errors in the json)\n\n" + table + "\n")
        write_text(stem.with_suffix(".json"), json.dumps({"facts": facts, "rows": rows}, indent=2))
        print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
