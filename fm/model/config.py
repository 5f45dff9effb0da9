"""The Zorro encoder's config: one dataclass, checked on construction, with named presets.

    from fm.model.config import ZorroConfig
    cfg = ZorroConfig.from_name("debug", vocab_size=1000, attention="flex")

Presets (parameter counts at the preset's default vocabulary, from ``ZorroEncoder(cfg).num_parameters()``):
``debug`` (d 32, depth 2, about 0.05M, for tests), ``small`` (d 256, depth 6, about 10M at 20k genes) and ``base``
(d 768, depth 12, about 105M at 20k genes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ATTENTION_BACKENDS = ("sdpa", "flex", "blocks", "flash")
VALUE_ENCODINGS = ("continuous", "bins")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POOLINGS = ("attention", "mean")


@dataclass
class ZorroConfig:
    """Shape and choices of the Zorro encoder. Every field is recorded in checkpoints (``to_dict``)."""

    vocab_size: int = 1024  # rows of the gene-id embedding (corpus vocabulary size; index 0 is padding)
    d_model: int = 32  # token width D
    depth: int = 2  # number of transformer blocks
    n_heads: int = 2  # attention heads H; d_model must be divisible by n_heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * d_model (for swiglu, 2/3 of that, as in LLaMA)
    n_fusion: int = 4  # learned fusion tokens F, which read both modalities
    dropout: float = 0.0  # dropout on residual branches and embeddings (attention weights are never dropped,
    # so every backend computes the same function)
    attention: str = "sdpa"  # attention backend: sdpa (dense mask, reference) | flex (block-sparse)
    # | blocks (SDPA on the non-empty blocks; CPU training) | flash (GPU)
    flex_compile: bool = True  # flex: run the torch.compile'd kernel where torch has one (CUDA; CPU without grad)
    value_encoding: str = "continuous"  # continuous (MLP of the scalar) | bins (fixed edges over log1p space)
    n_bins: int = 51  # bins: number of bins; bin 0 holds values <= 0, the rest split (0, max_value] evenly
    max_value: float = 10.0  # bins: upper edge in log1p space; larger values fall in the last bin
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (Linear-GELU-Linear) | swiglu
    pooling: str = "attention"  # per-modality pooling: attention (CrossAttentionPooling, one learned query) | mean
    bias: bool = True  # biases in linear layers
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint) instead of
    # keeping its activations: ~1/3 more compute for a fraction of the activation memory. Not recorded in checkpoints
    # (it changes memory, not the function), so weights trained with it on load with it off and the reverse.

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ZorroConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for name in ("vocab_size", "d_model", "depth", "n_heads", "n_bins"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name,
                 "must be an int")
        need(self.vocab_size >= 2, "vocab_size", "must be >= 2 (index 0 is padding)")
        need(self.d_model > 0, "d_model", "must be > 0")
        need(self.depth >= 1, "depth", "must be >= 1")
        need(self.n_heads >= 1, "n_heads", "must be >= 1")
        need(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads={self.n_heads}")
        need(isinstance(self.n_fusion, int) and self.n_fusion >= 1, "n_fusion", "must be an int >= 1")
        need(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.attention in ATTENTION_BACKENDS, "attention",
             f"unknown backend; valid: {', '.join(ATTENTION_BACKENDS)}")
        need(self.value_encoding in VALUE_ENCODINGS, "value_encoding", f"valid: {', '.join(VALUE_ENCODINGS)}")
        need(self.n_bins >= 2, "n_bins", "must be >= 2")
        need(self.max_value > 0, "max_value", "must be > 0")
        need(self.norm in NORMS, "norm", f"valid: {', '.join(NORMS)}")
        need(self.mlp in MLPS, "mlp", f"valid: {', '.join(MLPS)}")
        need(self.pooling in POOLINGS, "pooling", f"valid: {', '.join(POOLINGS)}")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(isinstance(self.activation_checkpointing, bool), "activation_checkpointing", "must be a bool")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ZorroConfig:
        """A preset by name, with field overrides (e.g. ``vocab_size=`` the corpus vocabulary size)."""
        if name not in PRESETS:
            raise ValueError(f"unknown ZorroConfig preset {name!r}; valid: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ZorroConfig field(s) {sorted(unknown)} in overrides of preset {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        """The fields checkpoints record: all but :data:`RUNTIME_FIELDS` (how to run, not what is computed)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> ZorroConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ZorroConfig field(s) {sorted(unknown)}")
        return cls(**d)


RUNTIME_FIELDS = ("activation_checkpointing",)  # memory/compute choices left out of ``to_dict``

PRESETS: dict[str, dict] = {
    "debug": dict(vocab_size=1024, d_model=32, depth=2, n_heads=2, n_fusion=4),
    "small": dict(vocab_size=20_000, d_model=256, depth=6, n_heads=8, n_fusion=8),
    "base": dict(vocab_size=20_000, d_model=768, depth=12, n_heads=12, n_fusion=16),
}


def model_width(config: ZorroConfig) -> int:
    """D, the width of the encoder's outputs that heads read."""
    return int(config.d_model)


def encoder_flops(config: ZorroConfig, n_cells: int, n_genes: int, *, attention: str = "zorro") -> float:
    """Forward FLOPs of the encoder's blocks on a batch of ``n_cells`` x ``n_genes`` (padded) tokens per modality.

    Matmuls count 2 FLOPs per multiply-add. Attention counts the pairs the Zorro mask allows (each modality with
    itself, fusion queries with all: ``2G² + F·L`` per cell; ``attention="zorro"``), the work a block-sparse kernel
    does, or the dense ``L²`` grid (``"dense"``, what ``sdpa`` computes), or none (``"none"``: the matmuls only).
    Embeddings, pooling and heads are left out (a few % at ``small`` and ``base``). A training step is about 3x this
    (backward 2x), whatever activation checkpointing recomputes: the convention model FLOP utilisation (MFU) is
    quoted in.
    """
    D, F, G = config.d_model, config.n_fusion, n_genes
    L = 2 * G + F
    hidden = int(config.mlp_ratio * D)
    mlp = 2 * L * D * hidden * 2 if config.mlp == "gelu" else 2 * L * D * int(2 * hidden / 3) * 3
    projections = 2 * L * D * 4 * D  # qkv and output
    pairs = {"zorro": 2 * G * G + F * L, "dense": L * L, "none": 0}[attention]
    attention = 2 * 2 * pairs * D  # scores and weighted values
    return float(n_cells * config.depth * (projections + mlp + attention))
