"""`fm predict`: run released models on a `.h5ad` and add velocity, kinetic rates, imputed expression and embeddings.

    fm predict --checkpoint releases/fm-velocity --checkpoint releases/fm-expression \
        --input pancreas.h5ad --output pancreas_fm.h5ad --batch-size 256 --device cpu
    python -c "import anndata, fm, fm.predict; m = fm.load_pretrained('releases/fm-velocity'); \
print(fm.predict.predict(m, anndata.read_h5ad('sim.h5ad')))"

The input needs raw counts in ``layers['spliced']`` and ``layers['unspliced']`` (dense or sparse). Its genes are
mapped onto the model's vocabulary as ``fm prep convert`` maps a dataset (fm.data.genes.map_onto: a stable id
column such as ``var['gene_id']`` first, then ``var_names`` / a symbol column); unmatched genes are reported and get
NaN. Cells are streamed in batches (row slices of the CSR, never the whole matrix densified) and tokenised as in
fine-tuning (the release's ``tokenizer`` settings, library sizes over the cell's in-vocabulary genes, as the
converter computes them), with two choices that make the output deterministic and independent of the batch:
``gene_set='cell'`` and, for a cell with more than ``max_genes`` in-vocabulary genes with counts,
``gene_sampling='top_expressed'``. The encoder sees the cell's genes with counts; the decoders are then queried
with EVERY in-vocabulary gene of the input (in chunks), a gene that is not one of the cell's visible tokens
getting own-state zero, exactly as the expression head predicts genes hidden from the encoder (fm.heads.expression).

Outputs (a new AnnData, the input's fields untouched; names in fm.keys; see docs/RELEASE.md "Predict"):
``layers['velocity']``, ``['velocity_u']``, ``['fm_alpha']``, ``['fm_beta']``, ``['fm_gamma']`` (velocity head),
``layers['fm_imputed_spliced']``, ``['fm_imputed_unspliced']`` (expression head), ``obsm['X_fm']`` and
``obsm['X_fm_fusion']`` (the first model's encoder), ``var['fm_in_vocab']``, ``var['velocity_genes']`` (only when
the input has none), ``uns['fm']`` (checkpoints, settings, what each field holds).

Legend: N cells, V genes of the input (var), M input genes in the vocabulary (the queries, in vocabulary order),
B cells of a batch, G gene tokens, Q a chunk of the queries, D width.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fm import keys
from fm.data.genes import GENE_ID_COLUMNS, GENE_SYMBOL_COLUMNS, map_onto
from fm.io import write_h5ad_atomic
from fm.progress import progress_bar

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp
    import torch

    from fm.checkpoint import Pretrained
    from fm.data.tokenize import CellBlock, TokenizerConfig
    from fm.data.vocab import GeneMapping, GeneVocab
    from fm.velocity.neighbours import NeighbourConfig, Neighbourhood

log = logging.getLogger(__name__)

QUERY_BUDGET = 1 << 27  # most attention-score elements (cells x queries x heads x keys) of one decoder call


# --- input -----------------------------------------------------------------------------------------------------------
def read_counts(adata: anndata.AnnData, source: str, allow_non_integer: bool = False) -> tuple[Any, Any]:
    """The spliced and unspliced count layers (CSR or dense ndarray), checked: present, shaped, and raw counts by
    the converter's rule (fm.data.counts: finite, >= 0, integer unless ``allow_non_integer``)."""
    import scipy.sparse as sp

    from fm.data.counts import check_counts

    out = []
    for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        if name not in adata.layers:
            raise ValueError(f"{source}: layers['{name}'] is missing (layers: {sorted(adata.layers)}); fm predict "
                             f"needs raw spliced and unspliced counts")
        x = adata.layers[name]
        x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
        if x.shape != adata.shape:
            raise ValueError(f"{source}: layers['{name}'] has shape {x.shape}, the AnnData is {adata.shape}")
        check_counts(x, f"{source}: layers['{name}']", allow_non_integer, cell_name=lambda r: adata.obs_names[r],
                     gene_name=lambda c: adata.var_names[c])
        out.append(x)
    return out[0], out[1]


