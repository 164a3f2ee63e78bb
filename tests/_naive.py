"""An independent float64 Re-attention for tests: einsums and explicit formulas only.

Deliberately shares no code with reattn.reference (no conv2d, batch_norm, layer_norm, softmax).
Returns the output, the post-norm map and the batch statistics used, so tests can check the
running-stat updates too.
"""
import torch


def naive_re_attention(q, k, v, W, c=None, *, scale=None, norm="none", gamma=None, beta=None, running_mean=None,
                       running_var=None, training=False, eps=1e-5, out_scale=1.0, keep=None, dropout_p=0.0,
                       attn_mask=None, record=None, score_dtype=None):
    """record: a dict that receives the mixed map M [B, H, Nq, Nk] (before the norm) under "M", for tests
    that need dM (e.g. the size of the terms of d mix_bias, which training BatchNorm makes exactly 0).
    score_dtype: round the masked scores S + attn_mask to this dtype (then compute on in float64), as
    an implementation adding a float mask in that dtype does: next to a fill such as -1e9 float32
    keeps multiples of 64, so every score of a fully masked row becomes the fill itself."""
    q, k, v, W = (t.double() for t in (q, k, v, W))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    S = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    masked = torch.zeros(B, H, Nq, Nk, dtype=torch.bool, device=S.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = (~attn_mask).expand(B, H, Nq, Nk).clone()
        else:
            masked = (attn_mask == float("-inf")).expand(B, H, Nq, Nk).clone()
            S = S + torch.where(masked, S.new_zeros(()), attn_mask.double())
    if score_dtype is not None:
        rounded = S.to(score_dtype)
        # a sum that rounds beyond the dtype's range saturates at finfo.min (as the eager path does)
        overflow = (rounded == float("-inf")) & (S != float("-inf"))
        S = torch.where(overflow, torch.finfo(score_dtype).min, rounded.double())
    S = torch.where(masked, torch.full_like(S, -1e300), S)
    row_max = S.max(dim=-1, keepdim=True).values
    E = torch.where(masked, torch.zeros_like(S), torch.exp(S - row_max))
    denom = E.sum(dim=-1, keepdim=True)
    P = torch.where(denom > 0, E / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(E))
    if keep is not None:
        P = P * keep.double() / (1.0 - dropout_p)
    M = torch.einsum("gh,bhij->bgij", W, P)
    if c is not None:
        M = M + c.double().view(1, H, 1, 1)
    if record is not None:
        record["M"] = M
    stats = None
    if norm == "batch":
        if training:
            valid = (~masked).double()
            n = valid.sum(dim=(0, 2, 3))
            mean = (M * valid).sum(dim=(0, 2, 3)) / n
            var = (((M - mean.view(1, H, 1, 1)) ** 2) * valid).sum(dim=(0, 2, 3)) / n
            stats = (mean, var, n)
        else:
            mean, var = running_mean.double(), running_var.double()
        N = (M - mean.view(1, H, 1, 1)) / torch.sqrt(var.view(1, H, 1, 1) + eps)
    elif norm == "layer":
        mean = M.mean(dim=1, keepdim=True)
        var = ((M - mean) ** 2).mean(dim=1, keepdim=True)
        N = (M - mean) / torch.sqrt(var + eps)
    else:
        N = M
    if norm != "none":
        if gamma is not None:
            N = N * gamma.double().view(1, H, 1, 1)
        if beta is not None:
            N = N + beta.double().view(1, H, 1, 1)
    A = torch.where(masked, torch.zeros_like(N), out_scale * N)
    O = torch.einsum("bgij,bgjd->bgid", A, v)
    return O, A, stats
