"""The gold-answer NLL of the streamed teacher-forced evaluation (core/streaming/evaluate.py)
against the whole model in float64: aliases of different token lengths (the best is taken),
tokenisation at the prompt/answer boundary, and rows without answers or with blank aliases."""

from __future__ import annotations

import pytest
import torch

from core.calibration import StageProgress
from core.data import encode_text, tokenize_rows
from core.spec import CalibrationRow
from core.streaming.evaluate import MAX_ANSWER_TOKENS, teacher_forced_eval
from core.streaming.hidden import SpillArea
from core.streaming.model import open_streamed

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

ROWS = [
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris", "Paris, France", "  "]),
    CalibrationRow(prompt="Name a prime number.", answers=["seven hundred and ninety-seven", "2"]),
    CalibrationRow(prompt="Say something."),  # no answers: no NLL, KL at the last prompt token only
    CalibrationRow(messages=[{"role": "user", "content": "2 + 2?"}], answers=["4"]),
]


def whole_model_nll(model, prompt: list[int], answer: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return float(-logp.gather(1, torch.tensor(answer)[:, None]).mean())


def test_gold_nll_takes_the_best_alias_and_skips_rows_without_answers(source, loaded, tmp_path) -> None:
    with open_streamed(source) as streamed:
        area = SpillArea(1 << 30, tmp_path)
        result = teacher_forced_eval(
            streamed, ROWS, [], codes=lambda i, b: {}, max_tokens=64, tracker=StageProgress(stage="evaluate"), area=area
        )
        area.close()
    fp = result["full_precision"]
    prompts = tokenize_rows(ROWS, loaded.tokenizer, 64)
    model = loaded.model.double().eval()
    try:
        for row, prompt, got in zip(ROWS, prompts, fp.gold_nll_items, strict=True):
            aliases = [a for a in (row.answers or []) if a.strip()]
            if not aliases:
                assert got is None
                continue
            # each alias tokenised as the assistant's reply continues the template (no BOS, no
            # merge with the prompt's last token), capped at MAX_ANSWER_TOKENS
            ids = [encode_text(a, loaded.tokenizer, templated=True)[:MAX_ANSWER_TOKENS] for a in aliases]
            assert all(ids) and len({len(i) for i in ids}) > 1 or len(ids) == 1
            expected = min(whole_model_nll(model, prompt, i) for i in ids)
            assert got == pytest.approx(expected, rel=1e-5)
    finally:
        loaded.model.float()
    # the answerless row contributes one KL position (its last prompt token); full precision
    # against itself is exactly 0 / 1
    assert fp.mean_kl == 0.0 and fp.top1_agreement == 1.0
    assert fp.kl_items[2] == 0.0 and fp.top1_items[2] == 1.0
    assert fp.gold_nll(seed=0).n == 3


def test_a_variant_of_dequantized_tensors_equals_the_same_codes(source, loaded, tmp_path) -> None:
    """The bench's peers hand their weights over already dequantized: swapped in as they are, they
    give the very results of the codes they came from, and differ from full precision."""
    from core.quant.primitives import dequantize_weight, quantize_weight
    from core.streaming.evaluate import EvalVariant

    with open_streamed(source) as streamed:
        names = [n for ref in streamed.layers for n in ref.linears]
        originals = dict(loaded.model.named_modules())
        codes = {n: quantize_weight(originals[n].weight.detach(), 3, 32, False) for n in names}
        tensors = {n: dequantize_weight(q, torch.float32) for n, q in codes.items()}

        def of_layer(mapping: dict, index: int, bits: int) -> dict:
            assert bits == 3
            return {n: mapping[n] for n in streamed.layers[index].linears}

        area = SpillArea(1 << 30, tmp_path)
        result = teacher_forced_eval(
            streamed,
            ROWS,
            [
                EvalVariant("codes", dict.fromkeys(names, 3), codes=lambda i, b: of_layer(codes, i, b)),
                EvalVariant("tensors", dict.fromkeys(names, 3), codes=lambda i, b: of_layer(tensors, i, b)),
            ],
            codes=lambda i, b: {},
            max_tokens=64,
            tracker=StageProgress(stage="evaluate"),
            area=area,
        )
        area.close()
    assert result["tensors"].gold_nll_items == result["codes"].gold_nll_items
    assert result["tensors"].kl_items == result["codes"].kl_items
    assert result["tensors"].mean_kl > 0.0
    assert result["tensors"].gold_nll_items != result["full_precision"].gold_nll_items
