"""Tests of engine/distill.py on a tiny random Llama with a byte-level tokenizer (CPU, seconds).

One ``slow`` test distills a short document into the real default model (SmolLM2-135M).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.distill import (
    DistillationInterrupted,
    DistillConfig,
    DistillInternalizer,
    NonFiniteLossError,
    _common_prefix_length,
    _RowLoRA,
    _Teacher,
)
from d2l_integrations.engine.internalizer import Internalizer
from d2l_integrations.errors import ConfigError, InternalizationError, InvalidDocumentError

DOC_A = "Mira Kellan was born in Ostravel in 1984. The special magic number is 4821."
DOC_B = "The lighthouse at Brenn Point has 212 steps. Its keeper was Tomas Arvid."
DOC_C = "The red kettle holds 3 litres. Ada Quill painted it in 2011."

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer():  # noqa: ANN202 - transformers type
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _tiny_base(max_positions: int = 2048) -> BaseModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, name="tiny-llama", revision="tiny-rev")


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return _tiny_base()


def _config(**overrides: object) -> DistillConfig:
    settings: dict[str, object] = dict(
        max_steps=6, batch_size=4, teacher_max_new_tokens=4, max_questions=8, about_questions=1,
        eval_every=3, lr=1e-2, chunks_per_batch=2, teacher_logprob_dtype="float32",
    )
    settings.update(overrides)
    return DistillConfig(**settings)  # type: ignore[arg-type]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_implements_the_internalizer_protocol() -> None:
    distill = DistillInternalizer()
    assert isinstance(distill, Internalizer)
    assert distill.name == "distill"


def test_checkpoint_id_changes_with_settings() -> None:
    a = DistillInternalizer(DistillConfig()).checkpoint_id
    assert a.startswith("distill-") and a == DistillInternalizer(DistillConfig()).checkpoint_id
    assert a != DistillInternalizer(DistillConfig(rank=4)).checkpoint_id


def test_config_round_trips_and_rejects_bad_budgets() -> None:
    cfg = DistillConfig(layers=(0, 1), target_modules=("down_proj", "up_proj"))
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="max_steps must be >= 1"):
        DistillConfig(max_steps=0)
    with pytest.raises(ConfigError, match="needs a budget"):
        DistillConfig(max_steps=None, max_seconds=None)
    with pytest.raises(ConfigError, match="max_seconds"):
        DistillConfig(max_seconds=0.0)
    with pytest.raises(ConfigError, match="lr"):
        DistillConfig(lr=float("nan"))
    assert DistillConfig(max_steps=None, max_seconds=5.0).max_seconds == 5.0


def test_gpu_preset_and_device_choice() -> None:
    gpu = DistillConfig.gpu()
    assert (gpu.rank, gpu.alpha, gpu.max_questions, gpu.max_steps, gpu.chunks_per_batch, gpu.patience) == (32, 64.0, 40, 320, 16, 0)
    assert (gpu.question_style, gpu.held_out_fraction, gpu.lr_schedule) == ("wh", 0.0, "cosine")
    old = DistillConfig.gpu(question_style="cloze", held_out_fraction=0.15, lr_schedule="constant")
    assert old.settings_hash() != gpu.settings_hash()  # adapters made with the older preset are not reused
    assert DistillConfig.gpu(max_steps=160).max_steps == 160 and DistillConfig.gpu(max_steps=160).rank == 32
    assert DistillConfig.for_device(torch.device("cuda", 0)) == gpu
    assert DistillConfig.for_device("cuda") == gpu
    assert DistillConfig.for_device(torch.device("cpu")) == DistillConfig()
    assert DistillConfig.for_device("mps") == DistillConfig()


def test_loss_goes_down_on_a_fixed_batch(base: BaseModel) -> None:
    # batch_size above the number of examples: every step sees the same full set, so first and
    # last training KL are comparable.
    cfg = _config(max_steps=25, batch_size=256, patience=0, lr=2e-2)
    [result] = DistillInternalizer(cfg).distill_chunks(base, [DOC_A])
    first, last = result.train_kl
    assert result.steps == 25
    assert last < 0.7 * first, (first, last)


def test_adapter_shape_and_provenance(base: BaseModel) -> None:
    cfg = _config()
    distill = DistillInternalizer(cfg)
    adapters = distill.internalize_chunks(base, [DOC_A, DOC_B], chunk_ids=["a", "b"])
    assert len(adapters) == 2
    for adapter, doc, chunk_id in zip(adapters, [DOC_A, DOC_B], ["a", "b"], strict=True):
        expected = {base.module_path(layer, "down_proj") for layer in range(base.num_layers)}
        assert set(adapter.weights) == expected
        for w in adapter.weights.values():
            assert w.lora_A.shape == (cfg.rank, 64) and w.lora_B.shape == (32, cfg.rank)
            assert w.lora_A.dtype == torch.float32
            assert w.scaling == pytest.approx(cfg.alpha / cfg.rank)
        assert any(w.lora_B.abs().sum() > 0 for w in adapter.weights.values()), "B never left its zero init"
        p = adapter.provenance
        assert p.method == "distill" and p.source_sha256 == (_sha(doc),) and p.chunk_ids == (chunk_id,)
        assert p.checkpoint_id == distill.checkpoint_id and p.base_model == "tiny-llama" and p.base_model_revision == "tiny-rev"
        assert DistillConfig.from_dict(__import__("json").loads(p.extra["distill_config"])) == cfg
    assert not torch.equal(adapters[0].weights["model.layers.0.mlp.down_proj"].lora_B,
                           adapters[1].weights["model.layers.0.mlp.down_proj"].lora_B)


def test_batched_chunks_equal_chunks_trained_alone(base: BaseModel) -> None:
    together = DistillInternalizer(_config(chunks_per_batch=2, patience=0)).internalize_chunks(base, [DOC_A, DOC_B])
    alone = DistillInternalizer(_config(chunks_per_batch=1, patience=0)).internalize_chunks(base, [DOC_A, DOC_B])
    for x, y in zip(together, alone, strict=True):
        for name in x.weights:
            torch.testing.assert_close(x.weights[name].lora_B, y.weights[name].lora_B, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(x.weights[name].lora_A, y.weights[name].lora_A, atol=1e-4, rtol=1e-3)


def test_training_hook_matches_the_inference_path(base: BaseModel) -> None:
    """The returned adapter, applied by engine.apply, reproduces the function that was trained."""
    [adapter] = DistillInternalizer(_config(patience=0)).internalize_chunks(base, [DOC_A])
    cfg = _config()
    names = list(adapter.weights)
    row = _RowLoRA(base, names, 1, cfg, seeds=[0])
    with torch.no_grad():
        for name in names:
            row.lora_A[name].copy_(adapter.weights[name].lora_A[None])
            row.lora_B[name].copy_(adapter.weights[name].lora_B[None])
    ids = torch.tensor([base.chat_ids([{"role": "user", "content": "What is the special magic number?"}])])
    plain = base.model(ids).logits
    row.row_chunk = torch.zeros(1, dtype=torch.long)
    with row.attached(base.model):
        trained = base.model(ids).logits
    with use_adapters(base.model, adapter):
        applied = base.model(ids).logits
    assert (trained - plain).abs().max() > 1e-4, "the adapter should change the model"
    torch.testing.assert_close(applied, trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base.model(ids).logits, plain)  # hooks are gone


def test_zero_step_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="zero-step budget"):
        DistillInternalizer(DistillConfig(max_steps=0))


def test_non_finite_loss_raises_and_returns_nothing(base: BaseModel) -> None:
    calls: list[int] = []
    distill = DistillInternalizer(_config(alpha=1e300, max_steps=5, chunks_per_batch=1))
    with pytest.raises(NonFiniteLossError, match="Non-finite|not finite") as info:
        distill.internalize_chunks(base, [DOC_A, DOC_B], progress=lambda done, total: calls.append(done))
    assert isinstance(info.value, InternalizationError)
    assert info.value.adapters == [] and calls == []


def test_interrupt_keeps_finished_adapters(base: BaseModel) -> None:
    def progress(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    distill = DistillInternalizer(_config(chunks_per_batch=1, max_steps=2))
    with pytest.raises(DistillationInterrupted) as info:
        distill.internalize_chunks(base, [DOC_A, DOC_B, DOC_C], progress=progress)
    assert isinstance(info.value, KeyboardInterrupt)
    assert [a.provenance.source_sha256 for a in info.value.adapters] == [(_sha(DOC_A),)]
    assert info.value.total == 3


def test_long_chunk_is_split_not_truncated() -> None:
    small = _tiny_base(max_positions=400)  # byte tokens: ~250 characters of document per teacher prompt
    sentences = [f"Item {i} of the list is a {color} box." for i, color in enumerate(["red", "blue", "green", "grey"] * 5)]
    doc = " ".join(sentences)
    distill = DistillInternalizer(_config(max_steps=2, max_questions=12))
    [result] = distill.distill_chunks(small, [doc])
    assert result.num_pieces >= 3
    from d2l_integrations.engine.questions import build_questions

    pieces = distill._pieces(small, doc, list(build_questions(doc).train))
    assert pieces[0][0] == 0 and pieces[-1][1] == len(doc)
    covered = "".join(doc[s:e] for s, e, _ in pieces)
    assert covered.replace(" ", "") == doc.replace(" ", "")  # every sentence reaches the teacher
    assert result.adapter.provenance.source_sha256 == (_sha(doc),)


def test_context_too_small_for_any_document_raises() -> None:
    tiny = _tiny_base(max_positions=120)
    with pytest.raises(InternalizationError, match="context window"):
        DistillInternalizer(_config()).internalize_chunks(tiny, [DOC_A])


def test_bad_inputs(base: BaseModel) -> None:
    distill = DistillInternalizer(_config())
    with pytest.raises(InvalidDocumentError):
        distill.internalize_chunks(base, ["  "])
    with pytest.raises(ConfigError, match="chunk_ids"):
        distill.internalize_chunks(base, [DOC_A], chunk_ids=["a", "b"])
    with pytest.raises(ConfigError, match="layers"):
        DistillInternalizer(dataclasses.replace(_config(), layers=(5,))).internalize_chunks(base, [DOC_A])


def test_seconds_budget_stops_training(base: BaseModel) -> None:
    [result] = DistillInternalizer(_config(max_steps=None, max_seconds=0.05, patience=0)).distill_chunks(base, [DOC_A])
    assert 1 <= result.steps < 200


@pytest.mark.slow
def test_real_model_learns_a_needle() -> None:
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.errors import ModelNotFoundError

    torch.set_num_threads(2)
    try:
        real = load_base_model("default", device="cpu")
    except ModelNotFoundError as exc:
        pytest.skip(f"default model not installed: {exc}")
    doc = "The grass is green. The sky is blue.\nThe special magic number is 4821.\nThe sun is yellow."
    cfg = DistillConfig(max_steps=6, batch_size=64, max_questions=6, about_questions=1, teacher_max_new_tokens=8, patience=0)
    [result] = DistillInternalizer(cfg).distill_chunks(real, [doc])
    first, last = result.train_kl  # batch_size above the example count: the same batch every step
    assert last < first
    assert result.adapter.provenance.source_sha256 == (_sha(doc),)
    assert len(result.adapter.weights) == real.num_layers


def test_snapshots_are_taken_at_requested_steps(base: BaseModel) -> None:
    seen: list[int] = []
    [result] = DistillInternalizer(_config(max_steps=3, patience=0)).distill_chunks(
        base, [DOC_A], snapshot_steps=(1, 3, 7), on_result=lambda i, r: seen.append(i)
    )
    assert sorted(result.snapshots) == [1, 3] and seen == [0]  # 7 is beyond the budget
    (s1, a1), (s3, a3) = result.snapshots[1], result.snapshots[3]
    assert 0 < s1 <= s3 <= result.seconds + 1e-6
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(a1.weights[name].lora_B, a3.weights[name].lora_B)
    torch.testing.assert_close(a3.weights[name].lora_B, result.adapter.weights[name].lora_B)


# ------------------------------------------------------------------ teacher KV sharing
_QUESTIONS = [
    "What is the special magic number?",
    "Who?",
    "Where was Mira Kellan born, and in which year was that?",
    "The magic number is ____.",
    "Year 1984",
]


def _bpe_base() -> BaseModel:
    from tests.tiny_models import make_tiny_base

    return make_tiny_base(max_positions=1024)  # a BPE tokenizer with merges, unlike the byte-level one above


def test_common_prefix_leaves_every_prompt_a_suffix() -> None:
    assert _common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert _common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # equal prompts: the last token is run as the suffix
    assert _common_prefix_length([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_shared_prefix_teacher_equals_full_prompts(base: BaseModel, tokenizer: str) -> None:
    """KV-shared teacher == full-prompt teacher: same greedy answers, same log-probs (fp32), for
    questions of different lengths in padded batches (batch_size 2 of 5 prompts)."""
    model = base if tokenizer == "byte" else _bpe_base()
    prompts = [model.chat_ids([{"role": "user", "content": f"{DOC_A}\n\n{q}"}]) for q in _QUESTIONS]
    shared = _Teacher(model, prompts, [0] * len(prompts), batch_size=2)
    full = _Teacher(model, prompts, None, batch_size=2)
    [(_, prefix)] = shared.groups
    assert prefix is not None and prefix.length > model.count_tokens(DOC_A), "the prefix should hold the whole chunk"
    assert all(p[:prefix.length] == prefix.ids for p in prompts)

    answers = shared.greedy_answers(6)
    assert answers == full.greedy_answers(6)
    assert len({len(p) - prefix.length for p in prompts}) >= 4  # suffixes of different lengths: padded batches

    gold = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["4821", "Ostravel in 1984", "M"]]
    items = [(k, a) for k, a in enumerate(answers) if a] + [(0, gold[0]), (2, gold[1]), (4, gold[2])]
    for got, want in zip(shared.response_logprobs(items), full.response_logprobs(items), strict=True):
        assert got.shape == want.shape == (len(want), len(model.tokenizer))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["one_piece", "split_chunk"])
def test_prepared_chunk_is_the_same_with_and_without_kv_sharing(base: BaseModel, case: str) -> None:
    """The whole teacher phase (questions, answers, log-probs, held-out split) of a chunk, also one
    split into pieces (a shared prefix per piece), matches the full-prompt path."""
    if case == "one_piece":
        model, doc = base, DOC_A
    else:
        model = _tiny_base(max_positions=400)
        colors = ["red", "blue", "green", "grey"] * 5
        doc = " ".join(f"Item {i} of the list is a {c} box." for i, c in enumerate(colors))
    cfg = _config(max_questions=12, teacher_batch_size=3)
    shared = DistillInternalizer(cfg)._prepare_chunk(model, doc, None)
    full = DistillInternalizer(cfg, share_teacher_prefix=False)._prepare_chunk(model, doc, None)
    assert shared.num_pieces == full.num_pieces and (shared.num_pieces > 1) == (case == "split_chunk")
    for got_list, want_list in ((shared.train, full.train), (shared.held_out, full.held_out)):
        assert len(got_list) == len(want_list)
        for got, want in zip(got_list, want_list, strict=True):
            assert got.student_ids == want.student_ids and got.response_ids == want.response_ids
            torch.testing.assert_close(got.teacher_logprobs, want.teacher_logprobs, atol=1e-5, rtol=1e-5)


def test_question_style_is_validated_and_keeps_old_settings_hashes() -> None:
    assert "question_style" not in DistillConfig().to_dict()  # adapter stores made before the field keep their keys
    wh = DistillConfig(question_style="wh")
    assert wh.to_dict()["question_style"] == "wh" and DistillConfig.from_dict(wh.to_dict()) == wh
    assert wh.settings_hash() != DistillConfig().settings_hash()
    with pytest.raises(ConfigError, match="question_style"):
        DistillConfig(question_style="quiz")


def test_wh_questions_train_end_to_end(base: BaseModel) -> None:
    cfg = _config(max_steps=12, batch_size=256, patience=0, lr=2e-2, question_style="wh")
    distill = DistillInternalizer(cfg)
    cloze = DistillInternalizer(dataclasses.replace(cfg, question_style="cloze"))
    wh_prompts = {tuple(ex.student_ids) for ex in distill._prepare_chunk(base, DOC_A, None).train}
    assert wh_prompts - {tuple(ex.student_ids) for ex in cloze._prepare_chunk(base, DOC_A, None).train}  # other questions
    [result] = distill.distill_chunks(base, [DOC_A])
    first, last = result.train_kl
    assert result.steps == 12 and last < first


def test_cosine_schedule_decays_the_learning_rate_to_zero(base: BaseModel) -> None:
    assert "lr_schedule" not in DistillConfig().to_dict()  # adapter stores made before the field keep their keys
    cosine = DistillConfig(lr_schedule="cosine")
    assert DistillConfig.from_dict(cosine.to_dict()) == cosine and cosine.settings_hash() != DistillConfig().settings_hash()
    with pytest.raises(ConfigError, match="lr_schedule"):
        DistillConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="set max_steps"):
        DistillConfig(lr_schedule="cosine", max_steps=None, max_seconds=5.0)
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    cfg = _config(max_steps=8, patience=0, lr=1e-2, lr_schedule="cosine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", record)
        DistillInternalizer(cfg).distill_chunks(base, [DOC_A])
    assert len(seen) == 8 and seen[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(7 * math.pi / 8)))  # ~4e-4: the last step is small
