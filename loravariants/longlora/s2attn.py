"""Shifted sparse attention (S2-Attn, LongLoRA), training-time only.

Every head attends causally inside groups of ``G`` consecutive tokens. The first half of the
heads uses groups starting at 0, the second half groups shifted by ``G // 2``, so information
flows across group boundaries through the shifted heads (n = 16, G = 8 shown)::

    position          0 1 2 3 4 5 6 7 8 9 . . . . . 15
    heads [0, h/2)   [ group 0       ][ group 1         ]     groups [0,G), [G,2G), ...
    heads [h/2, h)   [ g0    ][ group 1         ][ g2   ]     groups [0,G/2), [G/2,3G/2), ...

No token moves and nothing wraps around: the shifted half's first group is the short ``[0, G/2)``
and its last group is whatever is left (``[n - G/2, n)`` when ``G`` divides ``n``). Lengths
that ``G`` does not divide simply end with a shorter group. Inside a group attention is causal,
and a key-padding mask (or any 4-D boolean mask) is applied on top.

Cost: about ``n * G / 2`` query-key pairs instead of ``n**2 / 2``, i.e. 4x fewer at ``G = n/4``.

Kernels with identical semantics:
    * ``"sdpa"``: groups of equal length become batch elements of one
      ``torch.nn.functional.scaled_dot_product_attention`` call with ``is_causal=True`` (with a
      per-group boolean mask when there is padding).
    * ``"flash"``: ``flash_attn_varlen_func`` with one variable-length segment per group and
      sample (CUDA, fp16/bf16, optional dependency ``flash-attn``).
    * ``"eager"``: dense ``(h, n, n)`` block mask and explicit softmax; the reference for tests.

Importing :mod:`loravariants.longlora` registers :func:`s2_attention_forward` as the transformers
attention implementation ``"s2_attn"``; in eval mode and with a KV cache it is exact full causal
attention (transformers' SDPA path). ``"s2_attn_noshift"`` is the same without the shifted half
(every head in groups ``[0, G), [G, 2G), ...``): LongLoRA Table 1's control.
"""

# Over 500 lines on purpose: one readable file per method; the shift-and-group equations,
# the attention backend and its checks belong together.

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "sdpa", "flash", "eager")
DEFAULT_GROUP_SIZE_RATIO = 0.25

__all__ = [
    "KERNELS",
    "group_size_for",
    "s2_attention_forward",
    "s2_block_mask",
    "s2_noshift_attention_forward",
    "shifted_sparse_attention",
]


# ----------------------------------------------------------------------------- group layout


def _segments(n: int, group_size: int, shift: int) -> list[tuple[int, int, int]]:
    """Split ``[0, n)`` into runs of equal-length groups.

    Returns:
        ``(start, num_groups, length)`` triples covering ``[0, n)`` in order: an optional short
        head ``[0, shift)``, the full groups, and an optional shorter tail.
    """
    segments = []
    start = 0
    if shift:
        head = min(shift, n)
        segments.append((0, 1, head))
        start = head
    full = (n - start) // group_size
    if full:
        segments.append((start, full, group_size))
        start += full * group_size
    if start < n:
        segments.append((start, 1, n - start))
    return segments


def _group_ids(n: int, group_size: int, shift: int, device: torch.device | None) -> torch.Tensor:
    """Group index of every position, (n,). Shifted groups: [0, shift), [shift, shift + G), ..."""
    pos = torch.arange(n, device=device)
    return (pos + (group_size - shift if shift else 0)) // group_size


def _head_halves(num_heads: int, shift: bool = True) -> list[tuple[int, int, int]]:
    """``(first_head, end_head, shift_flag)``: unshifted heads first (the larger half if odd).
    ``shift=False`` (LongLoRA Table 1's control): every head in the unshifted groups."""
    if not shift:
        return [(0, num_heads, 0)]
    split = num_heads - num_heads // 2
    halves = [(0, split, 0)]
    if split < num_heads:
        halves.append((split, num_heads, 1))
    return halves


