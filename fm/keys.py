"""Column, batch and output key names, in one place.

Every module that reads a corpus column, a batch entry or an AnnData field names it through these constants, so a
rename happens here and nowhere else.
"""

# --- Corpus columns (one row per cell; see docs/FORMAT.md) -------------------------------------------------------
CELL_ID = "cell_id"  # string, unique within its dataset
DATASET_ID = "dataset_id"  # string, the dataset the cell came from
GENE_INDEX = "gene_index"  # list<int32>, sorted unique vocabulary indices of the genes with s + u > 0
SPLICED = "spliced"  # list<float32>, spliced counts aligned with GENE_INDEX
UNSPLICED = "unspliced"  # list<float32>, unspliced counts aligned with GENE_INDEX
LIBRARY_SIZE_SPLICED = "library_size_spliced"  # float32, sum of SPLICED over the stored genes
LIBRARY_SIZE_UNSPLICED = "library_size_unspliced"  # float32, sum of UNSPLICED over the stored genes
# optional targets (null when the source has none)
VELOCITY = "velocity"  # list<float32>, ds/dt aligned with GENE_INDEX
VELOCITY_U = "velocity_u"  # list<float32>, du/dt aligned with GENE_INDEX
CELL_TYPE = "cell_type"  # string, cluster / cell-type label
TIME = "time"  # float32, (pseudo)time
SIZE_FACTOR = "size_factor"  # float32, a size factor given by the source (obs column)
# first-order moments over the dataset's neighbourhood (fm.velocity.neighbours), aligned with GENE_INDEX, in the
# dataset's normalisation: `total` as fractions of the library (counts / library size), `size_factor` counts / factor,
# `none` counts; null when conversion computed no neighbourhood
MS = "Ms"  # list<float32>, spliced moment
MU = "Mu"  # list<float32>, unspliced moment

LIST_COLUMNS = (GENE_INDEX, SPLICED, UNSPLICED, VELOCITY, VELOCITY_U, MS, MU)
GENE_VALUE_COLUMNS = (VELOCITY, VELOCITY_U, MS, MU)  # optional per-gene columns; a batch carries those a dataset fills

# --- AnnData fields (inputs and outputs in the layout scVelo and scanpy expect) ----------------------------------
LAYER_SPLICED = "spliced"
LAYER_UNSPLICED = "unspliced"
LAYER_VELOCITY = "velocity"  # scVelo's name for ds/dt
LAYER_MS = "Ms"  # scVelo's first-order moments, in the units velocity is given in
LAYER_MU = "Mu"
LAYER_VELOCITY_TRUE = "velocity_true"  # simulator ground truth ds/dt
LAYER_VELOCITY_U_TRUE = "velocity_u_true"  # simulator ground truth du/dt
LAYER_ALPHA_TRUE = "alpha_true"  # simulator per cell-gene transcription rate
OBS_TIME_TRUE = "time_true"
OBS_LINEAGE = "lineage"
OBS_CLUSTERS = "clusters"  # scVelo's default cluster key
OBS_LIBRARY_SIZE = "library_size"  # simulator: per-cell library-size factor (expected count = factor x noise-free)
UNS_SIMULATION = "simulation"  # simulator: every setting, the lineages and the un-jittered gene table
VAR_GENE_ID = "gene_id"  # stable gene id column in .var (the index holds the symbol when this is present)
VAR_BETA_TRUE = "beta_true"
VAR_GAMMA_TRUE = "gamma_true"
OBSM_EMBEDDING = "X_fm"
OBSM_SIM_EMBEDDING = "X_sim"
UNS_FM = "fm"
# outputs of fm predict (fm/predict.py; docs/RELEASE.md "Predict"): float32 cells x genes aligned to the input's var,
# NaN at genes outside the vocabulary
LAYER_VELOCITY_U = "velocity_u"  # predicted du/dt
LAYER_VELOCITY_CONFIDENCE = "velocity_confidence"  # per cell and gene, in (0, 1] (scVelo's and veloVI's name)
LAYER_ALPHA = "fm_alpha"  # predicted per cell-gene transcription rate
LAYER_BETA = "fm_beta"  # predicted per cell-gene splicing rate
LAYER_GAMMA = "fm_gamma"  # predicted per cell-gene degradation rate
LAYER_IMPUTED = {LAYER_SPLICED: "fm_imputed_spliced", LAYER_UNSPLICED: "fm_imputed_unspliced"}  # expression head
LAYER_IMPUTED_TOTAL = "fm_imputed_total"  # a baseline (scVI, scScope) fitted on spliced + unspliced
OBSM_FUSION = "X_fm_fusion"  # the encoder's mean fusion token
VAR_FM_IN_VOCAB = "fm_in_vocab"  # bool: the gene maps onto the model's vocabulary
VAR_VELOCITY_GENES = "velocity_genes"  # scVelo's genes-with-velocity flag (written only when the input has none)

# --- Batch keys (what the collator yields and the model reads) ---------------------------------------------------
# Shapes: B cells, G gene tokens per modality (padded).
B_GENE_IDS = "gene_ids"  # int64 [B, G], vocabulary index of each token (0 at padding)
B_GENE_MASK = "gene_mask"  # bool [B, G], True for real tokens, False for padding
B_SPLICED = "spliced"  # float32 [B, G], normalised log1p spliced value
B_UNSPLICED = "unspliced"  # float32 [B, G], normalised log1p unspliced value
B_SPLICED_COUNTS = "spliced_counts"  # float32 [B, G], raw spliced counts (for count likelihoods)
B_UNSPLICED_COUNTS = "unspliced_counts"  # float32 [B, G], raw unspliced counts
B_LIBRARY_SIZE_SPLICED = "library_size_spliced"  # float32 [B]
B_LIBRARY_SIZE_UNSPLICED = "library_size_unspliced"  # float32 [B]
B_VELOCITY = "velocity"  # float32 [B, G], optional target (NaN where unknown)
B_VELOCITY_U = "velocity_u"  # float32 [B, G], optional target
B_TIME = "time"  # float32 [B], optional (NaN where unknown)
B_CELL_TYPE = "cell_type"  # list[str | None], optional
B_CELL_ID = "cell_id"  # list[str]
B_DATASET_ID = "dataset_id"  # list[str]
B_MS = MS  # float32 [B, G], optional: the spliced moment, normalised and log1p'd as B_SPLICED (NaN where unknown)
B_MU = MU  # float32 [B, G], optional: the unspliced moment, as B_UNSPLICED
