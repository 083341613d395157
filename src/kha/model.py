"""The decoder LM the paper trains (section 4.1): Qwen3-style blocks with dense SwiGLU or MoE FFNs.

- ``SwiGLU``: ``down(silu(gate(x)) * up(x))``.
- ``Router`` + ``MoE``: dropless top-k routing with auxiliary-loss-free balancing (Wang et al., 2024;
  DeepSeek-V3): a per-expert bias is added to the router scores only to *choose* experts, gates come
  from the unbiased scores, and after every optimizer step the bias moves by ``rate * sign(mean - load)``
  from that step's token counts (all-reduced across ranks when distributed). Router math is fp32.
- The experts (``EXPERT_FORMS``): ``torch._grouped_mm`` or a padded block matmul over a buffer of static size with
  offsets computed on the device (no host sync: ``torch.compile(fullgraph=True)`` takes the MoE whole, and
  routing that changes step to step recompiles nothing), and the per-expert loop as the reference.
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
    """Chooses ``top_k`` experts per token; keeps the balancing bias and the token counts since its last update."""

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
                self.tokens_per_expert += expert_counts(chosen, self.cfg.n_experts)
        return chosen, gates

    @torch.no_grad()
    def update_bias(self) -> dict[str, torch.Tensor]:
        """Sign-rule bias step from the counts since the last call; returns (as 0-d tensors: reading them is the
        caller's choice, this method never waits for the device) and clears the load metrics. No counts (mean
        0) leave the bias as it is: every ``sign(mean - count)`` is then 0."""
        counts = self.tokens_per_expert
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        mean = counts.mean()
        metrics = {"max_over_mean": counts.max() / mean, "tokens": counts.sum()}  # 0 / 0 = nan: no tokens
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(mean - counts)
        counts.zero_()
        return metrics


def expert_counts(chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many rows of ``chosen`` (expert indices) went to each expert: an ``(n_experts,)`` int64 tensor of static
    size (``torch.bincount``'s size would depend on the values)."""
    flat = chosen.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def run_experts_loop(x: torch.Tensor, counts, w_gate, w_up, w_down) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous slice of ``x`` (rows sorted by expert; ``counts[e]`` rows for
    expert ``e``, a list or tensor), one expert at a time. The reference the other forms are tested against; it
    reads the counts on the host (a device sync, a graph break under ``torch.compile``)."""
    outs = []
    for e, chunk in enumerate(torch.split(x, torch.as_tensor(counts).tolist())):
        if chunk.shape[0]:
            outs.append((F.silu(chunk @ w_gate[e]) * (chunk @ w_up[e])) @ w_down[e])
    return torch.cat(outs) if outs else x.new_zeros(0, w_down.shape[-1])


def padded_layout(counts: torch.Tensor, n_rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where the ``n_rows`` expert-sorted rows go in a buffer in which each expert's group starts at a multiple
    of ``align`` rows, all computed on the device from ``counts`` (no host sync, static shapes).

    Returns each row's position, the groups' end offsets (int32, as ``torch._grouped_mm`` takes them; the last
    group runs to the buffer's end, so that every row of the buffer belongs to a group), and the buffer's size:
    ``n_rows + n_experts * (align - 1)`` rounded up to a multiple of ``align``, the most the padding can need.
    """
    counts = counts.to(torch.int64)
    size = -(-(n_rows + counts.shape[0] * (align - 1)) // align) * align
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    ends = torch.cat([ends[:-1], ends.new_full((1,), size)])
    rows = torch.arange(n_rows, device=counts.device)
    expert = torch.bucketize(rows, torch.cumsum(counts, 0), right=True)  # the expert of each sorted row
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)  # padded start - start
    return rows + shift[expert], ends.to(torch.int32), size


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (rows of ``x``). On CPU as ``index_select``, whose backward is ``index_add_``: indexing's,
    ``index_put_`` with accumulation, made an MoE training step about 1.06x (tiny-moe) to 1.24x (study shape)
    slower in bf16 (benchmarks/moe.py; docs/benchmarks.md, section n). Elsewhere by indexing (not measured)."""
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


def _scatter_rows(x: torch.Tensor, position: torch.Tensor, size: int) -> torch.Tensor:
    return x.new_zeros(size, x.shape[-1]).index_copy(0, position, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on (``_grouped_mm`` is not autocast by torch)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def run_experts_grouped(x: torch.Tensor, counts, w_gate, w_up, w_down) -> torch.Tensor:
    """The same as :func:`run_experts_loop` with ``torch._grouped_mm``, in autocast's dtype.

    Each expert's rows start 16-byte aligned in a buffer of static size (:func:`padded_layout`), so the group
    offsets stay on the device and the shapes never change with the routing: no sync, no recompilation.
    """
    dtype = _compute_dtype(x)
    position, ends, size = padded_layout(torch.as_tensor(counts, device=x.device), x.shape[0],
                                         max(1, 16 // dtype.itemsize))
    buffer = _scatter_rows(x.to(dtype), position, size)
    w_gate, w_up, w_down = (w.to(dtype) for w in (w_gate, w_up, w_down))
    hidden = swiglu_gate(torch._grouped_mm(buffer, w_gate, offs=ends), torch._grouped_mm(buffer, w_up, offs=ends))
    return gather_rows(torch._grouped_mm(hidden, w_down, offs=ends), position)


def padded_block(n_rows: int, n_experts: int) -> int:
    """Rows per block of :func:`run_experts_padded`: a power of two from 8 to 128, about half the mean rows per
    expert. Larger blocks mean fewer weight gathers and larger matmuls (on a 2-core CPU a layer of ``tiny-moe``
    ran fastest at 128, 0.65-0.75x the time at 32, measured eager and compiled), smaller ones less padding."""
    return 1 << max(3, min(7, (n_rows // (2 * n_experts)).bit_length() - 1))


def run_experts_padded(x: torch.Tensor, counts, w_gate, w_up, w_down, block: int | None = None) -> torch.Tensor:
    """The same as :func:`run_experts_loop` as three batched matmuls over blocks of ``block`` rows (default:
    :func:`padded_block`), each block one expert's: the form for where ``torch._grouped_mm`` is missing or slow.

    Each expert's rows are padded to whole blocks in a buffer of static size (:func:`padded_layout`); every block
    is multiplied by its expert's weights (gathered per block). Dropless, no sync, shapes independent of the
    routing; it pays up to ``block - 1`` zero rows per expert and the weight gathers.
    """
    block = block or padded_block(x.shape[0], w_gate.shape[0])
    dtype = _compute_dtype(x)
    position, ends, size = padded_layout(torch.as_tensor(counts, device=x.device), x.shape[0], block)
    n_blocks = size // block
    starts = torch.arange(n_blocks, device=x.device) * block
    owner = torch.bucketize(starts, ends.to(torch.int64), right=True)  # the expert of each block
    blocks = _scatter_rows(x.to(dtype), position, size).view(n_blocks, block, -1)
    w_gate, w_up, w_down = (gather_rows(w.to(dtype), owner) for w in (w_gate, w_up, w_down))
    hidden = swiglu_gate(torch.bmm(blocks, w_gate), torch.bmm(blocks, w_up))
    return gather_rows(torch.bmm(hidden, w_down).view(size, -1), position)


_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (it is private, and on CUDA needs a
    recent GPU and bf16): tried once per device type and dtype on a small problem, with gradients on even when
    the first call comes from ``no_grad`` or inference code (else the probe's backward would fail there and
    switch ``_grouped_mm`` off for the whole process). ``torch.compile`` runs it eagerly and keeps the answer."""
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


