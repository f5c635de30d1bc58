"""ReLU linear attention (Sana / EfficientViT), shared by the DiT and the DC-AE.

Softmax attention costs O(N^2); with the kernel phi = ReLU the output for query n is

    out_n = sum_m v_m (phi(k_m) . phi(q_n)) / sum_m (phi(k_m) . phi(q_n))

and the sums over m can be taken first: KV = sum_m phi(k_m) v_m^T (a d x d matrix) and z = sum_m phi(k_m),
so each query costs O(d^2) and the whole layer O(N d^2). When N <= d the N x N form is cheaper and gives the
same numbers, so both forms live here behind one function.

Precision policy (one place, tested): the sums over tokens are accumulated in float32 whatever the input
dtype, and the result is cast back. The 1e-15 in the denominator only guards all-zero ReLU rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_ATTENTION_EPS = 1e-15


def relu_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = LINEAR_ATTENTION_EPS
) -> torch.Tensor:
    """q, k, v: (B, heads, N, d) before the ReLU kernel, any strides. Returns (B, heads, N, d) in q's dtype,
    stored as (B, N, heads, d), so the usual next step `.transpose(1, 2).flatten(2)` is a free view.

    v gets a column of ones, so the product that forms the numerator also forms the normaliser (its last
    column is sum_m phi(k_m) . phi(q_n)): one matmul fewer, and the pad is the one copy v needs anyway.
    """
    dtype = q.dtype
    # Autocast would run these matmuls in fp16/bf16 again; in fp16 the 1e-15 guard then underflows to 0 and
    # a query whose ReLU features are all zero gives 0/0. The policy is float32 here, so autocast stays out.
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.relu(q).float(), F.relu(k).float()
        v = F.pad(v.float(), (0, 1), value=1.0)  # (B, h, N, d + 1)
        n, d = q.shape[-2], q.shape[-1]
        # Associate the products so the intermediate is the smaller of (d, d + 1) and (N, N).
        kv_first = n > d
        out = q @ (k.transpose(-1, -2) @ v) if kv_first else (q @ k.transpose(-1, -2)) @ v  # (B, h, N, d + 1)
        num, den = out[..., :d].transpose(1, 2), out[..., d:].transpose(1, 2)  # (B, N, h, d), (B, N, h, 1)
        return (num / (den + eps)).to(dtype).transpose(1, 2)  # the division writes (B, N, h, d) memory