def s2_block_mask(
    seq_len: int,
    group_size: int,
    num_heads: int,
    device: torch.device | str | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Dense S2-Attn mask: which key each query may see, per head.

    Args:
        seq_len: sequence length n.
        group_size: group size G.
        num_heads: number of query heads h; the last ``h // 2`` heads use the shifted groups.
        device: device of the result.
        shift: False: no head uses the shifted groups (S2-Attn without the shift).

    Returns:
        Boolean tensor (h, n, n), True where query i may attend key j (same group and j <= i).
    """
    _check_group_size(group_size)
    masks = []
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    for start, end, shifted in _head_halves(num_heads, shift):
        ids = _group_ids(seq_len, group_size, group_size // 2 if shifted else 0, device)
        same = (ids[:, None] == ids[None, :]) & causal
        masks.append(same.expand(end - start, -1, -1))
    return torch.cat(masks, dim=0)


# ----------------------------------------------------------------------------- masks


def _check_group_size(group_size: Any) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")


def _normalise_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a user mask into a key-padding mask (b, n) or a full boolean mask (b, 1, n, n).

    At most one of the two is returned; both are None when nothing is masked.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"attention_mask (2-D key padding) must have shape {(batch, kv_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.bool()
        return (None, None) if bool(valid.all()) else (valid, None)
    if attention_mask.dim() == 4:
        if attention_mask.shape[-2:] != (q_len, kv_len) or attention_mask.shape[1] != 1:
            raise ValueError(
                f"attention_mask (4-D) must have shape (b, 1, {q_len}, {kv_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask
        if mask.dtype != torch.bool:  # additive float mask: 0 = keep, large negative = drop
            mask = mask > torch.finfo(mask.dtype).min / 2
        return None, mask.expand(batch, -1, -1, -1)
    raise ValueError(
        f"attention_mask must be 2-D (b, n) or 4-D (b, 1, n, n), got {attention_mask.dim()}-D"
    )


def _segment_mask(
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
    start: int,
    num_groups: int,
    length: int,
) -> torch.Tensor | None:
    """Boolean mask (b * m, 1, L, L) for ``m`` consecutive groups of length ``L`` at ``start``.

    Includes causality, so the SDPA call must use ``is_causal=False`` when this is not None.
    """
    stop = start + num_groups * length
    if key_valid is not None:
        batch = key_valid.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool, device=key_valid.device).tril()
        valid = key_valid[:, start:stop].reshape(batch * num_groups, 1, length)
        # padded keys are never seen; padded queries see nothing (their output is zero)
        return valid[..., None, :] & valid[..., :, None] & causal
    if full_mask is not None:
        batch = full_mask.shape[0]
        block = full_mask[:, 0, start:stop, start:stop].reshape(
            batch, num_groups, length, num_groups, length
        )
        # (b, L, L, m): the diagonal blocks, one per group
        diag = torch.diagonal(block, dim1=1, dim2=3).permute(0, 3, 1, 2)
        # a user mask is intersected with causality (and the groups), as the eager path does
        causal = torch.ones(length, length, dtype=torch.bool, device=full_mask.device).tril()
        return diag.reshape(batch * num_groups, 1, length, length) & causal
    return None


# ----------------------------------------------------------------------------- kernels


def _kv_half(
    key_t: torch.Tensor, first: int, end: int, rep: int
) -> tuple[torch.Tensor, int, int, bool]:
    """Key/value heads serving query heads ``[first, end)``: ``(source, k0, k1, enable_gqa)``.

    ``key_t`` is (b, n, h_kv, d). The half reads heads ``[k0, k1)`` of ``source``: a slice of
    ``key_t`` itself when the half boundary falls between key/value groups or one key/value head
    serves the whole half, else (a group straddles the boundary) a gathered copy with one
    key/value head per query head.
    """
    if first % rep == 0 and end % rep == 0:
        return key_t, first // rep, end // rep, rep > 1
    if first // rep == (end - 1) // rep:  # one key/value head serves the whole half
        return key_t, first // rep, first // rep + 1, end - first > 1
    index = torch.arange(first, end, device=key_t.device) // rep
    return key_t.index_select(2, index), 0, end - first, False


class _Regions(torch.autograd.Function):
    """Views ``x[:, start:stop, h0:h1]`` of a (b, n, H, d) tensor, with a one-copy backward.

    Slicing with plain indexing would give each region a backward that materialises a full
    zero tensor, and ``split`` along two dims nests two concatenations; here the gradient of
    every region is written once into one buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, regions: tuple[tuple[int, int, int, int], ...]):
        ctx.shape, ctx.regions = x.shape, regions
        ctx.set_materialize_grads(False)
        return tuple(x[:, a:b, h0:h1] for a, b, h0, h1 in regions)

    @staticmethod
    def backward(ctx, *grads):
        reference = next(g for g in grads if g is not None)
        cells = sum((b - a) * (h1 - h0) for a, b, h0, h1 in ctx.regions)
        # regions that tile x exactly are each written once; overlapping ones (a key/value
        # head shared by both halves) accumulate
        tiled = cells == ctx.shape[1] * ctx.shape[2] and all(g is not None for g in grads)
        out = reference.new_empty(ctx.shape) if tiled else reference.new_zeros(ctx.shape)
        for (a, b, h0, h1), g in zip(ctx.regions, grads, strict=True):
            if g is not None:
                region = out[:, a:b, h0:h1]
                region.copy_(g) if tiled else region.add_(g)
        return out, None


