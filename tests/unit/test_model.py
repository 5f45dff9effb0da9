"""The Zorro encoder: presets, config checks, backend parity (outputs and gradients), purity, no NaN."""

from pathlib import Path

import pytest
import torch

from fm import keys
from fm.model.config import PRESETS, ZorroConfig
from fm.model.zorro import EncoderOutput, ZorroEncoder
from tests.tolerance import assert_close_rounding

G = 24
LENGTHS = [24, 17, 0, 9, 24]  # ragged, one cell with no gene
Z_FIELDS = ("z_spliced", "z_unspliced", "z_fusion", "z_global")
ALL_FIELDS = (*Z_FIELDS, "h_spliced", "h_unspliced", "h_fusion")


def make_batch(seed=0, lengths=LENGTHS, n_genes=G, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(n_genes)[None] < torch.tensor(lengths)[:, None]
    ids = torch.randint(1, 1024, (B, n_genes), generator=g) * mask
    spliced = torch.log1p(torch.rand(B, n_genes, generator=g, dtype=dtype) * 20) * mask
    unspliced = torch.log1p(torch.rand(B, n_genes, generator=g, dtype=dtype) * 5) * mask
    unspliced[1] = 0.0  # a cell with no unspliced counts
    return {keys.B_GENE_IDS: ids, keys.B_GENE_MASK: mask, keys.B_SPLICED: spliced, keys.B_UNSPLICED: unspliced}


def encoder_terms(enc: ZorroEncoder) -> int:
    """Products summed along the encoder's path, for a rounding tolerance: the MLP's inner width, once per block."""
    return int(enc.cfg.mlp_ratio * enc.cfg.d_model) * enc.cfg.depth


def make_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("flex_compile", False)
    return ZorroEncoder(ZorroConfig.from_name("debug", **overrides))


# --- config and presets ------------------------------------------------------------------------------------------


def test_presets_build_with_expected_sizes():
    with torch.device("meta"):
        counts = {name: ZorroEncoder(ZorroConfig.from_name(name)).num_parameters() for name in PRESETS}
    assert counts["debug"] < 200_000
    assert 8e6 < counts["small"] < 14e6
    assert 90e6 < counts["base"] < 120e6


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(attention="xformers"), "attention"),
        (dict(value_encoding="fourier"), "value_encoding"),
        (dict(norm="batchnorm"), "norm"),
        (dict(n_fusion=0), "n_fusion"),
        (dict(depth=1.5), "depth"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ZorroConfig.{field}"):
        ZorroConfig.from_name("debug", **overrides)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sdpa, flex, blocks, flash"):
        ZorroConfig(attention="xformers")


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="debug, small, base"):
        ZorroConfig.from_name("huge")
    with pytest.raises(ValueError, match="d_modle"):
        ZorroConfig.from_name("debug", d_modle=64)


def test_config_round_trips_through_dict():
    cfg = ZorroConfig.from_name("small", vocab_size=777, attention="flex")
    assert ZorroConfig.from_dict(cfg.to_dict()) == cfg


def test_state_dict_keys_do_not_depend_on_the_backend():
    key_sets = [set(make_encoder(attention=a).state_dict()) for a in ("sdpa", "flex", "blocks", "flash")]
    assert key_sets[0] == key_sets[1] == key_sets[2]


# --- forward -----------------------------------------------------------------------------------------------------


def test_output_shapes_and_api():
    enc = make_encoder()
    out = enc(make_batch())
    B, D, Fu = len(LENGTHS), enc.cfg.d_model, enc.cfg.n_fusion
    assert isinstance(out, EncoderOutput)
    for f in Z_FIELDS:
        assert getattr(out, f).shape == (B, D)
    assert out.h_spliced.shape == out.h_unspliced.shape == (B, G, D)
    assert out.h_fusion.shape == (B, Fu, D)
    assert torch.equal(out.gene_mask, make_batch()[keys.B_GENE_MASK])
    assert isinstance(enc.gene_embedding, torch.nn.Embedding) and enc.gene_embedding.num_embeddings == 1024
    assert (out.h_spliced[~out.gene_mask] == 0).all()


