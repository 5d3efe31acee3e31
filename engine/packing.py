"""Packed micro-batches on the host: the attention kwargs of a packed row and the touches before the copy.

A packed micro-batch (``data.collate(packing=True)``, built by transformers'
``DataCollatorWithFlattening``) is one row of examples end to end with position ids restarting at 0
per example, and carries the cumulative sequence lengths that route it through padding-free
attention (:mod:`tunedeck.engine.attention`) without a host-device sync. They travel as the kwargs
transformers' flash-attention integrations use for the same purpose; models pass extra forward
kwargs down to their attention functions.
"""

from __future__ import annotations

from typing import Any

import torch

# The kwargs transformers' flash-attention integrations use for the same purpose; models pass any
# extra forward kwargs down to their attention functions.
CU_Q, CU_K, MAX_Q, MAX_K = "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"
VARLEN_KWARGS = (CU_Q, CU_K, MAX_Q, MAX_K)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths (int32, ``[0, l0, l0+l1, ..., total]``) and the longest length of the
    sequences in a packed batch, each of which starts where its position id is 0. Rows are read end
    to end; a row that does not start at 0 still starts a sequence. On a CUDA tensor this syncs.
    For callers that have only position ids (a packed batch from ``data.collate`` has the lengths)."""
    flat = position_ids.reshape(-1)
    total = flat.numel()
    starts = torch.nonzero(flat == 0).flatten()
    row_starts = torch.arange(0, total, max(1, position_ids.shape[-1]), device=flat.device)
    starts = torch.unique(torch.cat([starts, row_starts]))  # sorted
    cu = torch.cat([starts, torch.tensor([total], device=flat.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if total else 0
    return cu, max_len


def packed_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The forward kwargs that route a packed row through ``tunedeck_varlen``, from its position ids."""
    cu, max_len = cu_seqlens(position_ids)
    return {CU_Q: cu, CU_K: cu, MAX_Q: max_len, MAX_K: max_len}


def prepare_batch(batch: dict[str, Any], varlen: bool) -> dict[str, Any]:
    """Host-side touches to a collated batch before it is copied to the device: an attention mask of
    all ones goes (the model then needs none), and so do the cumulative lengths of a packed batch
    unless the model runs padding-free attention (``varlen``), which reads them."""
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    if not varlen:
        batch = {k: v for k, v in batch.items() if k not in VARLEN_KWARGS}
    return batch