class _Assemble(torch.autograd.Function):
    """Write pieces (b, stop - start, h1 - h0, d) into their regions of one (b, n, H, d) output.

    One copy forward; the backward hands each piece a view of the output's gradient.
    """

    @staticmethod
    def forward(ctx, shape, regions, *pieces: torch.Tensor) -> torch.Tensor:
        ctx.regions = regions
        out = pieces[0].new_empty(shape)
        for (a, b, h0, h1), piece in zip(regions, pieces, strict=True):
            out[:, a:b, h0:h1].copy_(piece)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *(grad[:, a:b, h0:h1] for a, b, h0, h1 in ctx.regions))


def _group_calls(n: int, group_size: int, shifted: bool) -> list[tuple[int, list[tuple[int, int]]]]:
    """The SDPA calls of one head half: ``(length, [(start, num_groups), ...])``.

    Segments of equal group length share one call (the shifted half's short head ``[0, G/2)``
    and tail ``[n - G/2, n)`` when ``G`` divides ``n``), so a half needs two calls at most
    when ``G`` divides ``n``.
    """
    calls: dict[int, list[tuple[int, int]]] = {}
    for start, m, length in _segments(n, group_size, group_size // 2 if shifted else 0):
        calls.setdefault(length, []).append((start, m))
    return list(calls.items())


def _as_groups(pieces: list[torch.Tensor], runs: list[tuple[int, int]], length: int):
    """Region views (b, m * L, hh, d) -> SDPA layout (b * sum(m), hh, L, d).

    One run stays a view of the input (the (b, n, h, d) storage attention modules produce);
    several runs are stacked along the group axis (a copy of those few groups only).
    """
    grouped = [p.unflatten(1, (m, length)) for p, (_, m) in zip(pieces, runs, strict=True)]
    x = grouped[0] if len(grouped) == 1 else torch.cat(grouped, dim=1)
    return x.flatten(0, 1).transpose(1, 2)


def _call_mask(
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
    runs: list[tuple[int, int]],
    length: int,
) -> torch.Tensor | None:
    """The boolean mask (b * sum(m), 1, L, L) of one call, in the group order of
    :func:`_as_groups`; None when nothing is masked."""
    masks = [_segment_mask(key_valid, full_mask, start, m, length) for start, m in runs]
    if masks[0] is None:
        return None
    if len(masks) == 1:
        return masks[0]
    batch = masks[0].shape[0] // runs[0][1]
    stacked = [mask.unflatten(0, (batch, m)) for mask, (_, m) in zip(masks, runs, strict=True)]
    return torch.cat(stacked, dim=1).flatten(0, 1)


def _sdpa_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    shift: bool = True,
) -> torch.Tensor:
    """Groups of equal length become SDPA batch elements. Returns (b, n, h, d).

    Works on the (b, n, h, d) view of its inputs, the storage layout attention modules produce
    (``proj(x).view(b, n, h, d).transpose(1, 2)``): a run of consecutive groups of one head half
    is then a *view* ``(b * m, hh, L, d)``, so no input is copied (a gradient is written once,
    see :class:`_Regions`), and every call's output is copied once into the (b, n, h, d) result
    (:class:`_Assemble`). Per head half there is one call for the full groups and one for the
    short groups (the shifted half's head and tail together).
    """
    batch, num_heads, n, head_dim = query.shape
    rep = num_heads // key.shape[1]
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (query, key, value))
    # per call: (query heads, key/value sources, gqa, length, runs)
    calls = []
    for first, end, shifted in _head_halves(num_heads, shift):
        k_src, k0, k1, gqa = _kv_half(k_t, first, end, rep)
        v_src = _kv_half(v_t, first, end, rep)[0]
        for length, runs in _group_calls(n, group_size, bool(shifted)):
            calls.append((first, end, k_src, v_src, k0, k1, gqa, length, runs))

    # one _Regions per source tensor, so each gradient is assembled in one buffer
    wanted: dict[int, tuple[torch.Tensor, list]] = {}
    keys = []  # per call: the keys of its q, k, v region lists
    for first, end, k_src, v_src, k0, k1, _, length, runs in calls:
        call_keys = []
        for src, h0, h1 in ((q_t, first, end), (k_src, k0, k1), (v_src, k0, k1)):
            entry = wanted.setdefault(id(src), (src, []))
            call_keys.append((id(src), len(entry[1])))
            entry[1].extend((s, s + m * length, h0, h1) for s, m in runs)
        keys.append(call_keys)
    views = {
        key_id: _Regions.apply(src, tuple(regions)) for key_id, (src, regions) in wanted.items()
    }

    pieces, out_regions = [], []
    for (first, end, _, _, _, _, gqa, length, runs), call_keys in zip(calls, keys, strict=True):
        q, k, v = (
            _as_groups(list(views[key_id][i : i + len(runs)]), runs, length)
            for key_id, i in call_keys
        )
        mask = _call_mask(key_valid, full_mask, runs, length)
        row_ok = None
        if mask is not None:
            # rows with no visible key (padded queries) would give NaN: let them see the
            # whole group and zero their output afterwards
            row_ok = mask.any(-1, keepdim=True)
            mask = mask | ~row_ok
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=gqa,
        )
        if row_ok is not None:
            out = out * row_ok
        # (b * sum(m), hh, L, d) -> per run (b, m * L, hh, d)
        out = out.transpose(1, 2).unflatten(0, (batch, -1))
        offset = 0
        for start, m in runs:
            pieces.append(out[:, offset : offset + m].flatten(1, 2))
            out_regions.append((start, start + m * length, first, end))
            offset += m
    shape = (batch, n, num_heads, head_dim)
    return _Assemble.apply(shape, tuple(out_regions), *pieces)