def run_with_grads(enc, batch):
    """Outputs, input-value gradients and parameter gradients of a scalar touching every output."""
    batch = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in batch.items()}
    out = enc(batch)
    loss = sum((getattr(out, f) * torch.linspace(-1, 1, getattr(out, f).shape[-1])).sum() for f in ALL_FIELDS)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    for k in (keys.B_SPLICED, keys.B_UNSPLICED):
        if batch[k].grad is not None:  # None with binned values
            grads[f"input.{k}"] = batch[k].grad
    return out, grads


@pytest.mark.parametrize("backend", ["flex", "blocks"])
@pytest.mark.parametrize("value_encoding", ["continuous", "bins"])
def test_backend_matches_sdpa_outputs_and_gradients(backend, value_encoding):
    results = {}
    for name in ("sdpa", backend):
        enc = make_encoder(attention=name, value_encoding=value_encoding).double()
        results[name] = run_with_grads(enc, make_batch(dtype=torch.float64))
    (out_s, grad_s), (out_f, grad_f) = results["sdpa"], results[backend]
    for f in ALL_FIELDS:
        a, b = getattr(out_s, f), getattr(out_f, f)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=f)
    assert grad_s.keys() == grad_f.keys()
    for name in grad_s:
        assert torch.isfinite(grad_s[name]).all() and torch.isfinite(grad_f[name]).all(), name
        torch.testing.assert_close(grad_f[name], grad_s[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(dropout):
    """Recomputing each block in backward runs the same kernels on the same inputs (and the same dropout masks:
    checkpoint restores the RNG state), so outputs and gradients are bit-identical."""
    results = []
    for on in (False, True):
        enc = make_encoder(activation_checkpointing=on, dropout=dropout)
        torch.manual_seed(1)
        results.append(run_with_grads(enc, make_batch()))
    (out_a, grad_a), (out_b, grad_b) = results
    for f in ALL_FIELDS:
        assert torch.equal(getattr(out_b, f), getattr(out_a, f)), f
    assert grad_a.keys() == grad_b.keys()
    for name in grad_a:
        assert torch.equal(grad_b[name], grad_a[name]), name


def _saved_activation_bytes(enc: ZorroEncoder, batch: dict) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded), as saved-tensor hooks see them.

    Under checkpointing, what a block keeps is hidden from these hooks (checkpoint installs its own): only the
    block's input, which the caller adds."""
    params = {p.data_ptr() for p in enc.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(batch)
    return sum(seen.values())


def test_activation_checkpointing_keeps_at_least_3x_less_on_small():
    B, G = 2, 64
    batch = make_batch(lengths=[G] * B, n_genes=G)
    kept = {}
    for on in (False, True):
        torch.manual_seed(0)
        enc = ZorroEncoder(ZorroConfig.from_name("small", activation_checkpointing=on))
        kept[on] = _saved_activation_bytes(enc, batch)
    L, D = 2 * G + enc.cfg.n_fusion, enc.cfg.d_model
    kept[True] += enc.cfg.depth * B * L * D * 4  # each block's input, held by checkpoint for the recompute
    assert kept[False] >= 3 * kept[True], kept


def test_activation_checkpointing_is_not_recorded_and_is_on_in_base():
    import yaml

    from fm.model.config import RUNTIME_FIELDS

    cfg = ZorroConfig.from_name("debug", activation_checkpointing=True)
    assert "activation_checkpointing" in RUNTIME_FIELDS and "activation_checkpointing" not in cfg.to_dict()
    assert ZorroConfig.from_dict(cfg.to_dict()).activation_checkpointing is False  # a release loads without it
    with open(Path(__file__).parents[2] / "configs" / "model" / "base.yaml") as f:
        assert yaml.safe_load(f)["activation_checkpointing"] is True


def test_float32_no_nan_and_cell_without_genes_is_zero():
    out, grads = run_with_grads(make_encoder(attention="sdpa"), make_batch())
    for f in ALL_FIELDS:
        assert torch.isfinite(getattr(out, f)).all(), f
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert (out.z_spliced[2] == 0).all() and (out.z_unspliced[2] == 0).all()  # cell 2 has no gene


@pytest.mark.parametrize("backend", ["sdpa", "flex", "blocks"])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_modalities_are_pure(backend, pooling):
    enc = make_encoder(attention=backend, pooling=pooling).eval()
    base = make_batch()
    with torch.no_grad():
        ref = enc(base)
        mask = base[keys.B_GENE_MASK]
        other_u = enc({**base, keys.B_UNSPLICED: (make_batch(seed=1)[keys.B_UNSPLICED] + 0.5) * mask})
        other_s = enc({**base, keys.B_SPLICED: (make_batch(seed=2)[keys.B_SPLICED] + 0.5) * mask})
    torch.testing.assert_close(other_u.h_spliced, ref.h_spliced, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_u.z_spliced, ref.z_spliced, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_s.h_unspliced, ref.h_unspliced, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_s.z_unspliced, ref.z_unspliced, rtol=0, atol=1e-6)
    # fusion tokens read both modalities (cell 2 has no gene, so nothing to read there)
    real = torch.tensor(LENGTHS) > 0
    assert ((other_u.z_fusion - ref.z_fusion).abs().amax(-1)[real] > 1e-4).all()
    assert ((other_s.z_fusion - ref.z_fusion).abs().amax(-1)[real] > 1e-4).all()
    assert ((other_u.z_unspliced - ref.z_unspliced).abs().amax(-1)[real] > 1e-4).all()


@pytest.mark.parametrize("backend", ["sdpa", "flex", "blocks"])
def test_padding_values_change_nothing(backend):
    enc = make_encoder(attention=backend).eval()
    base = make_batch()
    pad = ~base[keys.B_GENE_MASK]
    noisy = dict(base)
    noisy[keys.B_SPLICED] = base[keys.B_SPLICED].masked_fill(pad, 7.0)
    noisy[keys.B_UNSPLICED] = base[keys.B_UNSPLICED].masked_fill(pad, -3.0)
    noisy[keys.B_GENE_IDS] = base[keys.B_GENE_IDS].masked_fill(pad, 5)
    with torch.no_grad():
        a, b = enc(base), enc(noisy)
    for f in ALL_FIELDS:
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=0, atol=1e-6, msg=f)


def test_cell_is_independent_of_its_batch_and_padding_width():
    enc = make_encoder().eval()
    full = make_batch()
    with torch.no_grad():
        a = enc(full)
        alone = enc({k: v[3:4, :12] for k, v in full.items()})  # cell 3 has 9 genes
    # another batch shape blocks the matmuls differently: equal up to the rounding of each block's longest reduction
    assert_close_rounding(alone.z_global[0], a.z_global[3], terms=encoder_terms(enc))


def test_rmsnorm_swiglu_bins_variant_runs():
    enc = make_encoder(norm="rmsnorm", mlp="swiglu", value_encoding="bins", dropout=0.1)
    out = enc(make_batch())
    out.z_global.sum().backward()
    assert torch.isfinite(out.z_global).all()


def test_flash_without_the_package_names_it():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    enc = make_encoder(attention="flash")
    with pytest.raises(ImportError, match="flash-attn"):
        enc(make_batch())


def _cuda_encoders(backend, **overrides):
    sdpa = make_encoder(attention="sdpa", **overrides).cuda()
    other = make_encoder(attention=backend, **overrides).cuda()
    other.load_state_dict(sdpa.state_dict())
    return sdpa, other


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_backend_matches_sdpa(backend):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    sdpa, other = _cuda_encoders(backend, flex_compile=True)
    batch = {k: v.cuda() for k, v in make_batch(lengths=[300, 170, 0, 90, 257], n_genes=300).items()}
    results = []
    for enc in (sdpa, other):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc(batch)
            loss = sum(getattr(out, f).float().square().mean() for f in ALL_FIELDS)
        loss.backward()
        results.append((out, {n: p.grad.float().clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (out_a, grad_a), (out_b, grad_b) = results
    for f in ALL_FIELDS:
        assert torch.isfinite(getattr(out_b, f)).all(), f
        torch.testing.assert_close(getattr(out_b, f).float(), getattr(out_a, f).float(), rtol=5e-2, atol=5e-2, msg=f)
    for name in grad_a:
        assert torch.isfinite(grad_b[name]).all(), name
        scale = grad_a[name].abs().max().clamp(min=1e-6)
        assert ((grad_b[name] - grad_a[name]).abs().max() / scale) < 0.1, name


def test_gene_zero_is_a_gene_with_a_trainable_embedding():
    """Vocabulary index 0 is a real gene (padding is masked, not a reserved id): its embedding is not pinned to 0."""
    enc = make_encoder()
    assert enc.gene_embedding.padding_idx is None and enc.gene_embedding.weight[0].abs().sum() > 0
