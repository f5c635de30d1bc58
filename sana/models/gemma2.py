"""The Gemma-2 decoder as Sana's text encoder uses it: token ids -> last hidden states, nothing else.

Why our own and not transformers' `Gemma2Model`: importing transformers costs ~3.5 s of CPU on a small
machine, more than torch itself, and `sana generate` pays it on every start; this module needs only torch and
safetensors. It reads and writes the same folder (config.json + model.safetensors, sharded or not, with the
same state-dict keys), so a Sana folder's `text_encoder/` works with both, and it is tested equal to
transformers' Gemma2Model. Training the language model (sana/training/text_task.py) still uses transformers.

The network (Gemma Team 2024, "Gemma 2", arXiv 2408.00118), per position, with d = hidden_size:

    h = embed(ids) * sqrt(d)                      (the scale rounded to the weights' dtype, as published)
    for each layer:
        h = h + norm_post_attn(attention(norm_in(h)))
        h = h + norm_post_ffn(down(gelu_tanh(gate(x)) * up(x))),  x = norm_pre_ffn(h)
    out = norm(h)

RMSNorm in float32 with weight (1 + w); attention with grouped key/value heads, rotary positions (theta from
the config), scores q.k / sqrt(query_pre_attn_scalar) soft-capped as cap * tanh(s / cap), causal, padded keys
masked, and on "sliding_attention" layers only the last `sliding_window` positions; softmax in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sana.config import read_json
from sana.errors import one_line
from sana.weights import CheckpointError, atomic_write

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, head_dim) each
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class Gemma2Config:
    """The fields of a transformers Gemma-2 config.json that the forward pass reads (the rest is kept as is)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int | None = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the whole file, for saving

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "Gemma-2 config") -> Gemma2Config:
        if data.get("model_type") != "gemma2":
            raise CheckpointError(f"{source}: not a Gemma-2 config (model_type {data.get('model_type')!r})")
        known = {f.name for f in fields(cls)} - {"raw", "rope_theta", "layer_types"}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data and k != "head_dim"]
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)}")
        values = {k: data[k] for k in known if k in data}
        rope = data.get("rope_parameters") or {}  # transformers 5 nests it; older files have rope_theta
        values["rope_theta"] = float(rope.get("rope_theta", data.get("rope_theta", 10000.0)))
        n = data["num_hidden_layers"]
        # Older files omit layer_types: Gemma-2 alternates, starting with a sliding-window layer.
        default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        values["layer_types"] = tuple(data.get("layer_types") or default)
        values.setdefault("head_dim", data["hidden_size"] // data["num_attention_heads"])
        if values.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise CheckpointError(f"{source}: unsupported hidden_activation {values['hidden_activation']!r}")
        return cls(**values, raw=dict(data))

    # What pipeline code reads from `text_encoder.model.config`, as on a transformers config.
    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma stores w and scales by (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (B, H, N, D): the two halves of D are the pair's coordinates."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config, sliding: bool) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.sliding_window if sliding else None
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, rope: Rope, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, D)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, N, D)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, N, N)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.window is not None and n > self.window:
            i = torch.arange(n, device=x.device)
            keep = keep & ((i[:, None] - i[None, :]) < self.window)  # (B, 1, N, N)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma2Config, sliding: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, sliding)
        self.mlp = MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, h: torch.Tensor, rope: Rope, keep: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, keep))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2Encoder(nn.Module):
    """Gemma-2 decoder stack, state-dict compatible with transformers' Gemma2Model. `model(input_ids=...,
    attention_mask=...)[0]` is the last hidden state (B, N, hidden_size), as from transformers."""

    transformers_class_name = "Gemma2Model"  # what model_index.json names: the folder is that class's

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.config = config
        # An empty table instead of the default normal_ init: on the meta device that init goes through
        # torch._refs, whose first use imports torch._dynamo (1.6 s). The weights are always loaded afterwards.
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, _weight=table)
        self.layers = nn.ModuleList(
            DecoderLayer(config, kind == "sliding_attention") for kind in config.layer_types
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:  # as transformers models have it
        return self.embed_tokens.weight.dtype

    def rope(self, n: int, device: torch.device, dtype: torch.dtype) -> Rope:
        d = self.config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=device) / d
        inv_freq = 1.0 / (self.config.rope_theta**exponents)
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)  # (N, D) each

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        b, n = input_ids.shape
        weight = self.embed_tokens.weight
        h = self.embed_tokens(input_ids) * torch.tensor(math.sqrt(self.config.hidden_size), dtype=weight.dtype)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        keep = causal[None, None] & valid[:, None, None, :]  # (B, 1, N, N): earlier, non-padded keys
        rope = self.rope(n, h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, rope, keep)
        return (self.norm(h),)

    # --------------------------------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Gemma2Encoder:
        """Load a transformers Gemma-2 folder (Gemma2Model, or a causal LM whose keys start with "model.")."""
        from safetensors import safe_open

        folder = Path(folder)
        config = Gemma2Config.from_dict(read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        state: dict[str, torch.Tensor] = {}
        for path in _weight_files(folder):
            try:
                f = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # missing, truncated or not a safetensors file
                reason = one_line(e) or type(e).__name__
                raise CheckpointError(f"cannot read {path} as safetensors: {reason}") from e
            with f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    if name in expected:
                        state[name] = f.get_tensor(key).to(dtype)
        missing = sorted(expected - set(state))
        if missing:
            raise CheckpointError(f"{folder}: no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors, as transformers writes a Gemma2Model (weights in their dtype)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        raw = {**self.config.raw, "architectures": ["Gemma2Model"]}
        atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(raw, indent=2) + "\n"))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_FILE).is_file():  # sharded: the index maps each tensor to its file
        weight_map = read_json(folder / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX_FILE} has no weight_map object")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def is_gemma2_folder(folder: str | Path) -> bool:
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("model_type") == "gemma2"
    except (OSError, ValueError):
        return False
