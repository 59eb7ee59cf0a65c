"""Every MIL model: the shared interface, configs, padding/masking, determinism, bag sizes."""

from __future__ import annotations

import pytest
import torch

from tdamil.config import ConfigError, to_dict
from tdamil.models import MILOutput, MODEL_NAMES, create_model, model_config_from_dict

IN_DIM, CLASSES = 10, 3
SMALL = {
    "tdamil": {"dim": 16, "num_heads": 4},
    "transformer_mil": {"dim": 16, "num_heads": 4},
    "transmil": {"dim": 16, "num_heads": 4},
    "abmil": {"dim": 16, "attn_dim": 8},
    "gated_abmil": {"dim": 16, "attn_dim": 8},
    "mean_pool": {"dim": 16},
}
WITH_SCORES = {"tdamil", "abmil", "gated_abmil"}


def build(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model({"name": name, **SMALL[name], **extra}, in_dim=IN_DIM, num_classes=CLASSES).eval()


def test_model_names_match_the_interface():
    assert MODEL_NAMES == ("tdamil", "transformer_mil", "transmil", "abmil", "gated_abmil", "mean_pool")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_from_config_dict_and_round_trips(name):
    cfg = model_config_from_dict({"name": name, **SMALL[name]}, source="x.yaml: model")
    assert cfg.name == name
    assert model_config_from_dict(to_dict(cfg)) == cfg
    model = create_model(cfg, in_dim=IN_DIM, num_classes=CLASSES)
    out = model(torch.randn(2, 5, IN_DIM))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (2, CLASSES)
    if name in WITH_SCORES:
        assert out.scores.shape == (2, 5)
    else:
        assert out.scores is None
    # Defaults build too (dim 512 etc.).
    assert create_model({"name": name}, in_dim=IN_DIM, num_classes=2)(torch.randn(1, 3, IN_DIM)).logits.shape == (1, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unknown_key_raises_config_error_naming_it(name):
    with pytest.raises(ConfigError) as err:
        model_config_from_dict({"name": name, "dimm": 8}, source="site_a.yaml: model")
    assert "site_a.yaml" in str(err.value) and "dimm" in str(err.value) and "'dim'" in str(err.value)


def test_bad_name_and_types_raise_config_error():
    with pytest.raises(ConfigError, match="Did you mean 'tdamil'"):
        model_config_from_dict({"name": "tda_mil"})
    with pytest.raises(ConfigError, match="'name' is required"):
        model_config_from_dict({"dim": 8})
    with pytest.raises(ConfigError, match="'depth' must be a whole number"):
        model_config_from_dict({"name": "tdamil", "depth": "two"})
    with pytest.raises(ConfigError, match="attention"):
        model_config_from_dict({"name": "transmil", "attention": "flash"})
    with pytest.raises(ConfigError, match="mapping"):
        model_config_from_dict(["tdamil"])  # type: ignore[arg-type]


def test_transformer_mil_is_the_ablation_without_top_down():
    plain = build("transformer_mil")
    names = {n for n, _ in plain.named_parameters()}
    assert not any("task_token" in n or "channel_matrix" in n or n.startswith("decoder") for n in names)
    full = {n for n, _ in build("tdamil").named_parameters()}
    assert names < full


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padded_batch_equals_each_bag_alone(name):
    model = build(name)
    torch.manual_seed(5)
    sizes = [7, 3, 12]
    bags = [torch.randn(n, IN_DIM) for n in sizes]
    x = torch.full((3, 12, IN_DIM), 1e3)  # large garbage in the padding: must not leak
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    with torch.no_grad():
        batched = model(x, mask)
        alone = [model(bag.unsqueeze(0)) for bag in bags]
    for i, (n, out) in enumerate(zip(sizes, alone)):
        torch.testing.assert_close(batched.logits[i], out.logits[0], atol=1e-5, rtol=1e-4)
        if name in WITH_SCORES:
            torch.testing.assert_close(batched.scores[i, :n], out.scores[0], atol=1e-5, rtol=1e-4)
            assert torch.all(batched.scores[i, n:] == 0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_model_same_output(name):
    x = torch.randn(2, 9, IN_DIM)
    a, b, c = build(name, seed=1), build(name, seed=1), build(name, seed=2)
    with torch.no_grad():
        oa, ob, oc = a(x), b(x), c(x)
    assert torch.equal(oa.logits, ob.logits)
    assert not torch.allclose(oa.logits, oc.logits)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_single_patch_bag(name):
    model = build(name)
    out = model(torch.randn(1, 1, IN_DIM))
    assert out.logits.shape == (1, CLASSES) and torch.isfinite(out.logits).all()
    if name in ("abmil", "gated_abmil"):
        torch.testing.assert_close(out.scores, torch.ones(1, 1))
    out.logits.sum().backward()  # trainable on the smallest bag too


@pytest.mark.parametrize("name", ["tdamil", "transmil", "gated_abmil"])
def test_large_bag_runs_without_cap(name):
    """20k patches at small width: nothing caps, crops or samples the bag."""
    model = build(name, **({"num_heads": 1} if "num_heads" in SMALL[name] else {}))
    x = torch.randn(1, 20_000, IN_DIM)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out.logits).all()
    if out.scores is not None:
        assert out.scores.shape == (1, 20_000)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_input_gets_a_clear_error(name):
    model = build(name)
    with pytest.raises(ValueError, match="in_dim=10"):
        model(torch.randn(1, 4, IN_DIM + 1))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(1, 0, IN_DIM))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(1, 4, IN_DIM), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one real patch"):
        model(torch.randn(2, 4, IN_DIM), torch.tensor([[True] * 4, [False] * 4]))


def test_single_unbatched_bag_is_accepted():
    model = build("tdamil")
    x = torch.randn(6, IN_DIM)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x.unsqueeze(0)).logits)


def test_create_model_checks_its_arguments():
    with pytest.raises(ValueError, match="in_dim"):
        create_model({"name": "abmil"}, in_dim=0, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        create_model({"name": "abmil"}, in_dim=4, num_classes=0)
    with pytest.raises(ConfigError, match="unsupported model config"):
        create_model(object(), in_dim=4, num_classes=2)  # type: ignore[arg-type]


def test_tdamil_variants_keep_padding_invariance():
    """The optional TDA-MIL fields (input LayerNorm, separate step-II weights, CLS selection)."""
    model = build("tdamil", input_norm=True, share_weights=False, select_cls=True, decoder_bias=True)
    torch.manual_seed(6)
    bag = torch.randn(5, IN_DIM)
    x = torch.cat([bag, torch.randn(4, IN_DIM)]).unsqueeze(0)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    with torch.no_grad():
        padded, alone = model(x, mask), model(bag.unsqueeze(0))
        trace = model.forward_trace(bag.unsqueeze(0))
    torch.testing.assert_close(padded.logits, alone.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.scores[:, :5], alone.scores, atol=1e-5, rtol=1e-4)
    assert trace.cls_score is not None and 0 <= float(trace.cls_score) <= 1
    assert "blocks_td.0.attn.v.weight" in model.state_dict()
