"""One layer's associative memory, as ARMT (arXiv 2407.04841) keeps it: the equations as plain functions of
tensors, the state every memory layer carries from segment to segment, and the projections that read and write it.
`memformers.armt` hosts it in a backbone (its docstring gives the equations and why each choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPSILON = 1e-5  # in every denominator; a read from an empty memory is still exactly 0 (its numerator is 0)


# --------------------------------------------------------------------------------------------------------------
# The equations, as plain functions of tensors


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:  # [..., d] → [..., 2·nu·d]
    """Deterministic parameter-free projection (Schlag et al. 2021): a non-negative feature map for linear memory."""
    doubled = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # [..., 2d]
    return torch.cat([doubled * doubled.roll(shifts, dims=-1) for shifts in range(1, nu + 1)], dim=-1)


def associative_read(
    features: torch.Tensor,  # [batch, length, d_key] φ(W_Q x)
    matrix: torch.Tensor,  # [batch, d_key, hidden] A
    normalizer: torch.Tensor,  # [batch, d_key] z
) -> torch.Tensor:  # [batch, length, hidden]
    """y_j = A φ_j / (zᵀ φ_j + ε): exactly 0 from an empty memory."""
    numerator = features @ matrix  # [batch, length, hidden]
    denominator = (features @ normalizer.unsqueeze(-1)) + EPSILON  # [batch, length, 1]
    return numerator / denominator


def delta_rule_write(
    keys: torch.Tensor,  # [batch, m, d_key] φ(W_K m_i)
    values: torch.Tensor,  # [batch, m, hidden] W_V m_i
    betas: torch.Tensor,  # [batch, m] σ(W_β m_i)
    matrix: torch.Tensor,  # [batch, d_key, hidden] A
    normalizer: torch.Tensor,  # [batch, d_key] z
) -> tuple[torch.Tensor, torch.Tensor]:  # new (A, z), same shapes
    """All memory tokens of a segment write at once, each against the memory as it was before the segment."""
    return matrix + matrix_update(keys, values, betas, matrix, normalizer), normalizer_write(keys, normalizer)


def matrix_update(
    keys: torch.Tensor,  # [batch, m, d_key] φ(W_K m_i)
    values: torch.Tensor,  # [batch, m, hidden] W_V m_i
    betas: torch.Tensor,  # [batch, m] σ(W_β m_i)
    matrix: torch.Tensor,  # [batch, d_key, hidden] A
    normalizer: torch.Tensor,  # [batch, d_key] z
) -> torch.Tensor:  # [batch, d_key, hidden]
    """The delta rule's change to A: Σ_i β_i (v_i − v̄_i) ⊗ k_i, with v̄_i what the memory held for k_i."""
    previous = associative_read(keys, matrix, normalizer)  # [batch, m, hidden] v̄_i
    return keys.transpose(1, 2) @ (betas.unsqueeze(-1) * (values - previous))


