from __future__ import annotations

import pytest
import torch

from benchmarks.drop_bias import drop_bias
from d2l_integrations.engine.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from tests.unit.engine.test_training import tiny_hypernet


def test_the_copy_writes_the_same_document_adapter_and_no_bias(tiny_base, tmp_path):
    net = tiny_hypernet(tiny_base).to(torch.bfloat16)
    for p in net.bias_B.values():  # a bias that would show if it were kept
        p.data.normal_()
    save_checkpoint(net, tmp_path / "src", data_summary={"steps": 3})
    drop_bias(tmp_path / "src", tmp_path / "dst")

    config, meta = read_checkpoint_config(tmp_path / "dst")
    assert not config.use_bias_lora
    assert meta["data_summary"]["steps"] == 3 and meta["data_summary"]["derived"]["from"] == net.checkpoint_id
    copy = load_checkpoint(tmp_path / "dst", tiny_base)
    assert copy.bias_factors() == {}
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    features = torch.randn(1, tiny_base.num_layers, 5, tiny_base.hidden_size, dtype=torch.bfloat16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = copy(features, mask), net.eval()(features, mask)
    for m in ours:
        for a, b in zip(ours[m], theirs[m]):
            torch.testing.assert_close(a, b)


def test_a_checkpoint_without_a_bias_is_refused(tiny_base, tmp_path):
    save_checkpoint(tiny_hypernet(tiny_base, use_bias_lora=False), tmp_path / "src")
    with pytest.raises(ValueError, match="no bias LoRA"):
        drop_bias(tmp_path / "src", tmp_path / "dst")