def run_experts(x: torch.Tensor, counts, w_gate, w_up, w_down) -> torch.Tensor:
    """Every expert's SwiGLU without a Python loop or a host sync: ``torch._grouped_mm`` where it works (on CUDA:
    a recent GPU, bf16, rows a multiple of 16 bytes), else the padded batched matmul (:func:`run_experts_padded`).

    On CPU the padded form is taken: at ``tiny-moe``'s shape it ran a layer in 0.8x the time of ``_grouped_mm``
    in fp32 and 0.5x in bf16 eager, and 0.3x in bf16 compiled (benchmarks/moe.py, docs/benchmarks.md);
    ``torch.compile`` accepts ``_grouped_mm`` in bf16 only.
    """
    if takes_grouped_mm(x.device, _compute_dtype(x), x.shape[-1], w_gate.shape[-1]):
        return run_experts_grouped(x, counts, w_gate, w_up, w_down)
    return run_experts_padded(x, counts, w_gate, w_up, w_down)


def takes_grouped_mm(device: torch.device, dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    """:func:`run_experts`' choice: ``_grouped_mm`` off CPUs, where it works, with rows of a multiple of 16 bytes,
    and in bf16 while compiling."""
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (d_model, d_expert))
    traceable = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return device.type != "cpu" and aligned and traceable and grouped_mm_works(device, dtype)


