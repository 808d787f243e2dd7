"""Checkpoint folders (save/load/compatibility) and the restricted SakanaAI unpickler, without the fixture."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    compute_checkpoint_id,
    import_sakana_checkpoint,
    load_checkpoint,
    load_internalizer,
    load_sakana_state_dict,
    sakana_config,
    sakana_to_ours,
    save_checkpoint,
)
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.hypernetwork import Hypernetwork
from d2l_integrations.engine.internalizer import Internalizer
from d2l_integrations.errors import (
    CheckpointNotFoundError,
    ExportError,
    IncompatibleCheckpointError,
    UntrustedCheckpointError,
)

LAYERS, HIDDEN, INTERMEDIATE = 2, 16, 32


def tiny_config(**overrides: Any) -> HypernetworkConfig:
    settings: dict[str, Any] = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, module_dims=(("down_proj", INTERMEDIATE, HIDDEN),), rank=2,
        latent_size=8, num_latents=3, num_blocks=1, num_heads=4, num_kv_heads=2, head_dim=4,
        base_model="tiny", base_model_revision="rev-1",
    )
    return HypernetworkConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def base() -> BaseModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return BaseModel(model=LlamaForCausalLM(config).eval(), tokenizer=None, name="tiny", revision="rev-1")


@pytest.fixture()
def net() -> Hypernetwork:
    torch.manual_seed(3)
    net = Hypernetwork(tiny_config())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_save_load_round_trip(tmp_path: Path, net: Hypernetwork, base: BaseModel) -> None:
    folder = save_checkpoint(net, tmp_path / "ckpt", data_summary={"documents": 3}, eval_table={"qa_f1": 0.5})
    document = json.loads((folder / CONFIG_NAME).read_text())
    assert document["hypernetwork"] == net.config.to_dict()
    meta = document["metadata"]
    assert meta["checkpoint_id"] == net.checkpoint_id == compute_checkpoint_id(net.state_dict(), net.config)
    assert (meta["base_model"], meta["base_model_revision"]) == ("tiny", "rev-1")
    assert meta["data_summary"] == {"documents": 3} and meta["eval"] == {"qa_f1": 0.5}
    assert meta["d2l_integrations_version"]
    loaded = load_checkpoint(folder, base)
    assert loaded.config == net.config and loaded.checkpoint_id == net.checkpoint_id
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    features, mask = torch.randn(2, LAYERS, 5, HIDDEN), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    with torch.inference_mode():
        for module, (A, B) in net(features, mask).items():
            got_A, got_B = loaded(features, mask)[module]
            assert torch.equal(got_A, A) and torch.equal(got_B, B)


def test_load_internalizer_reads_the_metadata(tmp_path: Path, net: Hypernetwork, base: BaseModel) -> None:
    folder = save_checkpoint(net, tmp_path / "ckpt", eval_table={"qa_f1": 0.9}, prefer_over_distill=True)
    internalizer = load_internalizer(folder, base, max_batch_size=3)
    assert isinstance(internalizer, Internalizer)
    assert (internalizer.name, internalizer.checkpoint_id, internalizer.max_batch_size) == ("hypernetwork", net.checkpoint_id, 3)
    assert internalizer.prefer_over_distill and internalizer.metadata["eval"] == {"qa_f1": 0.9}
    document = json.loads((folder / CONFIG_NAME).read_text())
    assert document["hypernetwork"]["base_model"] == "tiny"  # what D2LEngine's shipped-checkpoint lookup reads
    assert not load_internalizer(save_checkpoint(net, tmp_path / "other"), base).prefer_over_distill
    per_device = save_checkpoint(net, tmp_path / "per_device", prefer_over_distill={"cpu": True, "cuda": False})
    assert load_internalizer(per_device, base).prefer_over_distill == {"cpu": True, "cuda": False}


def test_checkpoint_id_follows_the_weights(net: Hypernetwork) -> None:
    first = compute_checkpoint_id(net.state_dict(), net.config)
    assert first == compute_checkpoint_id(net.state_dict(), net.config) and first.startswith("d2l-")
    with torch.no_grad():
        net.head.weight[0, 0, 0, 0] += 1
    assert compute_checkpoint_id(net.state_dict(), net.config) != first


def test_save_refuses_a_non_empty_folder(tmp_path: Path, net: Hypernetwork) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="overwrite=True"):
        save_checkpoint(net, tmp_path / "ckpt")
    save_checkpoint(net, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="save_checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_checkpoint_for_another_base_is_refused(tmp_path: Path, net: Hypernetwork, base: BaseModel) -> None:
    net.config = tiny_config(base_model="org/other-model", base_model_revision="rev-9")
    folder = save_checkpoint(net, tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpointError, match=r"'org/other-model'.*'tiny'") as info:
        load_checkpoint(folder, base)
    assert "allow_other_base=True" in str(info.value)
    assert load_checkpoint(folder, base, allow_other_base=True).config.base_model == "org/other-model"
    assert load_checkpoint(folder).config.base_model == "org/other-model"  # no base, no check


def test_same_revision_under_another_name_is_accepted(tmp_path: Path, net: Hypernetwork, base: BaseModel) -> None:
    net.config = tiny_config(base_model="/some/folder/tiny", base_model_revision="rev-1")
    assert load_checkpoint(save_checkpoint(net, tmp_path / "ckpt"), base).config.base_model == "/some/folder/tiny"


def test_shape_mismatch_is_refused_even_when_allowed(tmp_path: Path, base: BaseModel) -> None:
    folder = save_checkpoint(Hypernetwork(tiny_config(num_layers=3)), tmp_path / "ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="layers, hidden size"):
        load_checkpoint(folder, base, allow_other_base=True)


def test_damaged_checkpoint_names_the_keys(tmp_path: Path, net: Hypernetwork) -> None:
    from safetensors.torch import load_file, save_file

    folder = save_checkpoint(net, tmp_path / "ckpt")
    state = load_file(str(folder / WEIGHTS_NAME))
    del state["head.weight"]
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(IncompatibleCheckpointError, match=r"missing keys \['head.weight'\]"):
        load_checkpoint(folder)


# ----------------------------------------------------------------------------- SakanaAI pickles


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_untrusted_objects_in_a_pickle_are_refused(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"head.weight": torch.zeros(2), "when": datetime.date(2026, 1, 1)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UntrustedCheckpointError, match=r"datetime\.date.*trust_pickle=True"):
        import_sakana_checkpoint(path)
    state = load_sakana_state_dict(path, trust_pickle=True)  # full pickle: loads, but it is no D2L checkpoint
    assert state["when"] == datetime.date(2026, 1, 1)
    with pytest.raises(IncompatibleCheckpointError, match="hypernet_config"):
        import_sakana_checkpoint(path, trust_pickle=True)


def test_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(IncompatibleCheckpointError, match="not a readable torch checkpoint"):
        import_sakana_checkpoint(path)


def test_incomplete_hypernet_config_is_reported() -> None:
    state = sakana_like_state()
    del state["hypernet_config"].feature_sizes
    with pytest.raises(IncompatibleCheckpointError, match="lacks a field"):
        sakana_config(state)


def test_missing_pickle() -> None:
    with pytest.raises(CheckpointNotFoundError, match="pytorch_model.bin"):
        import_sakana_checkpoint("/nonexistent/pytorch_model.bin")


def sakana_like_state(**hypernet_overrides: Any) -> dict[str, Any]:
    """Their state-dict layout with attribute bags in place of their config classes."""
    lora = SimpleNamespace(r=2, lora_alpha=5.0, target_modules={"down_proj"}, use_dora=False, base_model_name_or_path="org/base")
    agg = SimpleNamespace(aggregator_type="perceiver", num_layers=LAYERS, n_latent_queries=3, num_blocks=1,
                          num_self_attn_per_block=0, shared_weights=False, layer_to_layer_ctx_encoder=True, per_rank_gen=True)
    hc = SimpleNamespace(latent_size=8, use_light_weight_lora=False, per_rank_gen=True, use_per_rank_bias=False, use_bias=True,
                         per_layer_processing=True, use_token_mixing=False, num_pre_head_layers=1, extra_modules=None,
                         base_hidden_size=HIDDEN, layer_indices=torch.arange(LAYERS),
                         feature_sizes=({"down_proj": INTERMEDIATE}, {"down_proj": HIDDEN}), lora_config=lora, aggregator_config=agg)
    for key, value in hypernet_overrides.items():
        setattr(hc, key, value)
    enc = SimpleNamespace(ctx_encoder_type="per_layer_activations", ctx_encoder_model_name_or_path=None, ctx_encoder_last_layer=None)
    prefix = "aggregator.perceiver.encoder.layers.0.self_attn"
    return {f"{prefix}.q_proj.weight": torch.zeros(2048, 8), f"{prefix}.k_proj.weight": torch.zeros(512, 8),
            "base_model_name_or_path": "org/base", "hypernet_config": hc, "ctx_encoder_args": enc}


def test_sakana_config_is_derived() -> None:
    config = sakana_config(sakana_like_state())
    assert config.module_dims == (("down_proj", INTERMEDIATE, HIDDEN),)
    assert (config.rank, config.lora_alpha, config.latent_size, config.num_latents, config.num_blocks) == (2, 5.0, 8, 3, 1)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (16, 4, 128)
    assert (config.base_model, config.context_format) == ("org/base", "chat")
    assert sakana_config(sakana_like_state(), base_model="local/base").base_model == "local/base"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"per_layer_processing": False}, "per_layer_processing=False"),
        ({"use_light_weight_lora": True}, "use_light_weight_lora=True"),
        ({"extra_modules": ["input_layernorm"]}, "extra_modules"),
        ({"layer_indices": torch.tensor([0])}, "subset of layers"),
    ],
)
def test_unsupported_sakana_architectures_are_refused(override: dict[str, Any], message: str) -> None:
    with pytest.raises(IncompatibleCheckpointError, match=message):
        sakana_config(sakana_like_state(**override))


def test_unsupported_aggregator_is_refused() -> None:
    state = sakana_like_state()
    state["hypernet_config"].aggregator_config.aggregator_type = "pooler"
    with pytest.raises(IncompatibleCheckpointError, match="aggregator_type='pooler'"):
        sakana_config(state)


def test_key_mapping_renames_and_reshapes() -> None:
    ours = sakana_to_ours({
        "aggregator.perceiver.encoder.latents_q": torch.zeros(3, 8),
        "layers.0.layers.1.bias": torch.arange(6.0).reshape(1, 2, 1, 1, 3),
        "layers.0.layers.0.bias": torch.zeros(8),
        "head.weight": torch.zeros(2, 8, 48),
        "hypernet_config": SimpleNamespace(),
    })
    assert set(ours) == {"perceiver.encoder.latents_q", "layers.0.layers.1.bias", "layers.0.layers.0.bias", "head.weight"}
    assert torch.equal(ours["layers.0.layers.1.bias"], torch.arange(6.0).reshape(2, 3))
    assert ours["head.weight"].shape == (2, 1, 8, 48)


def test_atomic_folder_keep_existing_keeps_the_first_writer(tmp_path):
    from d2l_integrations.engine.atomic import atomic_folder

    target = tmp_path / "cache"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("nested files are synced too")
    with atomic_folder(target, keep_existing=True) as tmp:  # a second process that lost the race
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first" and (target / "sub" / "b.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folder left behind
    with atomic_folder(target) as tmp:  # the default replaces
        (tmp / "a.txt").write_text("third")
    assert (target / "a.txt").read_text() == "third" and not (target / "sub").exists()
