"""Encoder registry: full architectures give the documented dims (meta device, no memory), the
same families save and strictly reload from a local file, bad files give clear errors.
"""

from __future__ import annotations

import pytest
import torch

from tdamil.atomic import sha256_file
from tdamil.wsi.encoders import (
    ENCODER_NAMES,
    EncoderError,
    build_encoder,
    get_spec,
    load_encoder,
)

DIMS = {"uni": 1024, "uni2_h": 1536, "virchow2": 2560, "hoptimus0": 1536, "gigapath": 1536, "resnet50_trunc": 1024, "tiny": 64}
PARAMS_M = {"uni": 303, "uni2_h": 681, "virchow2": 631, "hoptimus0": 1134, "gigapath": 1134}


@pytest.mark.parametrize("name", sorted(DIMS))
def test_full_architecture_output_dim_on_meta_device(name):
    with torch.device("meta"):
        enc = build_encoder(name)
        out = enc(torch.empty(3, 3, 512, 512, dtype=torch.uint8))
    assert tuple(out.shape) == (3, DIMS[name]) == (3, get_spec(name).dim)
    if name in PARAMS_M:  # the published model sizes: the real architecture, not a look-alike
        n = sum(p.numel() for p in enc.parameters()) / 1e6
        assert abs(n - PARAMS_M[name]) / PARAMS_M[name] < 0.01, n


@pytest.mark.parametrize("name, overrides", [
    ("uni", {"depth": 1}), ("uni2_h", {"depth": 1}), ("virchow2", {"depth": 1}),
    ("hoptimus0", {"depth": 1}), ("gigapath", {"depth": 1}), ("resnet50_trunc", {}),
])
def test_save_and_strict_reload_from_a_local_file(tmp_path, name, overrides):
    """One-block copies of the giant ViTs (same layer types and widths), full ResNet50-trunc."""
    torch.manual_seed(0)
    enc = build_encoder(name, **overrides).eval()
    path = tmp_path / f"{name}.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.backbone.state_dict().items()}}, path)
    loaded = load_encoder(name, path, **overrides)
    assert loaded.weights_sha256 == sha256_file(path) and len(loaded.weights_sha256) == 64
    assert not loaded.training
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)
        assert loaded(x).shape == (1, DIMS[name])


def test_resnet50_trunc_accepts_a_full_imagenet_state_dict(tmp_path):
    import timm

    full = timm.create_model("resnet50", pretrained=False)  # has layer4 and fc, like torchvision's file
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    enc = load_encoder("resnet50_trunc", path)
    torch.testing.assert_close(enc.backbone.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def test_wrong_missing_or_absent_weights_are_clear_errors(tmp_path):
    small = build_encoder("uni", depth=1)
    path = tmp_path / "uni_one_block.bin"
    torch.save(small.backbone.state_dict(), path)
    with pytest.raises(EncoderError, match=r"uni_one_block\.bin: these weights do not fit encoder 'gigapath'.*other shapes.*blocks"):
        load_encoder("gigapath", path, depth=1)
    with pytest.raises(EncoderError, match=r"do not fit encoder 'uni'.*missing \(e\.g\. blocks\.1"):
        load_encoder("uni", path, depth=2)
    with pytest.raises(EncoderError, match=r"nope\.bin: weights file for encoder 'uni' not found.*extraction\.weights"):
        load_encoder("uni", tmp_path / "nope.bin")
    with pytest.raises(EncoderError, match=r"needs a local weights file.*never downloads"):
        load_encoder("uni", None)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(EncoderError, match=r"junk\.bin: cannot read weights"):
        load_encoder("uni", junk)
    with pytest.raises(EncoderError, match=r"unknown encoder 'unii'.*uni"):
        get_spec("unii")


def test_tiny_encoder_is_deterministic_and_sees_the_pixels():
    a, b = load_encoder("tiny"), load_encoder("tiny")
    x = torch.randint(0, 256, (4, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fa, fb = a(x), b(x)
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)
        assert fa.shape == (4, 64)
        assert (fa[0] - fa[1]).abs().max() > 1e-3  # different patches, different features
        assert (a(255 - x) - fa).abs().max() > 1e-2
    assert a.weights_sha256 == "none"


def test_each_encoder_has_its_own_normalisation_and_input_size():
    assert get_spec("hoptimus0").mean != get_spec("uni").mean
    assert get_spec("conch").input_size == 448
    gp = build_encoder("resnet50_trunc")
    x = torch.full((1, 3, 512, 512), 255, dtype=torch.uint8)
    pre = gp.preprocess(x)
    assert pre.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pre[0, :, 0, 0], (1 - torch.tensor(get_spec("uni").mean)) / torch.tensor(get_spec("uni").std))
    assert {"uni", "uni2_h", "virchow2", "hoptimus0", "gigapath", "resnet50_trunc", "conch", "phikon_v2", "tiny"} == set(ENCODER_NAMES)


def test_no_network_code_path():
    """The module never calls a hub: no pretrained=True, no hf_hub / urllib in its source."""
    import inspect

    import tdamil.wsi.encoders as m

    src = inspect.getsource(m)
    assert "pretrained=True" not in src and "hf_hub" not in src and "urllib" not in src and "requests" not in src
