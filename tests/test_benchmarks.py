"""benchmarks/bench_throughput.py and benchmarks/bench_data.py: the FLOP formulas against torch's own FLOP counter on
the real modules, and CPU smoke runs of both scripts' main() at tiny sizes (their JSON and table fields).
The official-code comparison (--reference-mae / --reference-moco) needs timm and checkouts: not tested here."""
import importlib
import json
import os
import sys
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_data  # noqa: E402
import bench_throughput as bt  # noqa: E402
import vit  # noqa: E402


def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 (not written yet, or half-written by someone else right now)
        return False


FORMULA_METHODS = [m for m in bt.METHOD_NAMES if importable(m)]
# Shrink each script's heads so that a step takes milliseconds; the formulas read the same flags.
TINY_ARGS = {"mae": "--decoder-embed-dim 32 --decoder-depth 1 --decoder-num-heads 2",
             "moco": "--moco-dim 16 --moco-mlp-dim 64",
             "mimco": "--decoder-embed-dim 32 --decoder-depth 1 --decoder-num-heads 2 --head-hidden-dim 32",
             "graft": "--moco-dim 16 --moco-mlp-dim 64"}


@pytest.fixture
def tiny_vit(monkeypatch):
    """A 2-block, 64-wide ViT registered as vit.MODELS['vit_bench'] (the scripts' --model choices read that dict)."""
    def vit_bench(cls=vit.VisionTransformer, **kw):
        return cls(**{"embed_dim": 64, "depth": 2, "num_heads": 2, **kw})
    monkeypatch.setitem(vit.MODELS, "vit_bench", vit_bench)
    return "vit_bench"


