"""Document boundaries in packed windows: restarted positions, cu_seqlens, no loss across a boundary."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from zeroforge.data.boundaries import DocumentBoundaries, cu_seqlens, document_position_ids
from zeroforge.trainer.engine import causal_lm_loss

EOS = 0
# Two windows of seq_len 6 (+1): documents end with EOS; the first row starts mid-document.
TOKENS = torch.tensor(
    [
        [3, 4, EOS, 2, 2, EOS, 4],
        [1, 2, 3, 4, 1, 2, EOS],
    ]
)


class _Recorder(torch.nn.Module):
    """Uniform logits over 5 tokens, except a confident wrong guess wherever the input is EOS."""

    def __init__(self):
        super().__init__()
        self.position_ids = None

    def forward(self, input_ids, position_ids=None):
        self.position_ids = position_ids
        logits = torch.zeros(*input_ids.shape, 5)
        logits[..., 1] += 50.0 * (input_ids == EOS)  # targets after EOS are never 1 here
        return SimpleNamespace(logits=logits)


def test_positions_restart_after_each_eos_and_cu_seqlens_mark_the_documents() -> None:
    inputs = TOKENS[:, :-1]
    positions = document_position_ids(inputs, EOS)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert cu_seqlens(positions).tolist() == [0, 3, 6, 12]


def test_masked_pair_gets_no_loss_and_the_model_sees_document_positions() -> None:
    model = _Recorder()
    plain = causal_lm_loss(model, TOKENS)
    assert model.position_ids is None
    assert plain > 5.0  # the pairs after EOS cost ~50 each
    masked = causal_lm_loss(model, TOKENS, DocumentBoundaries(EOS, reset_position_ids=True, mask_cross_document_loss=True))
    # Only the two pairs after EOS in row 0 are left out; every other pair costs log(5).
    assert math.isclose(masked.item(), math.log(5), rel_tol=1e-6)
    assert model.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    targets = DocumentBoundaries(EOS, mask_cross_document_loss=True).targets(TOKENS)
    assert (targets == -100).sum() == 2 and targets[0, 2] == -100 and targets[0, 5] == -100


def test_positions_alone_keep_every_pair_in_the_loss() -> None:
    model = _Recorder()
    loss = causal_lm_loss(model, TOKENS, DocumentBoundaries(EOS, reset_position_ids=True))
    assert torch.isclose(loss, causal_lm_loss(_Recorder(), TOKENS))
    assert model.position_ids is not None
