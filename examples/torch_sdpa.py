"""PyTorch's scaled_dot_product_attention, checked by ringattn's oracle in one call.

The adapter is all a backend needs: torch takes (B, H, N, D) (``layout="bhnd"``), pairs query head h with
kv head h // G like ringattn (``enable_gqa=True``, the default ``gqa="grouped"``), and gives the
gradients by autograd. SDPA does not return lse, so the adapter computes it with ``torch.logsumexp`` on
the scores (``lse=False`` leaves it out: ``verify(..., provides=("out", "dq", "dk", "dv"))``).

    python examples/torch_sdpa.py            # the standard cases in fp32 and fp64, with the mask cases
"""

import torch
import torch.nn.functional as F

import refimpl


def sdpa(q, k, v, *, causal, scale, dout=None, mask=None, lse=True):
    """q (B, Hq, N, D), k, v (B, Hkv, N, D) NumPy -> {"out", "lse" (B, Hq, N)[, "dq", "dk", "dv"]}, NumPy."""
    grad = dout is not None
    qt, kt, vt = (torch.from_numpy(x).requires_grad_(grad) for x in (q, k, v))
    N = q.shape[2]
    visible = None if mask is None else torch.from_numpy(mask)
    if visible is not None and causal:            # SDPA takes attn_mask or is_causal, not both
        visible = visible & torch.ones(N, N, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, is_causal=causal and visible is None,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    results = {"out": out.detach().numpy()}
    if lse:
        with torch.no_grad():
            G = q.shape[1] // k.shape[1]
            s = (qt @ kt.repeat_interleave(G, dim=1).transpose(-1, -2)) * scale
            if causal or visible is not None:
                hidden = ~(visible if visible is not None else torch.ones(N, N, dtype=torch.bool).tril())
                s = s.masked_fill(hidden, float("-inf"))
            results["lse"] = torch.logsumexp(s, dim=-1).numpy()
    if grad:
        out.backward(torch.from_numpy(dout))
        results.update(dq=qt.grad.numpy(), dk=kt.grad.numpy(), dv=vt.grad.numpy())
    return results


def main():
    report = refimpl.verify(sdpa, layout="bhnd", features=("gqa", "mask"))
    print(report.text())
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main().passed else 1)
