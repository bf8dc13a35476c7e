"""One FAiD blender (paper §3.3, Eq. 5-7, Appendix A): multi-scale smoothing of retrieved patches in their
generation context, compatibility scores, and the residual added to the predicting position.

For a target cell i of the g x g token grid and each of the k retrieved patches e_ik (already embedded and
normalised, [D]): the layer's input-normalised hidden states of the cells generated before i are laid on the
grid (cells not yet generated are zero), e_ik is placed at cell i, and at each *hop level* h the (2h+1)^2
window around i is reduced to one vector by two convolutions of kernel h+1 (hop 1: 3x3 window, two kernel-2
convs; hop 2: 5x5, two kernel-3 convs; the official `SmoothPatchBlender`). Every first-stage output of such a
window covers the target cell, which is the paper's "only where the kernel covers position i". Levels are
mixed with softmax weights (a single level has weight 1):

    r_ik = sum_h softmax(w)_h * conv2_h(conv1_h(window_h(i, e_ik)))                       (Eq. 6)
    s_ik = sigmoid(W_b relu(W_a r_ik + b_a) + b_b)                                          (compatibility)
    residual_i = mean_k s_ik * r_ik,     carry_ik = s_ik * r_ik (input of the next blender)  (Eq. 7)

Fast path. The two convolutions have no nonlinearity between them, so r_ik is affine in the window:

    r_ik = A_i + M e_ik,   A_i = sum_{causal offsets d} K[d] x_{i+d} + c,   M = K[centre]

with K the composed kernel [D, D, 2H+1, 2H+1] of all levels (H the largest level; conv2 (x) conv1 is one
convolution whose kernel is W1 convolved with W2), "causal" the T window cells before the centre in raster order
(the official code zeroes the others), and c the biases pushed through. Only the T causal taps and the centre of K
are ever used, and `taps()` composes only those. The context term A_i is computed once per target and shared by
the k patches: one [T*D] x [T*D, D] product of the target's causal neighbours, for every cell of the grid at once
under teacher forcing and for one cell at a decode step. `direct_*` keep the official per-patch convolutions for
tests and reference; the fast path equals them to float tolerance.

After training, `freeze()` caches the taps (and, for the first blender, `token_table` caches M e and W_a M e for
every codebook token), so inference pays only the context product and the k-row score MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INITIALISATIONS = ("zero", "official")


def hop_levels(hops: str) -> tuple[int, ...]:
    """'12' -> (1, 2): the blender hop levels, sorted and unique."""
    if not hops or not hops.isdigit() or "0" in hops:
        raise ValueError(f"FAiD hops {hops!r}: give levels as digits 1-9, e.g. '1', '2' or '12'")
    return tuple(sorted({int(c) for c in hops}))


def causal_offsets(reach: int) -> list[tuple[int, int]]:
    """Window offsets (dr, dc), |dr|, |dc| <= reach, that precede the centre in raster order."""
    return [(dr, dc) for dr in range(-reach, 1) for dc in range(-reach, reach + 1) if dr < 0 or dc < 0]


class Blender(nn.Module):
    """A blender for hidden size D on a g x g grid. Parameter names follow the roles: `first[j]` / `second[j]`
    are the two convolutions of level `levels[j]` (official conv1/conv12, conv2/conv22), `hop_logits` the
    level weights (official conv_weights), `compatibility` the score MLP, `norm` the RMSNorm applied to the
    blender's input patches (official retrieval_layernorm)."""

    def __init__(self, hidden_size: int, grid: int, hops: str, eps: float = 1e-6, init: str = "zero"):
        super().__init__()
        self.levels = hop_levels(hops)
        self.grid, self.reach = grid, max(self.levels)
        d = hidden_size
        self.first = nn.ModuleList(nn.Conv2d(d, d, h + 1) for h in self.levels)
        self.second = nn.ModuleList(nn.Conv2d(d, d, h + 1) for h in self.levels)
        self.hop_logits = nn.Parameter(torch.ones(len(self.levels))) if len(self.levels) > 1 else None
        self.compatibility = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1), nn.Sigmoid())
        self.norm = nn.RMSNorm(d, eps=eps)
        self.offsets = causal_offsets(self.reach)
        self._frozen: dict | None = None
        self._tap_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "zero") -> None:
        """``official``: Kaiming-normal (ReLU gain) weights and zero biases everywhere (`train_FAiD.py`).
        ``zero`` (default): the same, then the second convolution of every level zeroed, so the blender adds
        nothing until training gives it a reason to: FAiD starts as the vanilla backbone, as LoRA starts at zero.
        On the Shapes world the official initialisation adds residuals of a third of the hidden-state norm at
        step 0, and training answers by driving every compatibility score to ~0 (the blenders end unused);
        see the FAiD closing note for the measurements."""
        if init not in INITIALISATIONS:
            raise ValueError(f"blender init {init!r}: choose one of {INITIALISATIONS}")
        for module in [*self.first, *self.second, *self.compatibility]:
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        if init == "zero":
            for module in self.second:
                nn.init.zeros_(module.weight)

    def level_weights(self) -> torch.Tensor:
        if self.hop_logits is None:
            return self.first[0].weight.new_ones(1)
        return torch.softmax(self.hop_logits, dim=0)

    # ------------------------------------------------------------------------------------------ composition
    def taps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M [D, D], context matrix [T * D, D], c [D]) of the level-weighted composed kernel K = conv2 (x) conv1:
        M = K[centre]; row block t of the context matrix is K[offsets[t]] transposed; c the biases pushed through.

        Only these T + 1 of K's (2H+1)^2 taps are ever used. A tap (dr, dc) of level h is
        K_h[h + dr, h + dc] = sum_{p, q} W2[:, :, p, q] W1[:, :, h + dr - p, h + dc - q] over the kernel positions
        that meet, one matrix product per tap: 45 D x D x D products for hops '2' against the 225 of convolving the
        whole kernels (the convolution also multiplies the zero padding)."""
        if self._frozen is not None and not self.training:
            return self._frozen["centre"], self._frozen["context"], self._frozen["bias"]
        weights = self.level_weights()

        def tap(dr: int, dc: int) -> torch.Tensor:
            total = 0.0
            for j, h in enumerate(self.levels):
                u, v = h + dr, h + dc
                if not (0 <= u <= 2 * h and 0 <= v <= 2 * h):
                    continue  # outside this level's window
                pairs = [(p, q) for p in range(max(0, u - h), min(h, u) + 1)
                         for q in range(max(0, v - h), min(h, v) + 1)]
                second = torch.cat([self.second[j].weight[:, :, p, q] for p, q in pairs], dim=1)  # [D, n D]
                first = torch.cat([self.first[j].weight[:, :, u - p, v - q] for p, q in pairs], dim=0)  # [n D, D]
                total = total + weights[j] * (second @ first)
            return total

        bias = 0.0
        for j in range(len(self.levels)):
            w2, b1, b2 = self.second[j].weight, self.first[j].bias, self.second[j].bias
            bias = bias + weights[j] * (w2.sum((2, 3)) @ b1 + b2)
        context = torch.cat([tap(dr, dc).T for dr, dc in self.offsets], dim=0)
        return tap(0, 0), context, bias

    @torch.no_grad()
    def freeze(self) -> None:
        """Cache the composed taps for inference (call after loading weights; `train()` drops the cache)."""
        was_training = self.training
        self.train(False)
        self._frozen = None
        centre, context, bias = self.taps()
        self._frozen = {"centre": centre, "context": context, "bias": bias}
        self.train(was_training)

    def train(self, mode: bool = True):
        if mode:
            self._frozen = None
        return super().train(mode)

    # ------------------------------------------------------------------------------------------ fast path
    def forward(self, states: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. states [B, N, D] (row j: state of the position whose input is token j), patches
        [B, N, K, D] (raw: embedded retrievals or the previous blender's carry) -> (residual [B, N, D] for the
        positions predicting tokens 0..N-1, carry [B, N, K, D]). Row i depends on states j < i only."""
        batch, n, dim = states.shape
        centre, matrix, bias = self.taps()
        size = 2 * self.reach + 1
        grid = states.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        windows = F.unfold(grid, size, padding=self.reach).view(batch, dim, size * size, n)  # [B, D, S^2, N]
        causal = [(self.reach + dr) * size + self.reach + dc for dr, dc in self.offsets]
        gathered = windows[:, :, causal].permute(0, 3, 2, 1).reshape(batch, n, -1)  # [B, N, T * D], as step_context
        context = gathered @ matrix + bias  # [B, N, D]
        refined = context.unsqueeze(2) + self.norm(patches) @ centre.T  # [B, N, K, D]
        return self._blend(refined)

    def _blend(self, refined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        carry = self.compatibility(refined) * refined
        return carry.mean(dim=-2), carry

    def step_context(self, states: torch.Tensor, step: int,
                     taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decode step: the context term A [B, D] of target cell `step` from states [B, t >= step, D]; `taps`:
        the caller's `taps()`, when it has them (else composed here, or read from the frozen cache)."""
        _, matrix, bias = self.taps() if taps is None else taps
        if states.shape[1] == 0:  # step 0: no cell generated yet
            return bias.expand(states.shape[0], -1)
        cells, inside = self._taps(step, states.device)
        gathered = states[:, cells].to(matrix.dtype) * inside  # [B, T, D], zero where a tap is outside the grid
        return gathered.flatten(1) @ matrix + bias

    def _taps(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Raster indices [T] of the causal taps of target cell `step` (0 where outside the grid) and their
        inside-the-grid mask [T, 1]; cached per (step, device), so a decode step copies nothing to the device."""
        key = (step, str(device))
        if key not in self._tap_cache:
            row, col = divmod(step, self.grid)
            cells, inside = [], []
            for dr, dc in self.offsets:
                r, c = row + dr, col + dc
                ok = 0 <= r < self.grid and 0 <= c < self.grid
                cells.append(r * self.grid + c if ok else 0)
                inside.append(float(ok))
            self._tap_cache[key] = (torch.tensor(cells, device=device), torch.tensor(inside, device=device)[:, None])
        return self._tap_cache[key]

    def step(self, states: torch.Tensor, patches: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode step for target cell `step`: states [B, t, D], patches [B, K, D] -> (residual [B, D],
        carry [B, K, D])."""
        taps = self.taps()
        refined = self.step_context(states, step, taps).unsqueeze(1) + self.norm(patches) @ taps[0].T
        return self._blend(refined)

    @torch.no_grad()
    def token_table(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a first blender: embeddings [V, D] of every codebook token (before `norm`) -> {"centre": M e
        [V, D], "score": W_a M e [V, D]}, so that a step needs no per-patch matrix product."""
        if self._frozen is None:
            self.freeze()
        centre = self.norm(embeddings) @ self._frozen["centre"].T
        return {"centre": centre, "score": centre @ self.compatibility[0].weight.T}

    def step_from_table(self, states: torch.Tensor, tokens: torch.Tensor, table: dict[str, torch.Tensor],
                        step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for a first blender whose patches are the retrieved `tokens` [B, K] (-1: a zero patch, as the
        official code embeds an invalid retrieval), with `token_table`'s rows for those tokens."""
        context = self.step_context(states, step)  # [B, D]
        valid = (tokens >= 0).unsqueeze(-1)
        rows = tokens.clamp(min=0)
        refined = context.unsqueeze(1) + table["centre"][rows] * valid  # [B, K, D]
        hidden_in = context @ self.compatibility[0].weight.T + self.compatibility[0].bias
        hidden = torch.relu(hidden_in.unsqueeze(1) + table["score"][rows] * valid)
        scores = torch.sigmoid(self.compatibility[2](hidden))  # [B, K, 1]
        carry = scores * refined
        return carry.mean(dim=-2), carry

    # ------------------------------------------------------------------------------------------ direct path
    def direct_step(self, states: torch.Tensor, patches: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The official computation of a decode step (windows per patch, two convolutions per level):
        states [B, t >= step, D], patches [B, K, D] -> (residual [B, D], carry [B, K, D])."""
        batch, _, dim = states.shape
        k = patches.shape[1]
        grid = states.new_zeros(batch, self.grid * self.grid, dim)
        grid[:, :step] = states[:, :step]
        grid = grid.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        padded = F.pad(grid, [self.reach] * 4)
        row, col = divmod(step, self.grid)
        normed = self.norm(patches)  # [B, K, D]
        weights = self.level_weights()
        refined = 0.0
        for j, h in enumerate(self.levels):
            top, left = row + self.reach - h, col + self.reach - h
            window = padded[:, :, top:top + 2 * h + 1, left:left + 2 * h + 1]  # [B, D, 2h+1, 2h+1]
            window = window.unsqueeze(1).repeat(1, k, 1, 1, 1)  # [B, K, D, w, w]
            window[:, :, :, h, h] = normed
            out = self.second[j](self.first[j](window.flatten(0, 1)))  # [B*K, D, 1, 1]
            refined = refined + weights[j] * out.reshape(batch, k, dim)
        return self._blend(refined)

    def direct(self, states: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing through `direct_step` position by position (slow; for tests)."""
        outputs = [self.direct_step(states, patches[:, i], i) for i in range(states.shape[1])]
        return torch.stack([o[0] for o in outputs], 1), torch.stack([o[1] for o in outputs], 1)
