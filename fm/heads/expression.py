"""Expression decoder: predicts the spliced and unspliced expression of any vocabulary gene from the encoder's states.

Each query gene is an embedding from the head's own table (vocab_size x D, optionally initialised from the encoder's
gene embedding); one cross-attention pooling reads all encoder states (spliced, unspliced and fusion tokens, padding
masked) and an MLP turns the pooled vector into per-modality parameters. The query genes are the batch's tokens;
``prepare`` hides a fraction of them from the encoder (mask False, value 0), so the head learns to predict genes
it never saw, which is what imputation asks of it. To predict genes absent from a cell's input, append them as
tokens with ``B_GENE_MASK`` False and ``QUERY_MASK`` True: the encoder ignores them, the decoder queries them; or pass
a :class:`GeneQuery` to ``forward`` (any genes, e.g. every gene of a dataset in chunks, as :mod:`fm.predict` does):
a query gene that is one of the cell's visible tokens adds that token's states, any other gets own-state zero,
exactly as a hidden token does.

Losses (``loss``):
- ``nb`` / ``zinb`` on raw counts, as scVI (Lopez et al. 2018): mu = softmax over the cell's query genes of the
  predicted rate logits x the library size, theta a per-gene inverse dispersion (a table), ZINB adds per-token
  zero-inflation logits. Log-likelihoods from :mod:`fm.distributions`.
- ``mse`` on the normalised log1p values.

Shapes: B cells, G gene tokens, Q query genes (here the G tokens), L encoder states (2 G + F), F fusion tokens,
D width, U genes of the batch's union.

    python -m pytest tests/unit/test_heads.py -q -k expression
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fm import keys
from fm.distributions import nb_log_prob, zinb_log_prob
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields
from fm.model.pooling import CrossAttentionPooling

log = logging.getLogger(__name__)

# private batch entries written by ``ExpressionHead.prepare``
HIDDEN_MASK = "_expr_hidden_mask"  # bool [B, G]: tokens hidden from the encoder
QUERY_MASK = "_expr_query_mask"  # bool [B, G]: tokens to predict (the original gene mask)
TARGET = {keys.B_SPLICED: "_expr_target_spliced", keys.B_UNSPLICED: "_expr_target_unspliced"}
MODALITIES = ("spliced", "unspliced")
COUNTS = {"spliced": keys.B_SPLICED_COUNTS, "unspliced": keys.B_UNSPLICED_COUNTS}
LIBRARY = {"spliced": keys.B_LIBRARY_SIZE_SPLICED, "unspliced": keys.B_LIBRARY_SIZE_UNSPLICED}
VALUES = {"spliced": keys.B_SPLICED, "unspliced": keys.B_UNSPLICED}


def build_config(cls, config):
    """``config`` as an instance of ``cls``: given one, a mapping of its fields (dict, Hydra DictConfig) or None."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return cls(**dict(config))
    raise TypeError(f"{cls.__name__}: expected {cls.__name__}, a mapping or None, got {type(config).__name__}")


def encoder_states(encoder_output) -> tuple[Tensor, Tensor]:
    """All per-token states a decoder reads, with their mask: ([B, L, D], [B, L]) for L = 2 G + F."""
    h_BGD, mask_BG = encoder_output.h_spliced, encoder_output.gene_mask.bool()
    f_BFD = encoder_output.h_fusion
    states_BLD = torch.cat([h_BGD, encoder_output.h_unspliced, f_BFD], dim=1)
    fusion_mask = torch.ones(f_BFD.shape[:2], dtype=torch.bool, device=f_BFD.device)
    return states_BLD, torch.cat([mask_BG, mask_BG, fusion_mask], dim=1)