def _eager_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    shift: bool = True,
) -> torch.Tensor:
    """Dense reference: explicit (h, n, n) block mask and softmax. Returns (b, n, h, d)."""
    batch, num_heads, n, head_dim = query.shape
    rep = num_heads // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    allowed = s2_block_mask(n, group_size, num_heads, query.device, shift)[None]  # (1, h, n, n)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :] & key_valid[:, None, :, None]
    if full_mask is not None:
        allowed = allowed & full_mask
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_ok = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~row_ok, 0.0)  # fully masked rows: finite, zeroed below
    probs = torch.softmax(scores, dim=-1) * row_ok
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return (probs @ value).transpose(1, 2).contiguous()


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    key_valid: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    shift: bool = True,
) -> torch.Tensor:
    """flash-attn varlen: one causal segment per (sample, group) of valid tokens.

    Padded tokens are dropped before the call, so a group's segment holds only its valid tokens
    in order; causal attention over them equals the masked dense computation. Returns
    (b, n, h, d) with zeros at padded positions.
    """
    from flash_attn import flash_attn_varlen_func

    batch, num_heads, n, head_dim = query.shape
    rep = num_heads // key.shape[1]
    if key_valid is None:
        key_valid = torch.ones(batch, n, dtype=torch.bool, device=query.device)
    flat_valid = key_valid.reshape(-1)
    index = flat_valid.nonzero().squeeze(1)  # valid tokens in (sample, position) order
    sample = index // n
    pos = index % n
    # tokens as rows: (b*n, heads, d)
    q_rows = query.transpose(1, 2).reshape(batch * n, num_heads, head_dim)[index]
    k_rows = key.transpose(1, 2).reshape(batch * n, key.shape[1], head_dim)[index]
    v_rows = value.transpose(1, 2).reshape(batch * n, value.shape[1], head_dim)[index]
    groups_per_sample = n // group_size + 2
    halves = []
    for first, end, shifted in _head_halves(num_heads, shift):
        shift = group_size // 2 if shifted else 0
        group = (pos + (group_size - shift if shift else 0)) // group_size
        segment = sample * groups_per_sample + group  # nondecreasing along the rows
        counts = torch.unique_consecutive(segment, return_counts=True)[1]
        cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        max_len = int(counts.max())
        if rep == 1 or (first % rep == 0 and end % rep == 0):
            k_half = k_rows[:, first // rep : end // rep]
            v_half = v_rows[:, first // rep : end // rep]
        else:
            kv_index = torch.arange(first, end, device=query.device) // rep
            k_half = k_rows.index_select(1, kv_index)
            v_half = v_rows.index_select(1, kv_index)
        out = flash_attn_varlen_func(
            q_rows[:, first:end].contiguous(),
            k_half.contiguous(),
            v_half.contiguous(),
            cu_seqlens,
            cu_seqlens,
            max_len,
            max_len,
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=True,
        )
        full = out.new_zeros(batch * n, end - first, head_dim).index_copy(0, index, out)
        halves.append(full)
    out = torch.cat(halves, dim=1) if len(halves) > 1 else halves[0]
    return out.view(batch, n, num_heads, head_dim)


# ----------------------------------------------------------------------------- public op


def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel: str = "auto",
    shift: bool = True,
) -> torch.Tensor:
    """Shifted sparse attention (S2-Attn) of LongLoRA.

    The first ``h - h // 2`` heads attend causally within groups ``[0, G), [G, 2G), ...``; the
    last ``h // 2`` heads within groups ``[0, G//2), [G//2, G//2 + G), ...``. The last group
    of each half may be shorter. Padded positions of a 2-D mask, and any query row that can see
    no key, output zeros (every kernel agrees on that).

    Args:
        query: (b, h, n, d).
        key: (b, h_kv, n, d), h divisible by h_kv (grouped-query attention when h_kv < h).
        value: (b, h_kv, n, d).
        group_size: G, tokens per group (>= 1); LongLoRA uses n // 4.
        attention_mask: optional (b, n) key-padding mask (1/True = real token, 0/False =
            padding, as HF's ``attention_mask``), or a boolean (b or 1, 1, n, n) mask (True =
            may attend; e.g. transformers' SDPA mask), intersected with the S2 groups. A float
            4-D mask is read as additive (0 = keep, dtype minimum = drop).
        scaling: softmax scale; default ``1 / sqrt(d)``.
        dropout: attention-probability dropout (apply only in training).
        kernel: ``"sdpa"``, ``"flash"`` (CUDA + flash-attn, 2-D masks only), ``"eager"``
            (dense reference) or ``"auto"`` (flash when usable, else sdpa).
        shift: False: every head in the unshifted groups, no information across group
            boundaries (LongLoRA Table 1's "S2-Attn w/o shift" control).

    Returns:
        (b, n, h, d), the layout transformers' attention functions return.

    Raises:
        ValueError: on bad shapes, ``group_size`` or ``kernel``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _check_group_size(group_size)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key and value must be 4-D (b, h, n, d)")
    batch, num_heads, n, _ = query.shape
    if key.shape[0] != batch or key.shape[2] != n or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"key/value must be (b, h_kv, n, d) matching query {tuple(query.shape)}, got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    if num_heads % key.shape[1]:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of key heads ({key.shape[1]})"
        )
    key_valid, full_mask = _normalise_mask(attention_mask, batch, n, n)

    if kernel == "auto":
        usable = (
            query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and full_mask is None
            and _flash_available()
        )
        kernel = "flash" if usable else "sdpa"
    if kernel == "flash":
        if not query.is_cuda or not _flash_available():
            raise ValueError("kernel='flash' needs a CUDA tensor and the flash-attn package")
        if full_mask is not None:
            raise ValueError("kernel='flash' supports only a 2-D (b, n) key-padding attention_mask")
        return _flash_kernel(query, key, value, group_size, key_valid, scaling, dropout, shift)
    kernels = {"eager": _eager_kernel, "sdpa": _sdpa_kernel}
    return kernels[kernel](
        query, key, value, group_size, key_valid, full_mask, scaling, dropout, shift
    )


# ----------------------------------------------------------------------------- transformers


def group_size_for(config: Any, seq_len: int) -> int:
    """Group size for a sequence of ``seq_len`` tokens from a model config.

    ``config.s2_group_size`` (absolute) wins when set; otherwise
    ``int(seq_len * config.s2_group_size_ratio)`` (default ratio 0.25), at least 1.
    """
    absolute = getattr(config, "s2_group_size", None)
    if absolute is not None:
        _check_group_size(absolute)
        return absolute
    ratio = getattr(config, "s2_group_size_ratio", None)
    ratio = DEFAULT_GROUP_SIZE_RATIO if ratio is None else ratio
    if not 0 < ratio <= 1:
        raise ValueError(f"s2_group_size_ratio must be in (0, 1], got {ratio!r}")
    return max(1, int(seq_len * ratio))


def s2_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    shift: bool = True,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"s2_attn"`` (see ``AttentionInterface``).

    S2-Attn while training (``module.training`` and gradients enabled) on a full causal
    prefill whose length is at least one group; otherwise (eval, ``torch.no_grad()`` such as
    ``generate()`` on a model left in train mode, KV cache with shorter queries, short inputs,
    non-causal modules) it is exactly transformers' SDPA attention, so evaluation and
    generation are unchanged.
    The mask it receives is transformers' SDPA mask (registered for ``"s2_attn"`` too): None
    without padding, else a boolean (b, 1, n, n) mask whose group-diagonal blocks are used.

    Args:
        module: the attention module (``training``, ``config``, ``is_causal`` are read).
        query: (b, h, n, d).
        key: (b, h_kv, n_kv, d).
        value: (b, h_kv, n_kv, d).
        attention_mask: None or the SDPA mask (b, 1, n, n_kv).
        dropout: attention dropout.
        scaling: softmax scale.
        is_causal: overrides ``module.is_causal`` when given.
        shift: False: ``"s2_attn_noshift"`` (:func:`s2_noshift_attention_forward`).
        **kwargs: passed through to the SDPA fallback.

    Returns:
        ``(output (b, n, h, d), None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    config = getattr(module, "config", None)
    group_size = group_size_for(config, q_len)
    training = module.training and torch.is_grad_enabled()
    if not training or not causal or q_len != kv_len or q_len < group_size:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    kernel = getattr(config, "s2_kernel", None) or "auto"
    out = shifted_sparse_attention(
        query,
        key,
        value,
        group_size,
        attention_mask=attention_mask,
        scaling=scaling,
        dropout=dropout,
        kernel=kernel,
        shift=shift,
    )
    return out, None


def s2_noshift_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"s2_attn_noshift"``: :func:`s2_attention_forward`
    with every head in the unshifted groups (LongLoRA Table 1: the shift is what lets
    information cross group boundaries). Exact full attention in eval, as ``"s2_attn"``."""
    return s2_attention_forward(module, query, key, value, attention_mask, shift=False, **kwargs)


def register() -> None:
    """Register ``"s2_attn"`` and ``"s2_attn_noshift"`` with transformers' attention and mask
    interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, forward in (
        ("s2_attn", s2_attention_forward),
        ("s2_attn_noshift", s2_noshift_attention_forward),
    ):
        AttentionInterface.register(name, forward)
        # transformers builds no mask at all for names missing here: register SDPA's mask so
        # that padding reaches the attention function (and the eval fallback gets SDPA's input)
        AttentionMaskInterface.register(name, sdpa_mask)
