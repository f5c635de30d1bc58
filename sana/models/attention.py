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
    """q, k, v: (B, heads, N, d) before the ReLU kernel. Returns (B, heads, N, d) in q's dtype."""
    dtype = q.dtype
    # Autocast would run these matmuls in fp16/bf16 again; in fp16 the 1e-15 guard then underflows to 0 and
    # a query whose ReLU features are all zero gives 0/0. The policy is float32 here, so autocast stays out.
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
        n, d = q.shape[-2], q.shape[-1]
        if n > d:
            kv = k.transpose(-1, -2) @ v  # (B, h, d, d)
            num = q @ kv  # (B, h, N, d)
            den = q @ k.sum(dim=-2).unsqueeze(-1)  # (B, h, N, 1)
        else:
            scores = q @ k.transpose(-1, -2)  # (B, h, N, N); row n holds phi(q_n) . phi(k_m)
            num = scores @ v  # (B, h, N, d)
            den = scores.sum(dim=-1, keepdim=True)  # (B, h, N, 1)
        return (num / (den + eps)).to(dtype)
