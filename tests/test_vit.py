"""vit.py: interface, state-dict names, parameter count, sin-cos layouts, and the checkpoint loader."""
import json
import os

import pytest
import torch

import vit

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny(**kw):
    return vit.VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, **kw})


def test_shapes_and_factories():
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 1 + 16, 64)
    assert m(x).shape == (2, 64)  # CLS through an Identity head
    assert tiny(num_classes=10)(x).shape == (2, 10)
    for name, (D, depth, heads, p) in {"vit_tiny": (192, 12, 3, 16), "vit_small": (384, 12, 6, 16),
                                       "vit_base": (768, 12, 12, 16), "vit_large": (1024, 24, 16, 16),
                                       "vit_huge": (1280, 32, 16, 14)}.items():
        with torch.device("meta"):  # shapes only, no memory
            m = vit.MODELS[name]()
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.patch_size) == (D, depth, heads, p)
    with torch.device("meta"):
        m = vit.vit_small(num_heads=12, img_size=96, patch_size=8)
    assert m.blocks[0].attn.num_heads == 12 and m.patch_embed.num_patches == 144


def test_vit_base_parameter_count():
    # timm's vit_base_patch16_224 has 86,567,656 parameters with its 1000-class head (pos_embed included).
    with torch.device("meta"):
        assert sum(p.numel() for p in vit.vit_base(num_classes=1000).parameters()) == 86_567_656
        m = vit.vit_base()
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 86_567_656 - 769_000 - 151_296
    assert not m.pos_embed.requires_grad  # fixed sin-cos


def test_state_dict_names_match_timm():
    """Keys and shapes equal timm's VisionTransformer of the same size (recorded from timm into the fixture)."""
    ref = json.load(open(os.path.join(FIX, "timm_vit_keys.json")))
    for num_classes, key in ((0, "num_classes_0"), (10, "num_classes_10")):
        ours = {k: list(v.shape) for k, v in tiny(num_classes=num_classes).state_dict().items()}
        assert ours == {k: s for k, s in ref[key]}


def test_sincos_layouts_match_official():
    mae = torch.load(os.path.join(FIX, "mae_official.pt"), weights_only=True)
    moco = torch.load(os.path.join(FIX, "moco_official.pt"), weights_only=True)
    assert torch.allclose(vit.sincos_pos_embed(64, 4, "mae"), mae["pos_embed_mae_layout_64_4x4"], atol=1e-6)
    assert torch.allclose(vit.sincos_pos_embed(64, 4, "moco"), moco["pos_embed_moco_layout_64_4x4"].reshape(17, 64),
                          atol=1e-6)
    assert not torch.allclose(vit.sincos_pos_embed(64, 4, "mae"), vit.sincos_pos_embed(64, 4, "moco"))


def test_ids_keep_contract():
    """Keeping all patches in order equals the full forward; a subset equals running on those tokens by hand."""
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    full = m.forward_features(x)
    assert torch.allclose(m.forward_features(x, torch.arange(16).expand(3, -1)), full, atol=1e-6)
    ids = torch.rand(3, 16).argsort(1)[:, :5]  # (B, K)
    out = m.forward_features(x, ids)
    assert out.shape == (3, 6, 64)
    tokens = m.patch_embed(x) + m.pos_embed[:, 1:]
    for b in range(3):
        seq = torch.cat([m.cls_token[0] + m.pos_embed[0, :1], tokens[b, ids[b]]])[None]
        for blk in m.blocks:
            seq = blk(seq)
        assert torch.allclose(m.norm(seq)[0], out[b], atol=1e-5)


def test_intermediates():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    out, attns, outs = m.forward_features(x, return_intermediates=True)
    assert torch.allclose(out, m.forward_features(x), atol=1e-5)  # materialized attention == SDPA
    assert len(attns) == len(outs) == 2 and attns[0].shape == (2, 4, 17, 17) and outs[1].shape == (2, 17, 64)
    assert torch.allclose(attns[0].sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    assert torch.allclose(m.norm(outs[-1]), out, atol=1e-5)


def test_load_official_mae_checkpoint(tmp_path):
    """The official MAE file (encoder + decoder) loads into an encoder; the features equal the official encoder's."""
    fx = torch.load(os.path.join(FIX, "mae_official.pt"), weights_only=True)
    path = tmp_path / "mae.pth"
    torch.save({"model": fx["state_dict"]}, path)
    m = tiny().double()  # the fixture is float64 (fixtures/make_fixtures.py)
    skipped = vit.load_pretrained(m, str(path), verbose=False)
    assert skipped and all(k.startswith(("decoder", "mask_token")) for k in skipped)
    ids_keep = fx["noise"].argsort(1)[:, :4]  # the official masking keeps the 4 lowest-noise patches of 16
    assert (m.forward_features(fx["imgs"], ids_keep) - fx["latent"]).abs().max().item() < 1e-10


def test_load_official_moco_checkpoint_and_prefixes():
    fx = torch.load(os.path.join(FIX, "moco_official.pt"), weights_only=True)
    m = tiny().double()  # the fixture is float64 but for the fixed pos_embed, which both sides keep in float32 values
    skipped = vit.load_pretrained(m, {"state_dict": fx["state_dict"]}, verbose=False)
    base = {k[len("module.base_encoder."):]: v for k, v in fx["state_dict"].items()
            if k.startswith("module.base_encoder.")}
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k].double()), k  # the base encoder, not the momentum encoder
    assert any("momentum_encoder" in k for k in skipped) and any("predictor" in k for k in skipped)
    # DDP / torch.compile / wrapper prefixes are stripped
    sd = {"module._orig_mod." + k: v + 1 for k, v in base.items() if not k.startswith("head.")}
    vit.load_pretrained(m, sd, verbose=False)
    assert torch.equal(m.norm.weight, base["norm.weight"].double() + 1)


def test_load_resizes_pos_embed_and_rejects_other_models():
    src = tiny()
    dst = tiny(img_size=48)
    vit.load_pretrained(dst, src.state_dict(), verbose=False)
    assert dst.pos_embed.shape == (1, 37, 64) and torch.equal(dst.cls_token, src.cls_token)
    assert torch.allclose(dst.pos_embed[0, 0], src.pos_embed[0, 0])
    with pytest.raises(ValueError, match="another model"):
        vit.load_pretrained(tiny(embed_dim=128), src.state_dict(), verbose=False)
    with pytest.raises(ValueError, match="missing"):
        vit.load_pretrained(tiny(depth=3), src.state_dict(), verbose=False)
    with pytest.raises(ValueError, match="not found"):
        vit.load_pretrained(tiny(), "/nonexistent/file.pth")


def test_encoder_roundtrip_through_file(tmp_path):
    src, dst = tiny(), tiny()
    torch.save(src.state_dict(), tmp_path / "encoder.pt")
    vit.load_pretrained(dst, str(tmp_path / "encoder.pt"), verbose=False)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src.eval().forward_features(x), dst.eval().forward_features(x))


def test_load_rejects_deeper_checkpoint():
    with pytest.raises(ValueError, match="deeper"):
        vit.load_pretrained(tiny(depth=1), tiny(depth=2).state_dict(), verbose=False)


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets
    import mae

    def offline(*a, **kw):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(mae.StopRun, match="could not download"):
        mae.main(["--data", "cifar10", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])


def test_vit_cpu_size():
    """The CPU table's encoder (experiments/table.py --preset cpu): 128-d x 6 blocks x 4 heads, 17 tokens at 32 px."""
    m = vit.MODELS["vit_cpu"](img_size=32, patch_size=8)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (128, 6, 4)
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 128)