@dataclass
class GeneMap:
    """The input's genes on the vocabulary: the in-vocabulary columns in vocabulary order, and the report."""

    columns_M: np.ndarray  # int64, input var columns of the matched genes, by increasing vocabulary index
    vocab_ids_M: np.ndarray  # int64, their vocabulary indices (increasing)
    in_vocab_V: np.ndarray  # bool
    mapping: GeneMapping
    field: str  # where the names came from, e.g. "var['gene_id']"


def map_input_genes(adata: anndata.AnnData, vocab: GeneVocab, source: str) -> GeneMap:
    """Map the input's genes as the converter does: the first stable-id column, then symbols / var_names."""
    var = adata.var
    id_col = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
    sym_col = next((c for c in GENE_SYMBOL_COLUMNS if c in var.columns), None)
    ids = [str(g) for g in var[id_col]] if id_col else None
    symbols = [str(g) for g in (var[sym_col] if sym_col else var.index)]
    field_name = f"var[{id_col!r}]" if id_col else (f"var[{sym_col!r}]" if sym_col else "var_names")
    index_V, mapping = map_onto(vocab, ids, symbols)
    if mapping.n_matched == 0:
        raise ValueError(f"{source}: no gene in common with the vocabulary ({len(vocab)} genes, e.g. "
                         f"{', '.join(vocab.gene_ids[:3])}); genes read from {field_name}, e.g. "
                         f"{', '.join((ids or symbols)[:3])}")
    columns = np.flatnonzero(index_V >= 0)
    columns = columns[np.argsort(index_V[columns], kind="stable")]
    return GeneMap(columns, index_V[columns], index_V >= 0, mapping, field_name)


def cell_block(s, u, a: int, b: int, genes: GeneMap, cell_ids: Sequence[str], size_factor: np.ndarray | None,
               moments: tuple[sp.csr_matrix, sp.csr_matrix] | None = None) -> CellBlock:
    """Cells ``a:b`` as a CellBlock over their in-vocabulary genes with s + u > 0, the corpus's rule
    (fm.data.counts.stored_entries), with their ``moments`` [N, M] in the corpus's units when given."""
    import scipy.sparse as sp

    from fm.data.counts import stored_entries
    from fm.data.tokenize import CellBlock

    def rows(x) -> sp.csr_matrix:
        return sp.csr_matrix(x[a:b], dtype=np.float64)[:, genes.columns_M]

    c, ms_N, mu_N = stored_entries(rows(s), rows(u), None if moments is None else tuple(m[a:b] for m in moments))
    n = b - a
    cell_of_N = np.repeat(np.arange(n), np.diff(c.indptr))
    nan_B = np.full(n, np.nan, np.float32)
    return CellBlock(
        offsets_B1=c.indptr.astype(np.int64),
        gene_index_N=genes.vocab_ids_M[c.indices].astype(np.int32),
        spliced_N=c.data.real.astype(np.float32),
        unspliced_N=c.data.imag.astype(np.float32),
        velocity_N=None,
        velocity_u_N=None,
        library_size_spliced_B=np.bincount(cell_of_N, c.data.real, n).astype(np.float32),
        library_size_unspliced_B=np.bincount(cell_of_N, c.data.imag, n).astype(np.float32),
        size_factor_B=nan_B if size_factor is None else size_factor[a:b].astype(np.float32),
        time_B=nan_B,
        cell_id=list(cell_ids[a:b]),
        dataset_id=["input"] * n,
        cell_type=[None] * n,
        ms_N=ms_N,
        mu_N=mu_N,
    )


def tokenizer_for(model: Pretrained, max_genes: int | None) -> TokenizerConfig:
    """The release's tokenizer settings, made deterministic and per cell (gene_set=cell, top_expressed)."""
    from fm.data.tokenize import TokenizerConfig

    recorded = model.config.get("tokenizer")
    if not recorded:
        log.warning("%s: config.json records no tokenizer settings; using fm's defaults", model.path)
    cfg = TokenizerConfig(**(recorded or {}))
    if cfg.gene_set != "cell":
        log.warning("%s: trained with gene_set=%r; predicting with gene_set='cell' (each cell its own genes, "
                    "as fine-tuning does, and independent of the batch)", model.path, cfg.gene_set)
    return replace(cfg, gene_set="cell", gene_sampling="top_expressed",
                   max_genes=cfg.max_genes if max_genes is None else max_genes)


