"""Heads queried with arbitrary genes (fm.heads.expression.GeneQuery), as fm.predict queries them: the same outputs
as the token path, own-state zero exactly as a hidden token, and the token lookup."""

from __future__ import annotations

import pytest
import torch

from fm import keys
from fm.heads.expression import QUERY_MASK, ExpressionConfig, ExpressionHead, GeneQuery
from fm.heads.velocity import VelocityConfig, VelocityHead
from fm.predict import query_tokens
from tests.tolerance import assert_close_rounding
from tests.unit.test_heads import VOCAB, D, make_encoder, sim_batch
from tests.unit.test_model import encoder_terms


def heads() -> dict:
    torch.manual_seed(1)
    return {
        "velocity": VelocityHead(D, VOCAB, VelocityConfig(mode="supervised", velocity_param="rates")).eval(),
        "expression": ExpressionHead(D, VOCAB, ExpressionConfig(loss="zinb")).eval(),
    }


def token_query(batch: dict, token_BQ: torch.Tensor) -> GeneQuery:
    return GeneQuery(batch[keys.B_GENE_IDS], token_BQ, batch[keys.B_GENE_MASK], batch[keys.B_SPLICED],
                     batch[keys.B_UNSPLICED])


@pytest.mark.parametrize("name", ["velocity", "expression"])
def test_querying_the_tokens_gives_the_token_path(name):
    batch, _ = sim_batch()
    encoder, head = make_encoder().eval(), heads()[name]
    with torch.no_grad():
        enc = encoder(batch)
        want = head(batch, enc)
        B, G = batch[keys.B_GENE_IDS].shape
        got = head(batch, enc, query=token_query(batch, torch.arange(G).expand(B, G)))
    for key, value in want.items():  # the query path sums in another order than the token path
        assert_close_rounding(got[key], value, terms=encoder_terms(encoder), msg=key)
    if name == "expression":  # the rate logits' softmax over the queries is the NB mean
        mask = batch[keys.B_GENE_MASK]
        mu = torch.softmax(got["spliced_logits"].masked_fill(~mask, -1e9), 1) * mask
        torch.testing.assert_close(mu * batch[keys.B_LIBRARY_SIZE_SPLICED][:, None], want["spliced_mu"])


@pytest.mark.parametrize("name", ["velocity", "expression"])
def test_a_query_without_a_visible_token_is_a_hidden_token(name):
    batch, _ = sim_batch()
    hidden = torch.zeros_like(batch[keys.B_GENE_MASK])
    hidden[:, 3] = True  # gene 4 of every cell: hidden from the encoder, still queried
    seen = {**batch, keys.B_GENE_MASK: batch[keys.B_GENE_MASK] & ~hidden, QUERY_MASK: batch[keys.B_GENE_MASK]}
    encoder, head = make_encoder().eval(), heads()[name]
    with torch.no_grad():
        enc = encoder(seen)
        want = head(seen, enc)
        B, G = hidden.shape
        token_BQ = torch.where(hidden, -1, torch.arange(G).expand(B, G))
        query = GeneQuery(batch[keys.B_GENE_IDS], token_BQ, batch[keys.B_GENE_MASK], batch[keys.B_SPLICED],
                          batch[keys.B_UNSPLICED])
        got = head(seen, enc, query=query)
        # the hidden gene queried alone, its token position unknown (-1): the same prediction
        alone = GeneQuery(batch[keys.B_GENE_IDS][:, 3:4], torch.full((B, 1), -1), torch.ones(B, 1, dtype=torch.bool),
                          batch[keys.B_SPLICED][:, 3:4], batch[keys.B_UNSPLICED][:, 3:4])
        one = head(seen, enc, query=alone)
    key = "velocity" if name == "velocity" else "spliced_zi_logits"
    assert_close_rounding(got[key], want[key], terms=encoder_terms(encoder))
    assert_close_rounding(one[key][:, 0], want[key][:, 3], terms=encoder_terms(encoder))  # Q=1 vs Q=G: float sums


def test_query_tokens_finds_each_gene_or_minus_one():
    ids = torch.tensor([[2, 5, 9, 0], [1, 9, 0, 0]])
    mask = ids > 0
    got = query_tokens(ids, mask, torch.tensor([1, 2, 5, 9, 12]), vocab_size=13)
    assert got.tolist() == [[-1, 0, 1, 2, -1], [0, -1, -1, 1, -1]]


def test_decoder_rejects_misaligned_token_positions():
    batch, _ = sim_batch()
    encoder, head = make_encoder().eval(), heads()["velocity"]
    with torch.no_grad(), pytest.raises(ValueError, match="token_BQ"):
        enc = encoder(batch)
        head.decoder(batch[keys.B_GENE_IDS], enc, batch[keys.B_GENE_IDS][:, :3])