def normalizer_write(keys: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:  # [batch, m, d_key] → z'
    """z + Σ_i γ_i k_i, with γ_i = 1 − zᵀk_i / ‖k_i‖², clamped to [0, 1]: only what of k_i is new counts."""
    seen = (keys @ normalizer.unsqueeze(-1)).squeeze(-1)  # [batch, m] zᵀ k_i
    gamma = (1 - seen / (keys.square().sum(-1) + EPSILON)).clamp(0, 1).detach()  # [batch, m]
    return normalizer + (gamma.unsqueeze(-1) * keys).sum(1)


def state_dtype(weights: torch.dtype) -> torch.dtype:
    """What A and z are kept and written in: the weights' precision, at least float32 (float64 stays float64)."""
    return torch.promote_types(weights, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# State and the per-layer memory


@dataclass
class ReadTerms:
    """What one memory layer's read and write did in one step (`recording_reads`), with their gradients."""

    queries: torch.Tensor | None = None  # [batch, L, d_key] φ(W_Q x) of every position of the layout
    keys: torch.Tensor | None = None  # [batch, k, d_key] φ(W_K h) of the writing positions
    gates: torch.Tensor | None = None  # [batch, k] their β as written (0 where the position wrote nothing)
    gate_logits: torch.Tensor | None = None  # [batch, k] W_β's logits before σ and any write_threshold
    positions: torch.Tensor | None = None  # [batch, k] their layout positions; None: every position (k = L)


@dataclass
class AssociativeState:
    """Every layer's associative memory; its size does not depend on how many segments were read."""

    matrix: torch.Tensor  # [layers, batch, d_key, hidden] A per memory layer
    normalizer: torch.Tensor  # [layers, batch, d_key] z per memory layer

    def detach(self) -> AssociativeState:
        return AssociativeState(self.matrix.detach(), self.normalizer.detach())

    def reset(self, rows: torch.Tensor) -> AssociativeState:
        """Rows where `rows` [batch] is True start from an empty memory."""
        return AssociativeState(
            self.matrix.masked_fill(rows.view(1, -1, 1, 1), 0), self.normalizer.masked_fill(rows.view(1, -1, 1), 0)
        )

    def select(self, rows: torch.Tensor, other: AssociativeState) -> AssociativeState:
        return AssociativeState(
            torch.where(rows.view(1, -1, 1, 1), self.matrix, other.matrix),
            torch.where(rows.view(1, -1, 1), self.normalizer, other.normalizer),
        )


class AssociativeMemory(nn.Module):
    """One layer's projections: W_Q (read; None where it is W_K), W_K, W_V (zero at init) and W_β (write)."""

    def __init__(
        self,
        hidden: int,
        d_mem: int,
        nu: int,
        normalize: bool = True,
        normalize_gate: bool = False,
        gate_bias: float | None = None,
        share_query_key: bool = False,
    ) -> None:
        super().__init__()
        self.nu, self.normalize, self.normalize_gate = nu, normalize, normalize_gate
        self.query = None if share_query_key else nn.Linear(hidden, d_mem, bias=False)
        self.key = nn.Linear(hidden, d_mem, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.beta = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value.weight)  # an untrained ARMT reads nothing
        if gate_bias is not None:
            nn.init.constant_(self.beta.bias, gate_bias)

    def features(self, projected: torch.Tensor) -> torch.Tensor:  # [..., d_mem] → [..., d_key]
        """φ of a projected query or key: DPFP, at unit length when the layer normalises."""
        phi = dpfp(projected, self.nu)
        return F.normalize(phi, dim=-1) if self.normalize else phi

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, length, hidden] → [batch, length, d_key]
        """φ(W_Q x): what each token entering the layer asks the memory."""
        projection = self.key if self.query is None else self.query
        return self.features(projection(hidden.to(projection.weight.dtype)))

    def write_terms(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys k_i = φ(W_K m_i) [batch, m, d_key], values v_i = W_V m_i [batch, m, hidden] and strengths
        β_i = σ(W_β m_i) [batch, m] of the memory tokens' outputs `memory` [batch, m, hidden], in its precision."""
        keys, values, logits = self._write_projections(memory)
        return keys, values, torch.sigmoid(logits)

    def _write_projections(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`write_terms` with the gates' logits W_β m_i (+ b) [batch, m] in place of β: a loss on them must not
        read them back through σ, which saturates at 0 and 1."""
        return self._keys(memory), self._values(memory), self._gate_logits(memory)

    def _keys(self, memory: torch.Tensor) -> torch.Tensor:  # [batch, m, hidden] → [batch, m, d_key]
        return self.features(F.linear(memory, self.key.weight.to(memory.dtype)))

    def _values(self, memory: torch.Tensor) -> torch.Tensor:  # [batch, m, hidden] → [batch, m, hidden]
        return F.linear(memory, self.value.weight.to(memory.dtype))

    def _gate_logits(self, memory: torch.Tensor) -> torch.Tensor:  # [batch, m, hidden] → [batch, m]
        gate_input = F.rms_norm(memory, memory.shape[-1:], eps=EPSILON) if self.normalize_gate else memory
        dtype = memory.dtype
        return F.linear(gate_input, self.beta.weight.to(dtype), self.beta.bias.to(dtype)).squeeze(-1)

    def read(
        self, hidden: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor, record: ReadTerms | None = None
    ) -> torch.Tensor:
        """y [batch, length, hidden] for the hidden states [batch, length, hidden] entering the layer (and the
        queries, into `record` if given)."""
        features = self.queries(hidden)  # [batch, length, d_key]
        if record is not None:
            record.queries = features
        return associative_read(features, matrix.to(features.dtype), normalizer.to(features.dtype))

    def write(
        self,
        memory: torch.Tensor,
        matrix: torch.Tensor,
        normalizer: torch.Tensor,
        mask: torch.Tensor | None = None,  # [batch, m] 1 = writes; None: every one
        record: ReadTerms | None = None,
        threshold: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new (A, z) after the outputs `memory` [batch, m, hidden] of the writing tokens write, computed in the
        state's precision (`state_dtype`), outside any autocast: nothing carried is rounded. A token whose `mask`
        is 0 has a zero key, and a zero key changes neither A nor z; one whose β is at most `threshold`
        (`ARMTConfig.write_threshold`) changes z alone. `record`, if given, gets the keys, the gates as written
        and their logits (0 where the mask is 0)."""
        with torch.autocast(memory.device.type, enabled=False):
            memory = memory.to(matrix.dtype)
            keys, logits = self._keys(memory), self._gate_logits(memory)
            betas = torch.sigmoid(logits)
            if mask is not None:
                keys = keys * mask.to(keys.dtype).unsqueeze(-1)
            written = betas if not threshold else ((betas - threshold) / (1 - threshold)).clamp_min(0)
            if threshold and record is None and not torch.is_grad_enabled():
                return self._write_above_threshold(memory, keys, written, matrix, normalizer, mask)
            if record is not None:
                kept = 1 if mask is None else mask.to(betas.dtype)
                record.keys = keys
                record.gates = written * kept
                record.gate_logits = logits * kept
            return delta_rule_write(keys, self._values(memory), written, matrix, normalizer)

    def _write_above_threshold(
        self,
        memory: torch.Tensor,  # [batch, m, hidden] in the state's precision
        keys: torch.Tensor,  # [batch, m, d_key], 0 where the mask is
        written: torch.Tensor,  # [batch, m] the gates past the threshold, 0 at or under it
        matrix: torch.Tensor,
        normalizer: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`write` without gradients: the values and the delta rule's reads only for the tokens whose gate is above
        the threshold (of a trained reader's, a few in a hundred: the rest add exactly nothing to A), z from every
        token. Equal to the full write up to rounding; reading is about 1.15× faster
        (benchmarks/armt_sparse_writes.py)."""
        new_normalizer = normalizer_write(keys, normalizer)
        writes = written > 0 if mask is None else (written > 0) & mask.bool()  # [batch, m]
        count = int(writes.sum(1).max())
        if count == 0:
            return matrix, new_normalizer
        chosen = writes.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :count]  # [batch, count]
        gates = (written * writes).gather(1, chosen)  # rows with fewer writers: 0 after theirs
        keys = keys.gather(1, chosen.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        values = self._values(memory.gather(1, chosen.unsqueeze(-1).expand(-1, -1, memory.shape[-1])))  # [b, count, h]
        return matrix + matrix_update(keys, values, gates, matrix, normalizer), new_normalizer