# --- what each model writes ------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    model: Pretrained
    tokenizer: TokenizerConfig
    layers: dict[str, str] = field(default_factory=dict)  # head output -> layer
    obs: dict[str, str] = field(default_factory=dict)  # per-cell head output -> obs column

    @property
    def moments(self) -> bool:
        """The model was trained on a corpus with moments: its tokens carry them (B_MS, B_MU)."""
        return bool(self.model.config.get("neighbourhood"))

    @property
    def targets(self) -> tuple[str, ...]:
        return (keys.B_MS, keys.B_MU) if self.moments else ()


def _plans(models: list[Pretrained], max_genes: int | None) -> list[_Plan]:
    """Each model's tokenizer and the layers its head declares (Head.predict_layers); no layer written twice."""
    plans, owner = [], {}
    for i, model in enumerate(models):
        # a baseline models every vocabulary gene densely: every stored gene of a cell must be a token
        plan = _Plan(model, tokenizer_for(model, max_genes if model.encoder is not None else len(model.vocab)))
        if model.head is not None:
            plan.layers = {name: out.layer for name, out in model.head.predict_layers().items()}
            plan.obs = {name: out.layer for name, out in model.head.predict_obs().items()}
            if not plan.layers:
                log.warning("%s: a %s head; fm predict writes no layer for it%s", model.path, model.head_name,
                            " (the embedding only)" if i == 0 else " (nothing)")
        elif i > 0:
            log.warning("%s: no head and not the first model; it contributes nothing", model.path)
        for layer in plan.layers.values():
            if layer in owner:
                raise ValueError(f"{model.path} and {owner[layer]} both write layers['{layer}']; pass one of them")
            owner[layer] = model.path
        plans.append(plan)
    return plans


def neighbourhood_for(plans: list[_Plan]) -> tuple[NeighbourConfig, bool]:
    """The neighbourhood the releases were trained with (and True), or, when none records one, fm's defaults in the
    first release's normalisation (and False: the moments are then written for scVelo but not shown to a model)."""
    from fm.velocity.neighbours import NeighbourConfig

    recorded = {p.model.path: p.model.config["neighbourhood"] for p in plans if p.moments}
    if len({str(sorted(r.items())) for r in recorded.values()}) > 1:
        raise ValueError(f"the releases were trained on different neighbourhoods ({recorded}); predict with each "
                         "separately")
    if recorded:
        return NeighbourConfig(**next(iter(recorded.values()))), True
    tok = plans[0].tokenizer
    return NeighbourConfig(normalization=tok.normalization, target_sum=tok.target_sum), False


def _layer_docs(plans: list[_Plan]) -> dict[str, str]:
    return {out.layer: out.doc for plan in plans if plan.model.head is not None
            for out in plan.model.head.predict_layers().values()}


def _check_free(adata: anndata.AnnData, plans: list[_Plan], source: str, overwrite: bool) -> None:
    wanted = [("layers", layer) for plan in plans for layer in plan.layers.values()]
    wanted += [("obsm", keys.OBSM_EMBEDDING), ("obsm", keys.OBSM_FUSION), ("var", keys.VAR_FM_IN_VOCAB),
               ("uns", keys.UNS_FM), ("layers", keys.LAYER_MS), ("layers", keys.LAYER_MU)]
    taken = [f"{where}['{name}']" for where, name in wanted
             if name in (adata.var.columns if where == "var" else getattr(adata, where))]
    if taken and not overwrite:
        raise ValueError(f"{source}: already holds {', '.join(taken)} (an earlier fm predict?); pass overwrite=True "
                         "(--overwrite) to replace them")


# --- the input's neighbourhood --------------------------------------------------------------------------------------
def moment_docs(log1p: bool) -> dict[str, str]:
    """What ``layers['Ms']``/``['Mu']`` hold: the units of the velocity, log1p'd as the model's inputs or not."""
    how = "normalised and log1p'd as the model's inputs" if log1p else "normalised (counts per target_sum of library)"
    return {
        keys.LAYER_MS: f"first-order moment of spliced over the cell's neighbours (fm.velocity.neighbours), {how}: the "
                       "units of layers['velocity'], so scVelo's velocity_graph reads both as they are; NaN outside "
                       "the vocabulary",
        keys.LAYER_MU: "the same for unspliced",
    }