def count(fn):
    """Matrix-product FLOPs of fn() by torch's counter, the attention written out as its two products (the counter
    sees nothing inside the fused CPU kernel in torch 2.13-2.14: comparing that would test torch, not the formula)."""
    with bt.explicit_attention(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_explicit_attention_is_the_same_maths():
    """The written-out attention used for counting equals the fused kernel the models run."""
    torch.manual_seed(0)
    block, x = vit.Block(64, 4), torch.randn(3, 17, 64)
    fused = block(x)
    with bt.explicit_attention():
        written = block(x)
    assert torch.allclose(written, fused, atol=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


@pytest.mark.parametrize("n,d,heads", [(17, 64, 4), (50, 96, 3)])
def test_block_formula_matches_flop_counter(n, d, heads):
    torch.manual_seed(0)
    block = vit.Block(d, heads)
    x = torch.randn(3, n, d)
    assert count(lambda: block(x)) == 3 * bt.block_flops(n, d) == 3 * (24 * n * d * d + 4 * n * n * d)


def test_one_block_vit_formula_matches_flop_counter():
    """Patch embedding + one block, on all patches and on a kept subset (MAE / MiCL's ids_keep)."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2)
    cfg = {"L": 64, "patch_size": 4, "D": 64, "depth": 1}
    x = torch.randn(2, 3, 32, 32)
    assert count(lambda: model.forward_features(x)) == 2 * sum(bt.encoder_flops(cfg, 1 + 64))
    ids_keep = torch.argsort(torch.rand(2, 64), dim=1)[:, :16]
    assert count(lambda: model.forward_features(x, ids_keep)) == 2 * sum(bt.encoder_flops(cfg, 1 + 16))


VARIANTS = {"mimco": "--patch-negatives batch", "graft": "--freeze-lower --graft-depth 1"}  # the formulas' branches


@pytest.mark.parametrize("method,extra", [(m, "") for m in FORMULA_METHODS]
                         + [(m, a) for m, a in VARIANTS.items() if m in FORMULA_METHODS])
def test_method_formula_matches_flop_counter(method, extra, tiny_vit):
    """Each method's written-out forward and training FLOPs = torch's count on the method's real module (forward, and
    forward + backward), the attention written out as two matrix products while counting."""
    enc = vit.MODELS[tiny_vit](img_size=32, patch_size=4)
    method_args = {m: a.split() for m, a in TINY_ARGS.items()}
    method_args[method] = method_args.get(method, []) + extra.split()
    cfg = {"model": tiny_vit, "img_size": 32, "patch_size": 4, "D": 64, "depth": 2, "heads": 2,
           "L": enc.patch_embed.num_patches, "method_args": method_args}
    b = bt.BUILDERS[method](importlib.import_module(method), cfg, 6, torch.device("cpu"),
                            torch.Generator().manual_seed(0))
    model = b["model"].train()
    counted = bt.counted_flops(lambda: b["loss"](model, 0))
    assert counted == {k: int(v) for k, v in b["flops"].items()}
    assert b["flops"]["forward"] < b["flops"]["train"] <= 3 * b["flops"]["forward"]


def test_bench_throughput_cpu_smoke(tmp_path, tiny_vit, capsys):
    out = tmp_path / "throughput.json"
    report = bt.main(["--device", "cpu", "--models", tiny_vit, "--img-size", "32", "--patch-size", "4",
                      "--batch-size", "4", "--steps", "2", "--warmup", "1", "--peak-tflops", "1.0", "--threads", "1",
                      *[x for m, a in TINY_ARGS.items() for x in ("--method-args", f"{m}={a}")], "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    prov = data["provenance"]
    assert prov["date"] and "bench_throughput.py" in prov["command"] and "--device cpu" in prov["command"]
    assert prov["device"].startswith("CPU") and prov["torch"] == torch.__version__ and prov["peak_tflops"] == 1.0
    for line in ("# date:", "# device:", "# torch:", "# command:", "| method | code | model |"):
        assert line in printed
    rows = {r["method"]: r for r in data["results"]}
    for m in FORMULA_METHODS:
        r = rows[m]
        assert r["impl"] == "ours" and r["precision"] == "fp32" and r["compile"] is False and r["batch"] == 4
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["steps"] == 2 and r["peak_mem_gb"] is None
        assert r["mfu"] is not None  # given on a CPU because --peak-tflops was passed
    for m in bt.METHOD_NAMES:  # every method is either timed or skipped with a reason, never silently missing
        assert m in rows or any(s["method"] == m and "not importable" in s["why"] for s in data["skipped"])
    assert data["ratios"] == []  # no --reference-*


def test_ratio_table():
    base = {"model": "vit_base", "batch": 128, "img_size": 224, "patch_size": 16, "precision": "bf16", "step_ms": 1.0,
            "peak_mem_gb": None, "tflops_per_s": None, "mfu": None}
    results = [{**base, "method": "mae", "impl": "ours", "compile": False, "img_per_s": 300.0},
               {**base, "method": "mae", "impl": "ours", "compile": True, "img_per_s": 450.0},
               {**base, "method": "mae", "impl": "official", "compile": False, "img_per_s": 150.0, "precision": "fp16"}]
    ratios = bt.ratios(results)
    assert len(ratios) == 1 and ratios[0]["ratio"] == 2.0 and ratios[0]["ratio_compiled"] == 3.0
    table = bt.markdown_tables({"results": results, "skipped": [], "ratios": ratios})
    assert "| mae | vit_base | 128 | 300.0 | 450.0 | 150.0 | 2.00 | 3.00 |" in table


def test_bench_data_cpu_smoke(image_root, tmp_path, capsys):
    out = tmp_path / "data.json"
    pipelines = "mae,moco,mae-decode-on-device,mae-in-memory,moco-in-memory"
    with warnings.catch_warnings(record=True) as caught:  # torchvision.io's decoders are deprecated since 0.29
        warnings.simplefilter("always", DeprecationWarning)
        report = bench_data.main(["--data", image_root, "--workers", "0", "--seconds", "0.5", "--batch-size", "16",
                                  "--img-size", "32", "--device", "cpu", "--pipelines", pipelines, "--json", str(out)])
    assert not [str(w.message)[:120] for w in caught if issubclass(w.category, DeprecationWarning)]
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    prov = data["provenance"]
    assert prov["date"] and "bench_data.py" in prov["command"] and prov["torch"] == torch.__version__ and prov["device"]
    for line in ("# date:", "# device:", "# torch:", "# command:", "| pipeline | decode | workers |"):
        assert line in printed
    rows = {r["pipeline"]: r for r in data["results"]}
    expected = ["mae", "mae-decode-on-device", "mae-in-memory", "moco", "moco-in-memory"]
    for p in expected:
        r = rows[p]
        assert r["workers"] == 0 and r["batch"] == 16 and r["img_size"] == 32 and r["images_in_split"] == 160
        assert r["img_per_s"] > 0 and r["images"] >= 16 and r["images"] % 16 == 0 and r["first_batch_s"] >= 0
    assert rows["moco-in-memory"]["decode_s"] > 0
    assert rows["mae-decode-on-device"]["decode"].startswith(("PIL on the CPU", "torchcodec decode_jpeg on cpu"))
    assert data["ratios"]["moco-in-memory / moco with 0 workers"] == round(
        rows["moco-in-memory"]["img_per_s"] / rows["moco"]["img_per_s"], 2)
