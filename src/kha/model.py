"""The decoder LM the paper trains (section 4.1): Qwen3-style blocks with dense SwiGLU or MoE FFNs.

- ``SwiGLU``: ``down(silu(gate(x)) * up(x))``.
- ``Router`` + ``MoE``: dropless top-k routing with auxiliary-loss-free balancing (Wang et al., 2024;
  DeepSeek-V3): a per-expert bias is added to the router scores only to *choose* experts, gates come
  from the unbiased scores, and after every optimizer step the bias moves by ``rate * sign(mean - load)``
  from that step's token counts (all-reduced across ranks when distributed). Router math is fp32.
- ``Block``: pre-RMSNorm attention and FFN with residuals.
- ``DecoderLM``: embeddings (tied to the LM head by default), blocks, final norm, LM head; ``forward``
  returns logits and, given targets, the mean cross-entropy; ``generate`` decodes with the KV cache.

Model code holds no parallelism: FSDP and friends are applied from outside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .attention import DocumentMask, RMSNorm, document_positions
from .config import ModelConfig, MoEConfig
from .sampling import check_sampling, next_token
from .variants import build_attention


def swiglu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, on ``kha.cpu_kernels``' fused kernel where it applies (bf16 training on CPU)."""
    return cpu_kernels.silu_mul(gate, up) if cpu_kernels.fuses(gate) else F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_gate(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Chooses ``top_k`` experts per token; keeps the balancing bias and this step's token counts."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        # Part of the training state (checkpointed), but not a parameter: no gradient, no weight decay.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(N, d)`` -> expert indices ``(N, k)`` and fp32 gates ``(N, k)``.

        Gates are normalised over the chosen experts when ``top_k > 1``; with ``top_k == 1`` that would make
        every gate 1 and cut the router off from the gradient, so the gate is the expert's score itself.
        Computed in fp32 even under autocast: small score differences decide the routing.
        """
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()
        scores = torch.sigmoid(logits) if self.cfg.score == "sigmoid" else torch.softmax(logits, dim=-1)
        chosen = torch.topk(scores + self.expert_bias, self.cfg.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.cfg.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.cfg.n_experts)
        return chosen, gates

    @torch.no_grad()
    def update_bias(self) -> dict[str, float]:
        """Sign-rule bias step from the counts since the last call; returns and clears the load metrics."""
        counts = self.tokens_per_expert
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        mean = counts.mean()
        metrics = {"max_over_mean": (counts.max() / mean).item() if mean > 0 else float("nan"),
                   "tokens": counts.sum().item()}
        if mean > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(mean - counts)
        counts.zero_()
        return metrics


def run_experts_loop(x: torch.Tensor, counts: list[int], w_gate, w_up, w_down) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous slice of ``x`` (rows sorted by expert), one expert at a time.

    The reference the batched forms are tested against.
    """
    outs = []
    for e, chunk in enumerate(torch.split(x, counts)):
        if chunk.shape[0]:
            outs.append((F.silu(chunk @ w_gate[e]) * (chunk @ w_up[e])) @ w_down[e])
    return torch.cat(outs) if outs else x.new_zeros(0, w_down.shape[-1])


def run_experts_padded(x: torch.Tensor, counts: list[int], w_gate, w_up, w_down) -> torch.Tensor:
    """The same as :func:`run_experts_loop` as three batched matmuls over ``(E, max(counts), d)``.

    Each expert's rows go to their own zero-padded slot; with balanced routing the padding is small.
    """
    n_experts, capacity = len(counts), max(counts, default=0)
    sizes = torch.tensor(counts, device=x.device)
    expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), sizes)
    slot = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(sizes, 0) - sizes)[expert]
    padded = x.new_zeros(n_experts, capacity, x.shape[-1])
    padded[expert, slot] = x
    hidden = swiglu_gate(torch.bmm(padded, w_gate), torch.bmm(padded, w_up))
    return torch.bmm(hidden, w_down)[expert, slot]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on (``_grouped_mm`` is not autocast by torch)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def run_experts_grouped(x: torch.Tensor, counts: list[int], w_gate, w_up, w_down) -> torch.Tensor:
    """The same as :func:`run_experts_loop` with ``torch._grouped_mm`` (no padding), in autocast's dtype."""
    dtype = _compute_dtype(x)
    offsets = torch.cumsum(torch.tensor(counts, device=x.device), 0).to(torch.int32)
    x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    hidden = swiglu_gate(torch._grouped_mm(x, w_gate, offs=offsets), torch._grouped_mm(x, w_up, offs=offsets))
    return torch._grouped_mm(hidden, w_down, offs=offsets)


