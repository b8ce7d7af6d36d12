"""Fused training kernels for the crosscoder, written as autograd Functions.

Both compute exactly the loss of ``Crosscoder.loss`` (tests compare values and gradients) but
control every pass over the [B, F] latent matrix, which is what bounds speed on a CPU:

* ``l1_step``: five GEMMs (encode, decode, dW_dec, dL/df, dW_enc) and three elementwise passes.
  Autograd on the readable loss makes several more [B, F] temporaries (ReLU mask, penalty product,
  its gradient, the sum of two gradients). Once training has made the latents sparse (a trained L1
  crosscoder keeps ~0.5% of them active) the same step runs on the active entries only, with the
  sparse decode and gradients of the BatchTopK step below.
* ``batchtopk_step``: one dense GEMM (the encoder) and everything else sparse in the k*B active
  entries: exact batch top-k by candidate filtering, the decode as a sparse-dense product, the
  encoder gradient only for active latents (sampled dense-dense product + sparse^T @ dense).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from crosscoder.model import Crosscoder

# CSR tensors are "beta" in torch; the ops used here (spmm, sampled_addmm, transpose) are tested
# against the dense reference in tests/test_core.py, so the one-time notice is noise for users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
# On CUDA torch also notes that check_invariants=False skips its checks: we build the index arrays
# ourselves (sorted, in range, tested), and skipping the checks is the point (they cost a sync).
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class StepLoss(NamedTuple):
    loss: Tensor
    """Differentiable total loss."""
    recon_loss: Tensor
    """Squared error summed over sources and dims, mean over tokens."""
    sparsity_loss: Tensor
    """Decoder-weighted L1 per token before lambda (0 for BatchTopK)."""
    l0: Tensor
    """Mean number of active latents per token (a 0-dim tensor; no host sync)."""
    min_score: Tensor
    """BatchTopK: smallest selected ranking score in the batch (for the inference threshold)."""
    n_active_F: Tensor
    """How many tokens of the batch activated each latent (int64 [F])."""
    aux_loss: Tensor
    """BatchTopK: the AuxK loss before its weight (0 without dead latents, and for L1)."""


class _Penalty(NamedTuple):
    """The decoder-norm-weighted L1 penalty's weights, and how they move with the decoder."""

    weights_F: Tensor
    """w_F = ``model.penalty_weights_F()`` (detached)."""
    coef_FS: Tensor
    """c_FS with dw_i / dW_dec[i, s] = c_FS[i, s] * W_dec[i, s] (true of any rule on the norms)."""


class _PenaltyWeights(torch.nn.Module):
    """``model.penalty_weights_F()`` as a forward, for ``torch.func.functional_call``."""

    def __init__(self, model: Crosscoder):
        super().__init__()
        self.model = model

    def forward(self) -> Tensor:
        return self.model.penalty_weights_F()


def _penalty(model: Crosscoder) -> _Penalty:
    """w_F and c_FS by the model's own rule (sum or joint of per-source norms, fold-aware),
    evaluated on an [F, S, 1] stand-in decoder holding each row's norm: the same norms give the
    same weights, and differentiating there is [F, S] work. Autograd through the [F, S, D] norm
    would allocate a fresh [F, S, D] gradient and make two more passes over it (~0.3 s per step at
    the Gemma shape); the kernels instead add c_FS * W_dec into their decoder gradient in place."""
    with torch.no_grad():
        r_FS = model.W_dec_FSD.norm(dim=-1)
    r_FS1 = r_FS.unsqueeze(-1).requires_grad_()
    with torch.enable_grad():
        w_F = torch.func.functional_call(_PenaltyWeights(model), {"model.W_dec_FSD": r_FS1}, ())
        if not w_F.requires_grad:  # a rule that ignores the norms ("none"): no gradient through them
            return _Penalty(w_F.detach(), torch.zeros_like(r_FS))
        # w_i depends on row i's norms only: the gradient of the sum holds every dw_i / dr_is
        (dw_dr_FS1,) = torch.autograd.grad(w_F.sum(), r_FS1)
    coef_FS = torch.where(r_FS > 0, dw_dr_FS1.squeeze(-1) / r_FS, 0.0)  # a zero row: no gradient, as torch's norm
    return _Penalty(w_F.detach(), coef_FS)


def _add_penalty_grad_(dW_dec_FK: Tensor, W_dec_FK: Tensor, g_weights_F: Tensor, coef_FS: Tensor) -> Tensor:
    """dW_dec[i, s] += g_w[i] * c[i, s] * W_dec[i, s], in place: one pass, no [F, K] temporary."""
    F, S = coef_FS.shape
    dW_dec_FK.view(F, S, -1).addcmul_(W_dec_FK.view(F, S, -1), (g_weights_F[:, None] * coef_FS)[..., None])
    return dW_dec_FK