EXPERT_FORMS = {"auto": run_experts, "grouped": run_experts_grouped, "padded": run_experts_padded,
                "loop": run_experts_loop}


class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts; expert weights stacked as ``(E, in, out)``."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.w_gate = nn.Parameter(torch.empty(cfg.n_experts, d_model, cfg.d_expert))
        self.w_up = nn.Parameter(torch.empty(cfg.n_experts, d_model, cfg.d_expert))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, d_model))
        self.form = "auto"  # how the experts run: a key of EXPERT_FORMS (all give the same function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, gates = self.router(flat)
        order = torch.argsort(chosen.flatten(), stable=True)  # the slot (token * top_k + j) of each sorted row
        counts = expert_counts(chosen, self.cfg.n_experts)
        if flat.device.type == "cpu" and torch.compiler.is_compiling():
            return self._compiled_cpu_dispatch(flat, chosen, gates, order, counts).to(x.dtype).view(shape)
        token = order // self.cfg.top_k
        y = EXPERT_FORMS[self.form](gather_rows(flat, token), counts, self.w_gate, self.w_up, self.w_down)
        # weight and sum the k expert outputs of each token in fp32 (under autocast y is bf16)
        y = y.float() * gather_rows(gates.flatten(), order)[:, None]
        combined = torch.zeros(flat.shape, device=flat.device, dtype=torch.float32).index_add_(0, token, y)
        return combined.to(x.dtype).view(shape)

    def _compiled_cpu_dispatch(self, flat, chosen, gates, order, counts) -> torch.Tensor:
        """The same function with no sum over repeated indices, forward or backward: every token copied to its
        ``top_k`` slots, the slots permuted into expert order and back by ``index_copy`` (unique indices; its
        backward is a gather), the ``top_k`` outputs summed per token. Compiled for a CPU, the gathers and
        ``index_add_`` of the eager form become atomic adds over every row; this form made the compiled
        tiny-moe step faster than eager's (docs/benchmarks.md, section n). Eager, ``index_add_`` is fast and the
        extra copies here are not, so eager keeps the other form."""
        rows = torch.arange(order.numel(), device=order.device)
        inverse = torch.empty_like(order).scatter_(0, order, rows)  # the sorted row of each slot
        slots = flat.repeat_interleave(self.cfg.top_k, dim=0)
        y = EXPERT_FORMS[self.form](slots.new_zeros(slots.shape).index_copy(0, inverse, slots), counts,
                                    self.w_gate, self.w_up, self.w_down)
        y = y.new_zeros(y.shape).index_copy(0, order, y).view(*chosen.shape, -1)
        return (y.float() * gates[..., None]).sum(1)


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


def check_doc_positions(value: str) -> None:
    if value not in DOC_POSITIONS:
        raise ValueError(f"unknown doc_positions {value!r}; valid are {', '.join(DOC_POSITIONS)}")


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
        check_doc_positions(doc_positions)
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

    def update_moe_biases(self) -> list[dict[str, torch.Tensor]]:
        """Call once after every optimizer step: loss-free balancing update (tensor ops only, no host sync);
        per-layer load metrics as 0-d tensors."""
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