def batch_union(gene_ids_BG: Tensor, mask_BG: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's genes as columns of a dense matrix: (unique ids [U], column of each token [B, G]; 0 at padding)."""
    ids_U = torch.unique(gene_ids_BG[mask_BG])
    col_BG = torch.searchsorted(ids_U, gene_ids_BG.contiguous()).clamp_(max=max(ids_U.numel() - 1, 0))
    return ids_U, torch.where(mask_BG, col_BG, torch.zeros_like(col_BG))


def densify(values_BG: Tensor, col_BG: Tensor, mask_BG: Tensor, n_cols: int) -> Tensor:
    """Scatter token values into a dense [B, U] matrix over the batch's genes (0 where a cell lacks the gene)."""
    dense_BU = values_BG.new_zeros(values_BG.shape[0], n_cols)
    return dense_BU.scatter_add_(1, col_BG, torch.where(mask_BG, values_BG, torch.zeros_like(values_BG)))


@dataclass
class GeneQuery:
    """Genes to predict per cell instead of the batch's tokens (``forward(batch, out, query=...)``).

    ``token_BQ`` locates each query gene's own token in the batch's G tokens (-1 where the gene is not a visible
    token: then its own state is zero, as for a token hidden from the encoder). ``spliced_BQ`` / ``unspliced_BQ``
    are the genes' normalised log1p values (0 for a zero count), which ``velocity_param=rates`` reads.
    """

    gene_ids_BQ: Tensor  # int64 [B, Q], vocabulary index of each query gene
    token_BQ: Tensor  # int64 [B, Q], position of its token in the batch, -1: not a visible token
    mask_BQ: Tensor  # bool [B, Q], real queries (False at padding)
    spliced_BQ: Tensor  # float [B, Q]
    unspliced_BQ: Tensor  # float [B, Q]


def expected_counts(logits_BQ: Tensor, mask_BQ: Tensor, library_B: Tensor) -> Tensor:
    """NB mean: softmax of the rate logits over a cell's query genes x its library size (scVI's px_scale * library).

    (a finite fill, then zeroing, keeps a cell with no query gene free of NaN in the backward pass)
    """
    scale_BQ = torch.softmax(logits_BQ.masked_fill(~mask_BQ, -1e9), dim=1) * mask_BQ
    return scale_BQ * library_B.to(scale_BQ.dtype)[:, None]


class GeneQueryDecoder(nn.Module):
    """Gene-embedding queries (own table) -> cross-attention over encoder states -> MLP -> ``n_out`` per query."""

    def __init__(self, dim: int, vocab_size: int, n_heads: int, n_out: int, hidden_mult: int = 2):
        super().__init__()
        self.gene_queries = nn.Embedding(vocab_size, dim)  # index 0 is a real gene; padding is masked
        nn.init.normal_(self.gene_queries.weight, std=0.02)
        # the encoder's own states of a query gene that is one of the cell's visible tokens (zero where hidden or
        # padding): velocity and expression of gene g depend first on that gene's (u, s)
        self.token_proj = nn.Linear(2 * dim, dim)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pool = CrossAttentionPooling(dim, n_heads, n_queries=0)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_mult * dim), nn.GELU(), nn.Linear(hidden_mult * dim, n_out)
        )

    @torch.no_grad()
    def init_queries_from(self, embedding: nn.Embedding) -> None:
        """Copy a gene embedding (e.g. the pretrained encoder's ``gene_embedding``) into the query table."""
        if embedding.weight.shape != self.gene_queries.weight.shape:
            raise ValueError(
                f"init_queries_from: shape {tuple(embedding.weight.shape)} != {tuple(self.gene_queries.weight.shape)}"
            )
        self.gene_queries.weight.copy_(embedding.weight)

    def forward(self, gene_ids_BQ: Tensor, encoder_output, token_BQ: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-query outputs [B, Q, n_out] and pooled states [B, Q, D].

        A query adds the encoder's states of its own token where that token was visible.

        Args:
            gene_ids_BQ: int64 [B, Q] query genes.
            token_BQ: int64 [B, Q], the position of each query gene's token among the encoder's G tokens (-1: no
                visible token, own state zero). None: the queries are the batch's tokens (Q = G, aligned with
                ``encoder_output.h_spliced``).
        """
        states_BLD, mask_BL = encoder_states(encoder_output)
        h_BGD = torch.cat([encoder_output.h_spliced, encoder_output.h_unspliced], -1)
        visible_BG = encoder_output.gene_mask.bool()
        if token_BQ is None:
            if gene_ids_BQ.shape != visible_BG.shape:
                raise ValueError(
                    f"GeneQueryDecoder: query genes {tuple(gene_ids_BQ.shape)} must align with the encoder's tokens "
                    f"{tuple(visible_BG.shape)} (or pass token_BQ)"
                )
            own_BQD = self.token_proj(h_BGD * visible_BG[..., None].to(h_BGD.dtype))
        else:
            if token_BQ.shape != gene_ids_BQ.shape:
                raise ValueError(f"GeneQueryDecoder: token_BQ {tuple(token_BQ.shape)} != gene_ids_BQ "
                                 f"{tuple(gene_ids_BQ.shape)}")
            at_BQ = token_BQ.clamp(min=0)
            visible_BQ = (token_BQ >= 0) & visible_BG.gather(1, at_BQ)
            own_BQ2D = h_BGD.gather(1, at_BQ[..., None].expand(-1, -1, h_BGD.shape[-1]))
            own_BQD = self.token_proj(own_BQ2D * visible_BQ[..., None].to(h_BGD.dtype))
        q_BQD = self.norm_q(self.gene_queries(gene_ids_BQ) + own_BQD)
        pooled_BQD = q_BQD + self.pool(q_BQD, self.norm_kv(states_BLD), mask_BL)
        return self.mlp(pooled_BQD), pooled_BQD


@dataclass
class ExpressionConfig:
    """Expression decoder settings."""

    loss: str = "nb"  # nb | zinb (on raw counts, scVI-style) | mse (on normalised log1p values)
    n_heads: int = 4  # heads of the cross-attention pooling
    hidden_mult: int = 2  # MLP hidden width = hidden_mult * D
    mask_fraction: float = 0.15  # fraction of each cell's real tokens hidden from the encoder by prepare (0: none)
    loss_on: str = "all"  # all real tokens | hidden (only the tokens hidden from the encoder)
    theta_init: float = 1.0  # initial NB inverse dispersion of every gene

    def __post_init__(self) -> None:
        check_fields(self)
        if self.loss not in ("nb", "zinb", "mse"):
            raise ValueError(f"ExpressionConfig.loss: must be nb, zinb or mse, got {self.loss!r}")
        if self.loss_on not in ("all", "hidden"):
            raise ValueError(f"ExpressionConfig.loss_on: must be all or hidden, got {self.loss_on!r}")
        if not 0.0 <= self.mask_fraction < 1.0:
            raise ValueError(f"ExpressionConfig.mask_fraction: must be in [0, 1), got {self.mask_fraction}")
        if self.loss_on == "hidden" and self.mask_fraction == 0:
            raise ValueError("ExpressionConfig.loss_on: 'hidden' needs mask_fraction > 0")
        if self.n_heads < 1 or self.hidden_mult < 1:
            raise ValueError(
                f"ExpressionConfig.n_heads/hidden_mult: must be >= 1, got {self.n_heads}, {self.hidden_mult}"
            )
        if self.theta_init <= 0:
            raise ValueError(f"ExpressionConfig.theta_init: must be > 0, got {self.theta_init}")


class ExpressionHead(Head):
    """Predicts spliced and unspliced expression of the batch's genes, including genes hidden from the encoder.

    Args:
        dim: the encoder's width D.
        vocab_size: rows of the gene vocabulary (index 0 is padding).
        config: an :class:`ExpressionConfig` (or a mapping of its fields).
    """

    def __init__(self, dim: int, vocab_size: int, config: ExpressionConfig | Mapping | None = None):
        super().__init__()
        self.config = c = build_config(ExpressionConfig, config)
        n_per_modality = 2 if c.loss == "zinb" else 1  # rate logit (or log1p value) [+ zero-inflation logit]
        self.decoder = GeneQueryDecoder(dim, vocab_size, c.n_heads, 2 * n_per_modality, c.hidden_mult)
        # per-gene, per-modality log inverse dispersion (scVI's "gene" dispersion)
        self.log_theta = nn.Embedding(vocab_size, 2)
        nn.init.constant_(self.log_theta.weight, float(torch.tensor(c.theta_init).log()))

    def predict_layers(self) -> dict[str, PredictLayer]:
        """Per modality: mse, the predicted log1p value; nb/zinb, the expected counts, which fm predict computes from
        ``{modality}_logits`` by a softmax over all of the input's in-vocabulary genes."""
        loss = self.config.loss
        return {name: PredictLayer(keys.LAYER_IMPUTED[name], (
            f"predicted normalised log1p {name} value (loss=mse; log1p(counts / library * target_sum))"
            if loss == "mse" else
            f"expected {name} counts: the NB mean (loss={loss}; zero inflation not applied) at the cell's "
            f"{name} library size, softmax over all of the input's in-vocabulary genes"))
            for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED)}  # fmt: skip

    def predict_gathered(self) -> tuple[str, ...]:
        """nb/zinb: the rate logits, whose softmax over all of a cell's genes gives the expected counts."""
        return () if self.config.loss == "mse" else tuple(f"{name}_logits" for name in MODALITIES)

    def predict_reduce(self, gathered: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Expected counts per modality: softmax of the logits over all M queried genes, at the library size."""
        out = {}
        for name in MODALITIES:
            logits_BM = gathered[f"{name}_logits"]
            library_B = batch[LIBRARY[name]].float().to(logits_BM.device)
            out[name] = expected_counts(logits_BM, torch.ones_like(logits_BM, dtype=torch.bool), library_B)
        return out

    def gene_table(self) -> nn.Embedding:
        return self.decoder.gene_queries

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Hide ``mask_fraction`` of each cell's real tokens from the encoder (at least one token stays visible)."""
        if self.config.mask_fraction == 0:
            return batch
        real_BG = batch[keys.B_GENE_MASK].bool()
        batch = dict(batch)
        batch[QUERY_MASK] = real_BG
        for key in (keys.B_SPLICED, keys.B_UNSPLICED):
            batch[TARGET[key]] = batch[key]
        score_BG = torch.rand(real_BG.shape, generator=generator, device="cpu").to(real_BG.device)
        score_BG = score_BG.masked_fill(~real_BG, 2.0)  # padding is never hidden
        n_real_B = real_BG.sum(1)
        n_hide_B = torch.minimum((n_real_B.float() * self.config.mask_fraction).round().long(), n_real_B - 1)
        rank_BG = score_BG.argsort(1).argsort(1)
        hidden_BG = (rank_BG < n_hide_B.clamp(min=0)[:, None]) & real_BG
        batch[HIDDEN_MASK] = hidden_BG
        batch[keys.B_GENE_MASK] = real_BG & ~hidden_BG
        for key in (keys.B_SPLICED, keys.B_UNSPLICED):
            batch[key] = batch[key].masked_fill(hidden_BG, 0.0)
        return batch

    def forward(self, batch: dict, encoder_output, query: GeneQuery | None = None) -> dict[str, Tensor]:
        """Per query gene: ``{modality}`` (mse: normalised log1p) or ``{modality}_mu``/``_theta`` (/``_zi_logits``).

        ``query``: predict these genes instead of the batch's tokens; then nb/zinb also return ``{modality}_logits``,
        the rate logits, whose softmax over *all* of a cell's query genes gives ``_mu`` (a caller that queries a
        cell's genes in chunks, as fm.predict does, takes that softmax itself with :func:`expected_counts`).
        """
        if query is None:
            gene_ids_BQ = batch[keys.B_GENE_IDS]
            query_BQ = batch.get(QUERY_MASK, batch[keys.B_GENE_MASK]).bool()
            raw_BQO, _ = self.decoder(gene_ids_BQ, encoder_output)
        else:
            gene_ids_BQ, query_BQ = query.gene_ids_BQ, query.mask_BQ.bool()
            raw_BQO, _ = self.decoder(gene_ids_BQ, encoder_output, query.token_BQ)
        out: dict[str, Tensor] = {"query_mask": query_BQ}
        n = raw_BQO.shape[-1] // 2
        theta_BQ2 = self.log_theta(gene_ids_BQ).exp()
        for m, name in enumerate(MODALITIES):
            raw_BQ = raw_BQO[..., m * n]
            if self.config.loss == "mse":
                out[name] = raw_BQ  # predicted normalised log1p value
                continue
            if query is not None:
                out[f"{name}_logits"] = raw_BQ
            out[f"{name}_mu"] = expected_counts(raw_BQ, query_BQ, batch[LIBRARY[name]])
            out[f"{name}_theta"] = theta_BQ2[..., m]
            if self.config.loss == "zinb":
                out[f"{name}_zi_logits"] = raw_BQO[..., m * n + 1]
        return out

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        c = self.config
        query_BQ = outputs["query_mask"]
        hidden_BQ = batch.get(HIDDEN_MASK, torch.zeros_like(query_BQ)) & query_BQ
        sel_BQ = hidden_BQ if c.loss_on == "hidden" else query_BQ
        if not sel_BQ.any():
            raise ValueError(f"ExpressionHead.loss: no token to score (loss_on={c.loss_on!r})")
        parts, metrics = {}, {}
        for name in MODALITIES:
            if c.loss == "mse":
                target_BQ = batch.get(TARGET[VALUES[name]], batch[VALUES[name]])
                err_BQ = (outputs[name] - target_BQ) ** 2
                parts[f"{name}_mse"] = err_BQ[sel_BQ].mean()
                if hidden_BQ.any():
                    metrics[f"{name}_hidden_mae"] = (outputs[name] - target_BQ).abs()[hidden_BQ].mean().detach()
                continue
            x_BQ, mu_BQ, theta_BQ = batch[COUNTS[name]], outputs[f"{name}_mu"], outputs[f"{name}_theta"]
            if c.loss == "zinb":
                ll_BQ = zinb_log_prob(x_BQ, mu_BQ, theta_BQ, outputs[f"{name}_zi_logits"])
            else:
                ll_BQ = nb_log_prob(x_BQ, mu_BQ, theta_BQ)
            parts[f"{name}_nll"] = -ll_BQ[sel_BQ].mean()
            if hidden_BQ.any():
                metrics[f"{name}_hidden_mae"] = (mu_BQ - x_BQ).abs()[hidden_BQ].mean().detach()
        return LossOutput(loss=sum(parts.values()), parts=parts, metrics=metrics)