_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (it is private, and on CUDA needs a
    recent GPU and bf16): tried once per device type and dtype on a small problem, with gradients on even when
    the first call comes from ``no_grad`` or inference code (else the probe's backward would fail there and
    switch ``_grouped_mm`` off for the whole process)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.ones(4, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                y = torch._grouped_mm(x, w, offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
                y.backward(torch.ones_like(y))
            _GROUPED_MM_WORKS[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


def run_experts(x: torch.Tensor, counts: list[int], w_gate, w_up, w_down) -> torch.Tensor:
    """Every expert's SwiGLU without a Python loop: ``torch._grouped_mm`` where it works for this device,
    dtype and shape (rows 16-byte aligned), else the padded batched matmul.

    On CPU ``_grouped_mm`` is taken in fp32 only: in bf16 its CPU kernel made a training step 1.55x slower
    than the padded form (benchmarks/moe.py, docs/benchmarks.md), while in fp32 it was the fastest form there.
    """
    dtype = _compute_dtype(x)
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (x.shape[-1], w_gate.shape[-1]))
    fast_here = x.device.type != "cpu" or dtype == torch.float32
    if aligned and fast_here and not torch.compiler.is_compiling() and grouped_mm_works(x.device, dtype):
        return run_experts_grouped(x, counts, w_gate, w_up, w_down)
    return run_experts_padded(x, counts, w_gate, w_up, w_down)


class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts; expert weights stacked as ``(E, in, out)``."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.w_gate = nn.Parameter(torch.empty(cfg.n_experts, d_model, cfg.d_expert))
        self.w_up = nn.Parameter(torch.empty(cfg.n_experts, d_model, cfg.d_expert))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, gates = self.router(flat)
        assignment = chosen.flatten()
        order = torch.argsort(assignment, stable=True)
        token = order // self.cfg.top_k
        counts = torch.bincount(assignment, minlength=self.cfg.n_experts).tolist()
        y = run_experts(flat[token], counts, self.w_gate, self.w_up, self.w_down)
        # weight and sum the k expert outputs of each token in fp32 (under autocast y is bf16)
        y = y.float() * gates.flatten()[order, None]
        combined = torch.zeros(flat.shape, device=flat.device, dtype=torch.float32).index_add_(0, token, y)
        return combined.to(x.dtype).view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg.attention)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg.d_model, cfg.moe) if cfg.moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, positions=None, attention_mask=None, cache=None, impl=None, documents=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions=positions, attention_mask=attention_mask, cache=cache,
                          impl=impl, documents=documents)
        return x + self.ffn(self.ffn_norm(x))


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must be integers in ``[0, vocab_size)``. The dtype is checked always (free, compile-friendly);
    the range only on CPU tensors outside ``torch.compile`` (a min/max over the ids; on a GPU it would wait for
    the device, and CUDA's embedding asserts on an out-of-range id itself)."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


DOC_POSITIONS = ("restart", "continue")


class LMOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None


class DecoderLM(nn.Module):
    """Qwen3-style decoder LM with knocking-heads attention (any variant, any knock) in every block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every projection, expert and embedding; zero biases.

        Knocks keep their identity/zero init and norms their ones: neither is touched here, and since
        knocks draw no random numbers, the same seed gives the same base weights with or without them.
        """
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoE):
                for w in (module.w_gate, module.w_up, module.w_down, module.router.weight):
                    nn.init.normal_(w, std=std)

    def forward(self, input_ids, targets=None, positions=None, attention_mask=None, caches=None,
                impl=None, doc_ids=None, doc_positions: str = "restart") -> LMOutput:
        """``input_ids`` ``(B, T)``; ``targets`` ``(B, T)`` with -100 to ignore; ``caches`` from
        :meth:`new_caches` for incremental decoding; other arguments as in :class:`kha.Attention`.

        ``doc_ids`` (``(B, T)``, :func:`kha.attention.document_ids` of packed windows) limits attention to each
        token's document (the mask is built once here for every layer); RoPE positions then restart at every
        document (``doc_positions="restart"``, as each document alone would have them) or keep the window's
        index (``"continue"``); explicit ``positions`` win. RoPE depends only on position differences within a
        document, so the two agree up to rounding."""
        if doc_positions not in DOC_POSITIONS:
            raise ValueError(f"unknown doc_positions {doc_positions!r}; valid are {', '.join(DOC_POSITIONS)}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"got {len(caches)} caches for {len(self.layers)} layers; use model.new_caches()")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq) token ids, got shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.cfg.vocab_size)
        if input_ids.shape[-1] > self.cfg.max_seq_len:
            raise ValueError(f"input of {input_ids.shape[-1]} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        documents = None
        if doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; expected {tuple(input_ids.shape)} "
                                 "(one document index per input token)")
            flex = doc_ids.is_cuda and self.layers[0].attn.resolve_impl(impl) == "sdpa"
            documents = DocumentMask.build(doc_ids, flex=flex)
            if positions is None and doc_positions == "restart":
                positions = document_positions(documents.starts)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, attention_mask, None if caches is None else caches[i], impl, documents)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            if cpu_kernels.fuses(logits):
                loss = cpu_kernels.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits, loss)

    def new_caches(self) -> list:
        """One empty KV cache per layer, of the kind each layer's attention variant needs."""
        return [layer.attn.new_cache() for layer in self.layers]

    def update_moe_biases(self) -> list[dict[str, float]]:
        """Call once after every optimizer step: loss-free balancing update; per-layer load metrics."""
        return [layer.ffn.router.update_bias() for layer in self.layers if isinstance(layer.ffn, MoE)]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, on_token=None) -> torch.Tensor:
        """Continue ``input_ids`` (``(B, T)``, no padding) by up to ``max_new_tokens`` tokens, with the KV cache.

        Sampling as in :func:`kha.sampling.next_token`: ``temperature=0`` is greedy, else a draw from
        ``softmax(logits / temperature)`` limited to the ``top_k`` most likely tokens and the ``top_p`` nucleus.
        With ``eos_token_id`` a row that produced it is finished: it gets ``eos_token_id`` from then on, and
        decoding stops when every row is finished. ``on_token(tokens)`` is called with each new ``(B, 1)``
        column as soon as it is chosen (for streaming).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p, self.cfg.vocab_size)
        caches = self.new_caches()
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, caches=caches).logits[:, -1]
        for step in range(max_new_tokens):
            nxt = next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            tokens.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            logits = self(nxt, caches=caches).logits[:, -1]
        return torch.cat(tokens, dim=1)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated (per token) parameters, counted on a model built on the meta device.

    Tied embeddings count once. Activated = total minus the experts a token does not use.
    """
    with torch.device("meta"):
        model = DecoderLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if cfg.moe:
        per_expert = 3 * cfg.d_model * cfg.moe.d_expert
        inactive = cfg.n_layers * (cfg.moe.n_experts - cfg.moe.top_k) * per_expert
    return {"total": total, "activated": total - inactive}