class _FusedL1(torch.autograd.Function):
    """The dense L1 loss given the latents ``f_BF`` (computed by the caller, which needs them to
    choose between this and the sparse step; W_enc and b_enc are inputs for their gradients)."""

    @staticmethod
    def forward(ctx, x_BK, W_enc_KF, b_enc_F, W_dec_FK, b_dec_K, f_BF, pen, x_lp_BK):
        B = x_BK.shape[0]
        if f_BF.dtype == torch.float32:
            diff_BK = torch.addmm(b_dec_K, f_BF, W_dec_FK).sub_(x_BK)
            W_lp_FK = W_dec_FK
        else:  # bf16 GEMMs: the error, the losses and every sum stay float32
            W_lp_FK = W_dec_FK.to(f_BF.dtype)
            diff_BK = (f_BF @ W_lp_FK).float().add_(b_dec_K).sub_(x_BK)
        recon = torch.dot(diff_BK.view(-1), diff_BK.view(-1)) / B
        fsum_F = f_BF.sum(0, dtype=torch.float32)
        l1 = torch.dot(fsum_F, pen.weights_F) / B
        ctx.save_for_backward(x_lp_BK, f_BF, diff_BK, W_dec_FK, W_lp_FK, fsum_F)
        ctx.pen = pen
        return recon, l1

    @staticmethod
    def backward(ctx, g_recon, g_l1):
        x_lp_BK, f_BF, diff_BK, W_dec_FK, W_lp_FK, fsum_F = ctx.saved_tensors
        pen = ctx.pen
        B, lp = x_lp_BK.shape[0], f_BF.dtype
        gr_BK = diff_BK * (2.0 * g_recon / B)
        db_dec = gr_BK.sum(0)
        gr_lp_BK = gr_BK.to(lp)  # (the same tensor in float32)
        dW_dec = _add_penalty_grad_((f_BF.t() @ gr_lp_BK).float(), W_dec_FK, fsum_F * (g_l1 / B), pen.coef_FS)
        # dL/df = gr @ W_dec^T + (g_l1 / B) * weights; bias add fused into the GEMM.
        g_f_BF = torch.addmm((pen.weights_F * (g_l1 / B)).to(lp), gr_lp_BK, W_lp_FK.t())
        g_pre_BF = torch.ops.aten.threshold_backward(g_f_BF, f_BF, 0.0)
        dW_enc = (x_lp_BK.t() @ g_pre_BF).float()
        db_enc = g_pre_BF.sum(0, dtype=torch.float32)
        return None, dW_enc, db_enc, dW_dec, db_dec, None, None, None