GRAPH_FIELDS = (("obsp", "distances"), ("obsp", "connectivities"), ("uns", "neighbors"), ("obsm", "X_pca"))


def input_neighbourhood(s, u, genes: GeneMap, cfg: NeighbourConfig, size_factor: np.ndarray | None, source: str,
                        required: bool) -> Neighbourhood | None:
    """The input's neighbourhood over its in-vocabulary genes, moments in the corpus's units (docs/FORMAT.md).

    None, with a warning, when it cannot be computed (e.g. fewer cells than neighbours) and the releases do not need
    it; an error when they were trained on moments.
    """
    import scipy.sparse as sp

    from fm.velocity.neighbours import NeighbourhoodError, attach_cells_without_counts, neighbourhood

    s_M, u_M = (sp.csr_matrix(x)[:, genes.columns_M] for x in (s, u))
    # as conversion (data_prep.neighbourhoods): a cell without counts has no place in expression space; it is left
    # out of the graph and gets zero moments
    has = np.flatnonzero(np.asarray(s_M.sum(1)).ravel() + np.asarray(u_M.sum(1)).ravel() > 0)
    if 2 < len(has) <= cfg.n_neighbours:  # a small input: every other cell is a neighbour
        log.warning("%s: %d cells with counts, fewer than n_neighbours + 1 = %d; moments over %d neighbours",
                    source, len(has), cfg.n_neighbours + 1, len(has) - 1)
        cfg = replace(cfg, n_neighbours=len(has) - 1)
    try:
        nb, _, _ = neighbourhood(s_M[has], u_M[has], cfg, None if size_factor is None else size_factor[has],
                                 where=source, dense=False)
    except NeighbourhoodError as e:
        if required:
            raise ValueError(f"{e} (the release was trained on moments over {cfg.n_neighbours} neighbours)") from e
        log.warning("%s; no moments or neighbours graph are written", e)
        return None
    if cfg.normalization == "total":  # the corpus stores fractions of the library; the tokenizer scales them
        nb.Ms, nb.Mu = nb.Ms / np.float32(cfg.target_sum), nb.Mu / np.float32(cfg.target_sum)
    if len(has) < s_M.shape[0]:  # back onto every input cell
        nb = attach_cells_without_counts(nb, has, s_M.shape[0], cfg.n_neighbours)
    return nb


def write_neighbourhood(out: anndata.AnnData, adata: anndata.AnnData, nb: Neighbourhood | None, cfg: NeighbourConfig,
                        genes: GeneMap, tokenizer: TokenizerConfig, log1p: bool = True) -> bool:
    """``layers['Ms']``/``['Mu']`` in the velocity's units and, when the input has no neighbours graph of its own,
    scanpy's graph fields (True when written): what scVelo's velocity_graph and stream plots read."""
    from fm.data.tokenize import moment_scale
    from fm.velocity.teachers import scanpy_neighbors_uns

    if nb is None:
        return False
    for layer, m in ((keys.LAYER_MS, nb.Ms), (keys.LAYER_MU, nb.Mu)):
        full = np.full(out.shape, np.nan, np.float32)
        x = m.toarray() * np.float32(moment_scale(tokenizer))
        full[:, genes.columns_M] = np.log1p(x) if log1p else x
        out.layers[layer] = full
    theirs = [f"{where}['{name}']" for where, name in GRAPH_FIELDS if name in getattr(adata, where)]
    if theirs:
        log.info("the input has its own %s: kept (fm's moments used fm's graph)", ", ".join(theirs))
        return False
    out.obsp["distances"], out.obsp["connectivities"] = nb.distances, nb.connectivities
    out.uns["neighbors"] = scanpy_neighbors_uns(cfg)
    out.obsm["X_pca"] = nb.X_pca
    return True


