"""timm's Mlp in our blocks: same parameter names as the checkpoints always had, same function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdamil.models import create_model


def test_mlp_parameters_keep_their_checkpoint_names_and_function():
    model = create_model({"name": "tdamil", "dim": 16, "depth": 2, "num_heads": 2}, in_dim=8, num_classes=2)
    state = model.state_dict()
    mlp_keys = {k for k in state if ".mlp." in k or k.startswith("decoder.")}
    expected = {f"blocks.{i}.mlp.{fc}.{p}" for i in range(2) for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    assert expected <= mlp_keys
    assert {k for k in mlp_keys if k.startswith("decoder.")} in (
        {"decoder.fc1.weight", "decoder.fc2.weight"},  # decoder_bias false: 0 maps to 0
        {"decoder.fc1.weight", "decoder.fc1.bias", "decoder.fc2.weight", "decoder.fc2.bias"},
    )
    assert mlp_keys - expected - {k for k in mlp_keys if k.startswith("decoder.")} == set()
    # a state dict saved under these names loads strictly into a fresh model
    fresh = create_model({"name": "tdamil", "dim": 16, "depth": 2, "num_heads": 2}, in_dim=8, num_classes=2)
    fresh.load_state_dict(state, strict=True)
    mlp = model.blocks[0].mlp.eval()
    x = torch.randn(3, 16)
    ref = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), ref)