def select_batch_topk(score_BF: Tensor, n_keep: int) -> Tensor:
    """Flat indices (ascending) of the ``n_keep`` largest entries of ``score_BF``.

    Exact, like ``torch.topk`` on the flattened matrix, but ~10x faster on a CPU: a strided sample
    gives a lower bound t0 that admits slightly more than n_keep entries; only those candidates are
    ranked. If the bound admits too few (unlucky sample) it is relaxed and the filter repeated.
    """
    flat = score_BF.reshape(-1)
    n = flat.numel()
    if n_keep >= n:
        return torch.arange(n, device=flat.device)
    stride = max(1, min(64, n // (4 * n_keep) if n_keep * 4 < n else 1))
    sample = flat[::stride]
    margin = 1.15
    while True:
        m = min(sample.numel(), max(1, int(n_keep / stride * margin)))
        t0 = torch.topk(sample, m, sorted=False).values.min()
        cand = (flat >= t0).nonzero().squeeze(1)
        if cand.numel() >= n_keep or m == sample.numel():
            break
        margin *= 1.5
    if cand.numel() < n_keep:  # the sample is the whole matrix only if stride == 1
        cand = torch.arange(n, device=flat.device)
    # index_select rather than flat[cand] here and for the step's other 1-D gathers: the same values,
    # 2-5x faster on the CPU (one thread, 131k-410k indices: 0.9 vs 3.3 ms, 3.2 vs 8.4 ms from [B, F])
    top = torch.topk(flat.index_select(0, cand), n_keep, sorted=False).indices
    return cand.index_select(0, top).sort().values


def _stable_argsort(keys_N: Tensor) -> Tensor:
    """``torch.sort(keys_N, stable=True).indices``, on one thread on the CPU. There int64 keys go
    to an OpenMP radix sort whose barriers stall when the cores are shared with other processes:
    280 ms against 0.5 ms on one thread for 40k keys on the 2-core bench machine under load (and
    one thread costs ~1 ms at the Gemma shape's 82k keys when idle). The result is unique (stable),
    so the thread count cannot change it."""
    if keys_N.device.type != "cpu":
        return torch.sort(keys_N, stable=True).indices
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.sort(keys_N, stable=True).indices
    finally:
        torch.set_num_threads(n_threads)


class _Active(NamedTuple):
    """The k*B active entries of a batch in both CSR (by token) and CSC (by latent) order."""

    crow_B1: Tensor
    """CSR row pointer [B + 1]."""
    col_N: Tensor
    """Latent of each entry, token-major order."""
    ccol_F1: Tensor
    """CSC column pointer [F + 1]."""
    row_csc_N: Tensor
    """Token of each entry, latent-major order."""
    perm_N: Tensor
    """Token-major position of each latent-major entry."""
    n_active_F: Tensor
    """How many tokens activate each latent (int64 [F])."""
    B: int
    F: int

    @staticmethod
    def index(row_N: Tensor, col_N: Tensor, B: int, F: int) -> _Active:
        """Both orders of the entries (row_N[i], col_N[i]), given sorted token-major."""
        crow_B1 = torch.zeros(B + 1, dtype=torch.int64, device=row_N.device)
        torch.cumsum(torch.bincount(row_N, minlength=B), 0, out=crow_B1[1:])
        n_active_F = torch.bincount(col_N, minlength=F)
        ccol_F1 = torch.zeros(F + 1, dtype=torch.int64, device=row_N.device)
        torch.cumsum(n_active_F, 0, out=ccol_F1[1:])
        # stable: within a latent the entries stay in token order, as CSC wants
        perm_N = _stable_argsort(col_N)
        return _Active(crow_B1, col_N, ccol_F1, row_N.index_select(0, perm_N), perm_N, n_active_F, B, F)

    def csr(self, vals_N: Tensor) -> Tensor:
        """[B, F] sparse matrix with ``vals_N`` (token-major order)."""
        return torch.sparse_csr_tensor(self.crow_B1, self.col_N, vals_N, size=(self.B, self.F),
                                       check_invariants=False)

    def csr_t(self, vals_N: Tensor) -> Tensor:
        """[F, B] sparse transpose with ``vals_N`` (token-major order), built without a sort."""
        return torch.sparse_csr_tensor(self.ccol_F1, self.row_csc_N, vals_N[self.perm_N],
                                       size=(self.F, self.B), check_invariants=False)


def _spmm_into(out: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
    """``out`` = sparse @ dense, written into ``out`` (row- or column-major, contents ignored).
    ``torch.sparse.mm`` would zero-fill a fresh result and copy it once more: at the Gemma shape
    (dW of [16,384, 4,608]) that is 0.20 s per product against 0.10 s for this."""
    return out.addmm_(sparse, dense, beta=0.0)


# The four products of a sparse step, shared by the BatchTopK Functions and the sparse L1 kernel.
def _sparse_decode(act: _Active, vals_N: Tensor, W_dec_FK: Tensor, b_dec_K: Tensor) -> Tensor:
    """recon [B, K] = S @ W_dec + b_dec, S the [B, F] matrix of active values."""
    return _spmm_into(W_dec_FK.new_empty(act.B, W_dec_FK.shape[1]), act.csr(vals_N), W_dec_FK).add_(b_dec_K)


def _sparse_dW_dec(act: _Active, vals_N: Tensor, g_BK: Tensor, W_dec_FK: Tensor) -> Tensor:
    """S^T @ g [F, K]."""
    return _spmm_into(torch.empty_like(W_dec_FK), act.csr_t(vals_N), g_BK)


def _sparse_dvals(act: _Active, vals_N: Tensor, g_BK: Tensor, W_dec_FK: Tensor) -> Tensor:
    """dL/dS at the active entries only: g @ W_dec^T sampled there (SDDMM), never the dense [B, F]."""
    return torch.sparse.sampled_addmm(act.csr(vals_N), g_BK, W_dec_FK.t(), beta=0.0).values()


def _sparse_dW_enc(act: _Active, g_N: Tensor, x_BK: Tensor) -> tuple[Tensor, Tensor]:
    """(x^T @ G [K, F], G summed over tokens) for G the [B, F] pre-activation gradient at the
    active entries. The product G^T @ x is formed row-major ([F, K]) and then copied once into W_enc's
    [K, F] layout. Both shortcuts cost more on the CPU: writing the product straight into the [K, F]
    layout (a column-major output for the sparse kernel) was 5-6x slower than row-major at d 128-256
    and 2.2x at the Gemma shape (one thread: 27.6 vs 5.8 ms at d 128 / F 2,048 / k 32, 176 vs 30 ms
    at d 256 / F 4,096 / k 100, 1.68 vs 0.77 s at d 2,304 / F 16,384 / k 100, B 4,096, copy
    included), and a dense @ sparse product (x^T @ G in CSR) slower still; returning the transposed
    view would leave autograd to copy it all the same."""
    dW_enc_FK = _spmm_into(x_BK.new_empty(act.F, x_BK.shape[1]), act.csr_t(g_N), x_BK)
    dW_enc_KF = dW_enc_FK.t().contiguous()
    db_enc_F = torch.zeros(act.F, dtype=g_N.dtype, device=g_N.device).index_add_(0, act.col_N, g_N)
    return dW_enc_KF, db_enc_F


class _SparseDecode(torch.autograd.Function):
    """recon = S @ W_dec + b_dec with S the [B, F] active values; gradients sparse too."""

    @staticmethod
    def forward(ctx, vals_N, W_dec_FK, b_dec_K, act):
        ctx.save_for_backward(vals_N, W_dec_FK)
        ctx.act = act
        return _sparse_decode(act, vals_N, W_dec_FK, b_dec_K)

    @staticmethod
    def backward(ctx, g_BK):
        vals_N, W_dec_FK = ctx.saved_tensors
        act = ctx.act
        g_vals = _sparse_dvals(act, vals_N, g_BK, W_dec_FK)
        return g_vals, _sparse_dW_dec(act, vals_N, g_BK, W_dec_FK), g_BK.sum(0), None


class _SparseEncode(torch.autograd.Function):
    """Passes the active pre-activations through; backward forms dW_enc from active entries only."""

    @staticmethod
    def forward(ctx, W_enc_KF, b_enc_F, vals_N, x_BK, act):
        ctx.save_for_backward(x_BK)
        ctx.act = act
        return vals_N.clone()

    @staticmethod
    def backward(ctx, g_N):
        (x_BK,) = ctx.saved_tensors
        dW_enc_KF, db_enc_F = _sparse_dW_enc(ctx.act, g_N, x_BK)
        return dW_enc_KF, db_enc_F, None, None, None


class _SparseL1(torch.autograd.Function):
    """``_FusedL1`` from the active entries ``vals_N`` (at ``act``) alone: the decode, dW_dec and
    dW_enc are sparse-dense products and dL/df is formed only where f > 0 (ReLU passes exactly
    those, so no mask is needed)."""

    @staticmethod
    def forward(ctx, x_BK, W_enc_KF, b_enc_F, W_dec_FK, b_dec_K, vals_N, act, pen):
        B = x_BK.shape[0]
        diff_BK = _sparse_decode(act, vals_N, W_dec_FK, b_dec_K).sub_(x_BK)
        recon = torch.dot(diff_BK.view(-1), diff_BK.view(-1)) / B
        fsum_F = vals_N.new_zeros(act.F).index_add_(0, act.col_N, vals_N)
        l1 = torch.dot(fsum_F, pen.weights_F) / B
        ctx.save_for_backward(x_BK, diff_BK, W_dec_FK, vals_N, fsum_F)
        ctx.act, ctx.pen = act, pen
        return recon, l1

    @staticmethod
    def backward(ctx, g_recon, g_l1):
        x_BK, diff_BK, W_dec_FK, vals_N, fsum_F = ctx.saved_tensors
        act, pen = ctx.act, ctx.pen
        B = x_BK.shape[0]
        gr_BK = diff_BK * (2.0 * g_recon / B)
        dW_dec = _add_penalty_grad_(_sparse_dW_dec(act, vals_N, gr_BK, W_dec_FK), W_dec_FK, fsum_F * (g_l1 / B),
                                    pen.coef_FS)
        db_dec = gr_BK.sum(0)
        # dL/df at the active entries: the sampled gr @ W_dec^T plus the penalty's (g_l1 / B) * w
        g_N = _sparse_dvals(act, vals_N, gr_BK, W_dec_FK).add_(pen.weights_F.index_select(0, act.col_N) * (g_l1 / B))
        dW_enc, db_enc = _sparse_dW_enc(act, g_N, x_BK)
        return None, dW_enc, db_enc, dW_dec, db_dec, None, None, None


# Largest fraction of active entries in a batch's [B, F] latents at which ``l1_step`` takes the
# sparse path, per device type. Measured, not guessed: bench/bench_sparse_l1.py's crossover sweep
# times both paths, interleaved, over densities 0.5-35% (d = 256, F = 4,096, B = 4,096, the full
# training step) and interpolates where they cost the same: 7.8% on the 2-core CPU of
# bench/README.md on 2026-11-29 (sparse 2.2x faster at 0.5%, 0.32x at 35%). CUDA: 4%, below the
# 5.9% crossover that ``bench/bench_gpu.py --crossover`` measured on one NVIDIA H200 on 2026-11-30
# (torch 2.11+cu130, fp32 without TF32; d = 2,304, S = 2, F = 16,384, B = 4,096, the full training
# step, medians of 10; the table is in bench/README.md, "Rows to the host and the L1 sparse path on
# CUDA"): sparse 3.0x faster at 0.2%, 2.8x at 0.5%, 1.3x at 4%, 0.81x at 8%; the auto path's count
# of active entries (a host sync) cost ~1 ms of the 23 ms step. Other devices are not measured, so
# they keep the dense step (and skip that sync).
L1_SPARSE_MAX_DENSITY: dict[str, float] = {"cpu": 0.078, "cuda": 0.04}

_L1Parts = tuple[Tensor, Tensor, Tensor]  # (recon, l1, n_active_F)


def _l1_dense(model: Crosscoder, x_BK: Tensor, f_BF: Tensor, pen: _Penalty, x_lp_BK: Tensor) -> _L1Parts:
    K, F = x_BK.shape[1], f_BF.shape[1]
    recon, l1 = _FusedL1.apply(x_BK, model.W_enc_SDF.view(K, F), model.b_enc_F, model.W_dec_FSD.view(F, K),
                               model.b_dec_SD.view(-1), f_BF, pen, x_lp_BK)
    return recon, l1, (f_BF > 0).sum(0)


def _l1_sparse(model: Crosscoder, x_BK: Tensor, f_BF: Tensor, pen: _Penalty, x_lp_BK: Tensor) -> _L1Parts:
    (B, K), F = x_BK.shape, f_BF.shape[1]
    idx_N = f_BF.view(-1).nonzero().squeeze(1)  # ascending: token-major, as CSR wants
    act = _Active.index(idx_N // F, idx_N % F, B, F)
    # the sparse products are float32 only (torch's CPU CSR kernels have no bf16)
    recon, l1 = _SparseL1.apply(x_BK, model.W_enc_SDF.view(K, F), model.b_enc_F, model.W_dec_FSD.view(F, K),
                                model.b_dec_SD.view(-1), f_BF.view(-1).index_select(0, idx_N).float(), act, pen)
    return recon, l1, act.n_active_F


def _check_gemm_dtype(gemm_dtype: torch.dtype) -> None:
    if gemm_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gemm_dtype must be torch.float32 or torch.bfloat16, got {gemm_dtype}")


def l1_step(model: Crosscoder, x_BSD: Tensor, l1_coeff: float, *, path: str = "auto",
            gemm_dtype: torch.dtype = torch.float32) -> StepLoss:
    """Loss of an L1 crosscoder on a batch. ``path``: "dense" (the fused five-GEMM kernel),
    "sparse" (decode and gradients from the active entries only) or "auto": sparse when the
    batch's active fraction is at most ``L1_SPARSE_MAX_DENSITY`` for the device. Both paths give
    the same loss and gradients up to float summation order (tests/test_sparse_l1.py).

    ``gemm_dtype`` torch.bfloat16: the dense GEMMs (the encoder, and the dense path's decode and
    three gradient products) take bfloat16 copies of their operands, as ``torch.autocast`` would;
    the weights, their gradients, the reconstruction error, the losses and every sum stay float32.
    (torch.autocast itself cannot run these kernels: its casts do not reach the backward of an
    autograd Function, and the CSR products have no bfloat16 kernel on the CPU.)"""
    _check_gemm_dtype(gemm_dtype)
    B = x_BSD.shape[0]
    K = model.cfg.n_sources * model.cfg.d_model
    x_BK = x_BSD.reshape(B, K)
    x_lp_BK = x_BK.to(gemm_dtype)
    with torch.no_grad():
        W_enc_KF = model.W_enc_SDF.view(K, -1)
        f_BF = torch.addmm(model.b_enc_F.to(gemm_dtype), x_lp_BK, W_enc_KF.to(gemm_dtype)).relu_()
    if path == "auto":
        max_density = L1_SPARSE_MAX_DENSITY.get(x_BK.device.type, -1.0)
        sparse = max_density >= 0 and int(torch.count_nonzero(f_BF)) <= max_density * f_BF.numel()
        path = "sparse" if sparse else "dense"
    if path not in ("dense", "sparse"):
        raise ValueError(f"path must be 'auto', 'dense' or 'sparse', got {path!r}")
    recon, l1, n_active_F = (_l1_sparse if path == "sparse" else _l1_dense)(model, x_BK, f_BF, _penalty(model),
                                                                           x_lp_BK)
    l0 = n_active_F.sum() / B
    zero = l0.new_zeros(())
    return StepLoss(recon + l1_coeff * l1, recon.detach(), l1.detach(), l0, zero, n_active_F, zero)


class _DenseAuxDecode(torch.autograd.Function):
    """err = A @ W_dec[dead] - e for A the [B, J] matrix of the selected dead latents' values (zero
    elsewhere), as dense GEMMs over the J dead latents in A's dtype (bfloat16), with the gradients of
    W_enc, b_enc and W_dec at the dead latents' columns and rows only. Everything outside the GEMMs
    (the error, the sums, the weights' gradients) is float32."""

    @staticmethod
    def forward(ctx, W_enc_KF, b_enc_F, W_dec_FK, vals_lp_BJ, dead_J, x_lp_BK, e_BK):
        # vals_lp_BJ may have more columns than dead_J (zero padding, see auxk_loss): the padded
        # columns meet zero decoder rows and their gradients are dropped
        J = dead_J.numel()
        W_lp_JK = W_dec_FK.new_zeros(vals_lp_BJ.shape[1], W_dec_FK.shape[1], dtype=vals_lp_BJ.dtype)
        W_lp_JK[:J] = W_dec_FK.index_select(0, dead_J)
        ctx.save_for_backward(vals_lp_BJ, dead_J, x_lp_BK, W_lp_JK)
        ctx.shapes = (W_enc_KF.shape, W_dec_FK.shape)
        return (vals_lp_BJ @ W_lp_JK).float().sub_(e_BK)

    @staticmethod
    def backward(ctx, g_BK):
        vals_lp_BJ, dead_J, x_lp_BK, W_lp_JK = ctx.saved_tensors
        (K, F), _ = ctx.shapes
        J = dead_J.numel()
        g_lp_BK = g_BK.to(vals_lp_BJ.dtype)
        dW_dec_FK = g_BK.new_zeros(ctx.shapes[1]).index_copy_(0, dead_J, (vals_lp_BJ.t() @ g_lp_BK)[:J].float())
        # dL/dA only where A holds a selected positive value (what ReLU and the selection pass)
        g_pre_BJ = (g_lp_BK @ W_lp_JK.t()).masked_fill_(vals_lp_BJ == 0, 0)
        dW_enc_KF = g_BK.new_zeros(K, F).index_copy_(1, dead_J, (x_lp_BK.t() @ g_pre_BJ)[:, :J].float())
        db_enc_F = g_BK.new_zeros(F).index_copy_(0, dead_J, g_pre_BJ[:, :J].sum(0, dtype=torch.float32))
        return dW_enc_KF, db_enc_F, dW_dec_FK, None, None, None, None


AUXK_DENSE_COLUMNS = 256
"""The dense AuxK block's width is the number of dead latents rounded up to a multiple of this. The
dead count changes every step, and the CPU's bf16 GEMM (oneDNN) keeps a compiled kernel with its
buffers for every new shape: on the gemma3 profile's BatchTopK crosscoder 200 steps of exact widths
grew the process by 0.9 GB (float32 sparse AuxK: none). Rounding keeps the shapes to a few."""


def auxk_loss(model: Crosscoder, x_BSD: Tensor, residual_BSD: Tensor, dead_F: Tensor, k_aux: int, *,
              rank_BJ: Tensor | None = None, gemm_dtype: torch.dtype = torch.float32,
              dense: bool | None = None) -> Tensor:
    """Gao et al. (2024)'s AuxK loss: for each token, the ``k_aux`` dead latents with the largest
    ranking score (``Crosscoder.topk_score``: ReLU pre-activation times the ranking weight, as
    dictionary_learning's BatchTopKCrossCoderTrainer ranks them), decoded without the decoder bias,
    should reconstruct the main reconstruction's (detached) residual error; the squared error is
    normalised by the residual's variance, so the weight means the same at any scale. Gradients
    reach only the dead latents' parameters.

    float32: sparse like the main step: only the B * k_aux selected entries are encoded, decoded and
    differentiated (``_SparseEncode`` / ``_SparseDecode``), not the dense [B, n_dead] block.
    ``gemm_dtype`` bfloat16: dense GEMMs over the [B, n_dead] block in bfloat16 (``_DenseAuxDecode``),
    which on a CPU with bf16 arithmetic cost less than the float32 sparse products once k_aux is more
    than a few percent of the dead latents (gemma3 organism shape, k_aux 320 of ~2,500 dead: see
    bench/bench_batchtopk_step.py). The caller may pass ``rank_BJ``, the ranking scores of the dead
    latents (columns in index order) it already has from the BatchTopK selection, which saves the dead
    latents' encoder pass. ``dense``: force either path (None: dense exactly when ``gemm_dtype`` is
    bfloat16); the dense path in float32 is the tests' check of its gradients against the sparse one.
    """
    dense = gemm_dtype != torch.float32 if dense is None else dense
    B = x_BSD.shape[0]
    F, K = model.cfg.n_latents, model.cfg.n_sources * model.cfg.d_model
    dead_J = dead_F.nonzero().squeeze(1)
    if dead_J.numel() == 0:
        return x_BSD.new_zeros(())
    x_BK = x_BSD.reshape(B, K)
    W_enc_KF = model.W_enc_SDF.view(K, F)
    with torch.no_grad():
        w_F = model.rank_weights_F()
        w_J = None if w_F is None else w_F[dead_J]
        if rank_BJ is None:
            rank_BJ = torch.addmm(model.b_enc_F[dead_J], x_BK, W_enc_KF[:, dead_J]).relu_()
            if w_J is not None:
                rank_BJ *= w_J
        top_Bk, pick_Bk = rank_BJ.topk(min(k_aux, dead_J.numel()), dim=1, sorted=False)
    e_BK = residual_BSD.reshape(B, K).detach()
    if dense:
        with torch.no_grad():
            vals_Bk = top_Bk.float() / w_J[pick_Bk] if w_J is not None else top_Bk.float()
            width = -(-dead_J.numel() // AUXK_DENSE_COLUMNS) * AUXK_DENSE_COLUMNS
            vals_BJ = torch.zeros(B, width, dtype=gemm_dtype, device=x_BK.device)
            vals_BJ.scatter_(1, pick_Bk, vals_Bk.to(gemm_dtype))
        err_BK = _DenseAuxDecode.apply(W_enc_KF, model.b_enc_F, model.W_dec_FSD.view(F, K), vals_BJ, dead_J,
                                       x_BK.to(gemm_dtype), e_BK)
    else:
        err_BK = _sparse_aux_error(model, x_BK, e_BK, dead_J, w_J, top_Bk, pick_Bk)
    var = (e_BK - e_BK.mean(0)).pow(2).sum(-1).mean()
    return (err_BK.pow(2).sum(-1).mean() / var).nan_to_num(0.0)


def _sparse_aux_error(model: Crosscoder, x_BK: Tensor, e_BK: Tensor, dead_J: Tensor, w_J: Tensor | None,
                      top_Bk: Tensor, pick_Bk: Tensor) -> Tensor:
    """AuxK's decode of the selected dead latents (``pick_Bk`` into ``dead_J``, ranking scores
    ``top_Bk``) minus the residual ``e_BK``, from the B * k_aux selected entries only."""
    B, K = x_BK.shape
    F = model.cfg.n_latents
    with torch.no_grad():
        # CSR wants each token's latents ascending; dead_J is ascending, so sorting the picks does it
        pick_Bk, order = pick_Bk.sort(dim=1)
        top_Bk = top_Bk.gather(1, order)
        row_Bk = torch.arange(B, device=x_BK.device)[:, None].expand_as(pick_Bk)
        keep = top_Bk > 0  # ReLU: a selected zero activation contributes nothing
        row_N, pick_N, score_N = row_Bk[keep], pick_Bk[keep], top_Bk[keep].float()  # (bf16 GEMM: scores in bf16)
        col_N = dead_J.index_select(0, pick_N)
        vals_N = score_N / w_J.index_select(0, pick_N) if w_J is not None else score_N
        act = _Active.index(row_N, col_N, B, F)
    vals = _SparseEncode.apply(model.W_enc_SDF.view(K, F), model.b_enc_F, vals_N, x_BK, act)
    return _SparseDecode.apply(vals, model.W_dec_FSD.view(F, K), e_BK.new_zeros(K), act) - e_BK


def batchtopk_step(model: Crosscoder, x_BSD: Tensor, *, dead_F: Tensor | None = None, k_aux: int = 0,
                   auxk_alpha: float = 0.0, gemm_dtype: torch.dtype = torch.float32) -> StepLoss:
    """Loss of a BatchTopK crosscoder on a batch, decoding only the k*B active latents; with
    ``dead_F`` and ``auxk_alpha`` > 0, plus ``auxk_alpha`` times the AuxK loss of those latents.

    ``gemm_dtype`` torch.bfloat16: the dense GEMM (the encoder's ranking scores) in bfloat16, so the
    selection and the active values carry bfloat16 rounding, and the AuxK term as dense bfloat16
    GEMMs over the dead latents (``auxk_loss``); the main decode and its gradients stay float32 sparse
    products (no bfloat16 kernel on the CPU; at k of 100 in 4,096 latents the dense block would cost
    more)."""
    _check_gemm_dtype(gemm_dtype)
    B = x_BSD.shape[0]
    cfg = model.cfg
    K, F = cfg.n_sources * cfg.d_model, cfg.n_latents
    x_BK = x_BSD.reshape(B, K)
    W_enc_KF = model.W_enc_SDF.view(K, F)
    with torch.no_grad():
        w_F = model.rank_weights_F()
        x_lp_BK = x_BK.to(gemm_dtype)
        if w_F is not None:
            # Rank on relu(pre) * w without an extra [B, F] pass: scale the encoder columns
            # (w > 0), then recover f = score / w on the k*B selected entries only.
            score_BF = torch.addmm((model.b_enc_F * w_F).to(gemm_dtype), x_lp_BK,
                                   (W_enc_KF * w_F).to(gemm_dtype)).relu_()
        else:
            score_BF = torch.addmm(model.b_enc_F.to(gemm_dtype), x_lp_BK, W_enc_KF.to(gemm_dtype)).relu_()
        n_keep = min(cfg.k * B, B * F)
        idx_N = select_batch_topk(score_BF, n_keep)
        score_N = score_BF.view(-1).index_select(0, idx_N).float()
        # AuxK ranks the dead latents by the same scores: keep their columns, not the [B, F] block.
        use_aux = dead_F is not None and auxk_alpha > 0 and bool(dead_F.any())
        # (index_select by the dead latents' indices: the same columns as score_BF[:, dead_F], 1.5-4x
        # faster on the CPU than the boolean-mask gather)
        rank_BJ = score_BF.index_select(1, dead_F.nonzero().squeeze(1)) if use_aux else None
        del score_BF
        row_N, col_N = idx_N // F, idx_N % F
        vals_N = score_N / w_F.index_select(0, col_N) if w_F is not None else score_N
        # A selected score of exactly 0 (fewer than k*B positive entries) is not an activation.
        live = vals_N > 0
        if not bool(live.all()):
            row_N, col_N, vals_N, score_N = row_N[live], col_N[live], vals_N[live], score_N[live]
        act = _Active.index(row_N, col_N, B, F)
        min_score = score_N.min() if score_N.numel() else x_BK.new_zeros(())
    vals = _SparseEncode.apply(W_enc_KF, model.b_enc_F, vals_N, x_BK, act)
    recon_BK = _SparseDecode.apply(vals, model.W_dec_FSD.view(F, K), model.b_dec_SD.view(-1), act)
    diff = recon_BK - x_BK
    recon = diff.pow(2).sum() / B
    l0 = x_BK.new_tensor(float(col_N.numel())) / B
    loss, aux = recon, recon.new_zeros(())
    if use_aux:
        aux = auxk_loss(model, x_BSD, -diff, dead_F, k_aux or cfg.d_model // 2, rank_BJ=rank_BJ, gemm_dtype=gemm_dtype)
        loss = recon + auxk_alpha * aux
    return StepLoss(loss, recon.detach(), recon.new_zeros(()), l0, min_score, act.n_active_F, aux.detach())


def training_step(model: Crosscoder, x_BSD: Tensor, l1_coeff: float, *, dead_F: Tensor | None = None,
                  k_aux: int = 0, auxk_alpha: float = 0.0, gemm_dtype: torch.dtype = torch.float32) -> StepLoss:
    """Dispatch to the fused kernel of the model's sparsity type (the AuxK terms: BatchTopK only)."""
    if model.cfg.sparsity == "l1":
        return l1_step(model, x_BSD, l1_coeff, gemm_dtype=gemm_dtype)
    return batchtopk_step(model, x_BSD, dead_F=dead_F, k_aux=k_aux, auxk_alpha=auxk_alpha, gemm_dtype=gemm_dtype)