# --- the model on a batch --------------------------------------------------------------------------------------------
def query_tokens(ids_BG: torch.Tensor, mask_BG: torch.Tensor, query_Q: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Position of each query gene's token among a batch's sorted tokens, -1 where the cell has no such token."""
    import torch

    sorted_BG = torch.where(mask_BG, ids_BG, torch.full_like(ids_BG, vocab_size))  # padding sorts last
    query_BQ = query_Q[None, :].expand(ids_BG.shape[0], -1).contiguous()
    pos_BQ = torch.searchsorted(sorted_BG, query_BQ).clamp_(max=ids_BG.shape[1] - 1)
    hit_BQ = sorted_BG.gather(1, pos_BQ) == query_BQ
    return torch.where(hit_BQ, pos_BQ, torch.full_like(pos_BQ, -1))


def dense_values(block: CellBlock, cfg: TokenizerConfig, vocab_to_m: np.ndarray, M: int,
                 targets: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Normalised log1p spliced / unspliced values [B, M] of every in-vocabulary gene (0 for a zero count), and of
    the moments in ``targets`` (B_MS, B_MU).

    Tokenised with the same code and settings as the encoder's input, keeping every stored gene, so a gene the
    encoder does not see (beyond max_genes) still gets its value.
    """
    from fm.data.tokenize import tokenize_block

    longest = int(np.diff(block.offsets_B1).max(initial=1))
    full = tokenize_block(block, replace(cfg, max_genes=max(longest, 1)), np.random.default_rng(0), targets=targets)
    mask_BG = full[keys.B_GENE_MASK].numpy()
    rows, cols = np.nonzero(mask_BG)
    m = vocab_to_m[full[keys.B_GENE_IDS].numpy()[rows, cols]]
    out = {}
    for key in (keys.B_SPLICED, keys.B_UNSPLICED, *targets):
        dense_BM = np.zeros((len(block), M), np.float32)
        dense_BM[rows, m] = full[key].numpy()[rows, cols]
        out[key] = dense_BM
    return out


def _query_chunk(B: int, L: int, n_heads: int, D: int) -> int:
    return max(1, QUERY_BUDGET // max(1, B * (n_heads * L + 4 * D)))


def _run_head(plan: _Plan, tensors: dict, enc, block: CellBlock, genes: GeneMap, vocab_to_m: np.ndarray,
              out: dict[str, np.ndarray], a: int, b: int) -> None:
    """Query every in-vocabulary gene of cells a:b in chunks; write the head's outputs into ``out``'s layers.

    A head's outputs are written chunk by chunk, unless it declares outputs to gather over all of a cell's genes
    first (``predict_gathered``); its ``predict_reduce`` then makes the layers from them.
    """
    import torch

    from fm.heads.expression import GeneQuery

    head, dev = plan.model.head, enc.z_global.device
    M = len(genes.vocab_ids_M)
    values = {k: torch.from_numpy(v).to(dev)
              for k, v in dense_values(block, plan.tokenizer, vocab_to_m, M, plan.targets).items()}
    state = (keys.B_MS, keys.B_MU) if plan.moments else (keys.B_SPLICED, keys.B_UNSPLICED)  # the kinetic state
    query_M = torch.from_numpy(genes.vocab_ids_M).to(dev)
    ids_BG, mask_BG = tensors[keys.B_GENE_IDS], tensors[keys.B_GENE_MASK].bool()
    B, G = ids_BG.shape
    D = enc.z_global.shape[-1]
    step = _query_chunk(B, 2 * G + enc.h_fusion.shape[1], head.config.n_heads, D)
    gathered = {name: np.empty((B, M), np.float32) for name in head.predict_gathered()}
    for j0 in range(0, M, step):
        j1 = min(j0 + step, M)
        q_Q = query_M[j0:j1]
        query = GeneQuery(
            gene_ids_BQ=q_Q[None, :].expand(B, -1),
            token_BQ=query_tokens(ids_BG, mask_BG, q_Q, plan.model.encoder.cfg.vocab_size),
            mask_BQ=torch.ones(B, j1 - j0, dtype=torch.bool, device=dev),
            spliced_BQ=values[state[0]][:, j0:j1],
            unspliced_BQ=values[state[1]][:, j0:j1],
        )
        pred = head(tensors, enc, query=query)
        cols = genes.columns_M[j0:j1]
        if gathered:
            for name, gathered_BM in gathered.items():
                gathered_BM[:, j0:j1] = pred[name].float().cpu().numpy()
            continue
        for name, layer in plan.layers.items():
            out[layer][a:b, cols] = pred[name].float().cpu().numpy()
        if j0 == 0:  # per-cell outputs: the same in every chunk
            for name, column in plan.obs.items():
                out[column][a:b] = pred[name].float().cpu().numpy()
    if gathered:
        reduced = head.predict_reduce({k: torch.from_numpy(v) for k, v in gathered.items()}, tensors)  # on the CPU
        for name, layer in plan.layers.items():
            out[layer][a:b, genes.columns_M] = reduced[name].float().numpy()


def _h5ad_safe(value):
    """uns values h5ad can write: None -> 'none', tuples -> lists, nested dicts converted."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_h5ad_safe(v) for v in value]
    return "none" if value is None else value


# --- predict ---------------------------------------------------------------------------------------------------------
def predict(models: Pretrained | Sequence[Pretrained], adata: anndata.AnnData, *, batch_size: int = 256,
            device: str | torch.device | None = None, max_genes: int | None = None, progress: bool = True,
            overwrite: bool = False, source: str | None = None, allow_non_integer: bool = False
            ) -> anndata.AnnData:
    """Run one or more releases on an AnnData; return a copy with their outputs added (the input is not changed).

    Args:
        models: a :class:`fm.checkpoint.Pretrained` or several (e.g. a velocity and an expression release of one
            vocabulary); each writes its head's layers, the first also the embedding.
        adata: raw counts in ``layers['spliced']`` and ``layers['unspliced']`` (dense or sparse).
        batch_size: cells per forward pass.
        device: where the models run (they are moved there); None: where they are.
        max_genes: gene tokens per cell shown to the encoder (default: the release's tokenizer setting); a cell with
            more in-vocabulary genes with counts shows its top-expressed ones. Every gene is still predicted.
        progress: a rich progress bar over the cells.
        overwrite: replace outputs (layers, obsm, var, uns['fm']) the input already holds; else an error.
        source: how messages name the input (default "the AnnData").
        allow_non_integer: accept non-integer counts (normalised or imputed data; the converter's
            ``--allow-non-integer``); by default they are refused, as the release was trained on raw counts.
    Returns:
        A new AnnData: the input's fields plus the outputs listed in the module docstring, their meaning and units in
        ``uns['fm']``.
    """
    import torch

    from fm import __version__
    from fm.checkpoint import Pretrained
    from fm.data.tokenize import tokenize_block

    models = [models] if isinstance(models, Pretrained) else list(models)
    source = source or "the AnnData"
    if not models or not all(isinstance(m, Pretrained) for m in models):
        raise TypeError("predict: models must be a Pretrained (fm.load_pretrained) or a non-empty list of them")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"predict: batch_size must be an int >= 1, got {batch_size!r}")
    vocab = models[0].vocab
    for m in models[1:]:
        if m.vocab.hash != vocab.hash:
            raise ValueError(f"{m.path}: another vocabulary than {models[0].path} (hash {m.vocab.hash[:12]}... vs "
                             f"{vocab.hash[:12]}...); predict with each separately")
    N, V = adata.shape
    if N == 0:
        raise ValueError(f"{source}: no cells")
    s, u = read_counts(adata, source, allow_non_integer)
    genes = map_input_genes(adata, vocab, source)
    log.info("%s: %s (genes read from %s)", source, genes.mapping.summary(), genes.field)
    plans = _plans(models, max_genes)
    _check_free(adata, plans, source, overwrite)
    size_factor = None
    if any(p.tokenizer.normalization == "size_factor" for p in plans):  # (the neighbourhood then too)
        if keys.SIZE_FACTOR not in adata.obs:
            raise ValueError(f"{source}: obs['{keys.SIZE_FACTOR}'] is missing; the release normalises by size factors")
        size_factor = np.asarray(adata.obs[keys.SIZE_FACTOR], dtype=np.float32)
    if device is not None:
        for m in models:
            m.to(device)
    for m in models:
        for module in (m.encoder, m.head):  # a baseline's release has no encoder, a pretrained one no head
            if module is not None:
                module.eval()

    nb_cfg, nb_used = neighbourhood_for(plans)
    nb = input_neighbourhood(s, u, genes, nb_cfg, size_factor, source, required=nb_used)

    M = len(genes.vocab_ids_M)
    vocab_to_m = np.full(len(vocab), -1, np.int64)
    vocab_to_m[genes.vocab_ids_M] = np.arange(M)
    layers = {layer: np.full((N, V), np.nan, np.float32) for p in plans for layer in p.layers.values()}
    obs = {column: np.full(N, np.nan, np.float32) for p in plans for column in p.obs.values()}
    embedding, fusion = None, None
    cell_ids = [str(c) for c in adata.obs_names]
    n_empty = n_truncated = 0
    rng = np.random.default_rng(0)  # unused: top_expressed sampling draws nothing
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task("fm predict", total=N)
        for a in range(0, N, batch_size):
            b = min(a + batch_size, N)
            block = cell_block(s, u, a, b, genes, cell_ids, size_factor, None if nb is None or not nb_used
                               else (nb.Ms, nb.Mu))
            lens_B = np.diff(block.offsets_B1)
            n_empty += int((lens_B == 0).sum())
            n_truncated += int((lens_B > plans[0].tokenizer.max_genes).sum())
            for i, plan in enumerate(plans):
                if i > 0 and not plan.layers:
                    continue
                dev = plan.model.device
                batch = tokenize_block(block, plan.tokenizer, rng, targets=plan.targets)
                tensors = {k: v.to(dev) for k, v in batch.items() if torch.is_tensor(v)}
                if plan.model.encoder is None:  # a baseline: the head alone on the batch, [B, V] over the vocabulary
                    pred = plan.model.head({**batch, **tensors}, None)
                    for name, layer in plan.layers.items():
                        layers[layer][a:b, genes.columns_M] = pred[name][:, genes.vocab_ids_M].float().cpu().numpy()
                    continue
                enc = plan.model.encoder(tensors)
                if i == 0:
                    if embedding is None:
                        embedding = np.empty((N, enc.z_global.shape[-1]), np.float32)
                        fusion = np.empty((N, enc.z_fusion.shape[-1]), np.float32)
                    embedding[a:b] = enc.z_global.float().cpu().numpy()
                    fusion[a:b] = enc.z_fusion.float().cpu().numpy()
                if plan.layers:
                    _run_head(plan, tensors, enc, block, genes, vocab_to_m, {**layers, **obs}, a, b)
            bar.advance(task, b - a)
    if n_empty:
        log.warning("%s: %d of %d cells have no count in any vocabulary gene; their outputs come from the fusion "
                    "tokens alone", source, n_empty, N)
    if n_truncated:
        log.info("%s: %d cells have more than max_genes=%d in-vocabulary genes with counts; the encoder sees their "
                 "top-expressed ones (every gene is still predicted)", source, n_truncated,
                 plans[0].tokenizer.max_genes)

    out = adata.copy()
    for layer, values in layers.items():
        out.layers[layer] = values
    for column, values in obs.items():
        out.obs[column] = values
    if embedding is not None:  # the first model has an encoder (a baseline's release has none)
        out.obsm[keys.OBSM_EMBEDDING] = embedding
        out.obsm[keys.OBSM_FUSION] = fusion
    out.var[keys.VAR_FM_IN_VOCAB] = genes.in_vocab_V
    units = {getattr(p.model.head, "moment_units", "log1p") for p in plans if keys.LAYER_VELOCITY in p.layers.values()}
    wrote_graph = write_neighbourhood(out, adata, nb, nb_cfg, genes, plans[0].tokenizer,
                                      log1p=units != {"normalised"})
    wrote_velocity_genes = keys.LAYER_VELOCITY in layers and keys.VAR_VELOCITY_GENES not in adata.var.columns
    if wrote_velocity_genes:  # in the vocabulary, with a velocity in every cell (a dynamical head: the fitted genes)
        out.var[keys.VAR_VELOCITY_GENES] = genes.in_vocab_V & np.isfinite(layers[keys.LAYER_VELOCITY]).all(0)
    mapping = genes.mapping
    out.uns[keys.UNS_FM] = _h5ad_safe({
        "fm_version": __version__,
        "checkpoints": [str(p.model.path) for p in plans],
        "heads": [p.model.head_name or "none" for p in plans],
        "vocab_hash": vocab.hash,
        "models": {str(i): {"checkpoint": str(p.model.path), "head": p.model.head_name,
                            "head_config": (p.model.config.get("head") or {}).get("config"),
                            "tokenizer": asdict(p.tokenizer)} for i, p in enumerate(plans)},
        "genes": {"field": genes.field, "n_input": V, "n_matched": mapping.n_matched, "n_by_id": mapping.n_by_id,
                  "n_by_symbol": mapping.n_by_symbol, "unmatched_examples": mapping.unmatched[:20]},
        "gene_selection": "gene_set=cell; a cell with more than max_genes in-vocabulary genes with counts shows the "
                          "encoder its top-expressed (s + u) max_genes; every in-vocabulary gene is predicted, one "
                          "the encoder did not see with own-state zero",
        "neighbourhood": {**nb_cfg.to_dict(), "shown_to_the_model": nb_used, "computed": nb is not None,
                          "graph_written": wrote_graph},
        "n_cells_truncated": n_truncated,
        "n_cells_without_counts": n_empty,
        "layers": {**_layer_docs(plans), **(moment_docs(units != {"normalised"}) if nb is not None else {})},
        "obs": {out.layer: out.doc for p in plans if p.model.head is not None
                for out in p.model.head.predict_obs().values()},
        "obsm": {keys.OBSM_EMBEDDING: "the first model's encoder z_global (cell summary)",
                 keys.OBSM_FUSION: "the first model's encoder z_fusion (mean fusion token)"} if embedding is not None
        else {},
        "var": {keys.VAR_FM_IN_VOCAB: "the gene maps onto the vocabulary (outputs are NaN elsewhere)",
                **({keys.VAR_VELOCITY_GENES: "fm_in_vocab and a finite velocity in every cell (written because the "
                                             "input had none)"}
                   if wrote_velocity_genes else {})},
    })
    return out


# --- command line ----------------------------------------------------------------------------------------------------
def read_input(path: Path) -> anndata.AnnData:
    """The input ``.h5ad``; an empty, truncated or non-AnnData file is a one-line ValueError naming it (as the
    converter's), not h5py's traceback."""
    import anndata

    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as e:  # h5py's and anndata's ways of finding a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable .h5ad (HDF5) file ({reason}); truncated or not an AnnData?") from e


def check_paths(inp: Path, out: Path, out_flag: str, overwrite: bool) -> None:
    """A command's input exists; its output is not the input, and exists only when ``overwrite``."""
    if not inp.is_file():
        raise FileNotFoundError(f"{inp}: no such input file")
    if out.resolve() == inp.resolve():
        raise ValueError(f"{out}: is the input; will not overwrite the input (choose another {out_flag})")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    from fm.checkpoint import load_pretrained

    inp, out = Path(args.input), Path(args.output)
    check_paths(inp, out, "--output", args.overwrite)
    adata = read_input(inp)
    read_counts(adata, str(inp), args.allow_non_integer)  # bad input fails before the models load (predict rechecks)
    models = [load_pretrained(c, device=args.device or "cpu") for c in args.checkpoint]
    result = predict(models, adata, batch_size=args.batch_size, max_genes=args.max_genes,
                     overwrite=args.overwrite, source=str(inp), allow_non_integer=args.allow_non_integer)
    write_h5ad_atomic(result, out)
    g = result.uns[keys.UNS_FM]["genes"]
    written = [f"layers['{k}']" for k in result.uns[keys.UNS_FM]["layers"]] + [
        f"obsm['{k}']" for k in result.uns[keys.UNS_FM]["obsm"]]
    print(f"fm predict: wrote {out} ({result.n_obs} cells; {g['n_matched']}/{g['n_input']} genes in the vocabulary, "
          f"read from {g['field']}, the others NaN): {', '.join(written)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="run released models on a .h5ad: velocity, rates, imputed expression, embeddings",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                   help="a release folder (fm export) or Hub id; repeat for several (the first gives the embedding)")
    p.add_argument("--input", required=True, metavar="H5AD", help="raw counts in layers spliced and unspliced")
    p.add_argument("--output", required=True, metavar="H5AD", help="where to write (never the input)")
    p.add_argument("--batch-size", type=int, default=256, help="cells per forward pass (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--max-genes", type=int, help="gene tokens per cell (default: the release's setting)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, and fm outputs the input already holds")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer counts (normalised data; refused by default, as by fm prep convert)")
    p.set_defaults(func=run)
    return p
