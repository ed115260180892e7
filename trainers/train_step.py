"""The EAGLE-3 objective, shared by the offline warm start and the online trainer.

For window positions i and unrolled step j (training-time test), the draft reads
    step 0: fc(features_i)            with embed(x_{i+1}), at position i
    step j: its own step j-1 output   with embed(x_{i+j+1}), at position i+j
and is trained with soft cross-entropy against the target's distribution p_{i+j+1}
(= softmax(lm_head(final_hidden_{i+j+1}))) restricted to the draft vocabulary. Only predictions
of generated tokens count (the prompt is context, never drafted at serving time).
Per-step top-1 accuracy acc_j gives the simulated acceptance length 1 + sum_k prod_{j<=k} acc_j.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide.draft_head import DraftHead
from tide.records import HiddenStateRecord


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T+1)
    features: torch.Tensor  # (B, T, 3H)
    final_hidden: torch.Tensor  # (B, T, H)
    loss_mask: torch.Tensor  # (B, T) True where p_t is the distribution of a generated token

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.features, self.final_hidden, self.loss_mask)))

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def windows(records: list[HiddenStateRecord], seq_len: int):
    """Cut records into windows of at most seq_len positions that contain generated tokens."""
    for r in records:
        T = r.num_positions
        for start in range(0, T, seq_len):
            end = min(start + seq_len, T)
            # p_t predicts x_{t+1}: it is a generated token's distribution when t+1 >= prompt_len
            mask = torch.arange(start, end) + 1 >= r.prompt_len
            if mask.any() and end - start >= 2:
                yield (r.input_ids[start : end + 1], r.features[start:end],
                       r.final_hidden[start:end], mask)


def collate(items) -> Batch:
    T = max(f.shape[0] for _, f, _, _ in items)
    B = len(items)
    f0, h0 = items[0][1], items[0][2]
    ids = torch.zeros(B, T + 1, dtype=torch.long)
    feats = torch.zeros(B, T, f0.shape[1], dtype=torch.float32)
    final = torch.zeros(B, T, h0.shape[1], dtype=torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (i, f, h, m) in enumerate(items):
        n = f.shape[0]
        ids[b, : n + 1], feats[b, :n], final[b, :n], mask[b, :n] = i, f.float(), h.float(), m
    return Batch(ids, feats, final, mask)


def make_batches(records, seq_len: int, batch_size: int, rng: random.Random | None = None):
    """Batches of windows. Shuffled (rng given): windows of similar length share a batch
    (sorted within chunks of 16 batches), so little of a batch is padding; batch order is random."""
    items = list(windows(records, seq_len))
    if rng is not None:
        rng.shuffle(items)
        chunk = 16 * batch_size
        items = [x for i in range(0, len(items), chunk)
                 for x in sorted(items[i : i + chunk], key=lambda w: w[1].shape[0])]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    for b in batches:
        yield collate(b)


def ttt_forward(head: DraftHead, embed, target_lm_rows: torch.Tensor, batch: Batch, steps: int):
    """Returns the loss and per-step accuracy (list of `steps` floats; tensor loss).

    The LM heads (the draft's and the target's restricted one, most of the cost) run only where
    a loss is taken: on predictions of generated tokens, never on prompt or padding positions.
    """
    B, T = batch.loss_mask.shape
    dtype = head.fc.weight.dtype
    with torch.no_grad():
        ids = F.pad(batch.input_ids, (0, steps))  # room for the shifts
        final = F.pad(batch.final_hidden, (0, 0, 0, steps + 1)).to(dtype)  # (B, T+steps+1, H)
        pad_mask = F.pad(batch.loss_mask, (0, steps + 1))
        rows = target_lm_rows.to(dtype)
    hidden = head.fuse(batch.features.to(dtype))
    positions = torch.arange(T, device=hidden.device)
    base, diag = None, []
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    accs = []
    for j in range(steps):
        emb = embed(ids[:, j + 1 : j + 1 + T]).to(dtype)  # (B, T, H)
        hidden, kv = head(hidden, emb, positions + j, ttt_base=base, ttt_diag=diag)
        if base is None:
            base = kv
        else:
            diag.append(kv)
        b, i = pad_mask[:, j + 1 : j + 1 + T].nonzero(as_tuple=True)  # (N,) each
        if len(b) == 0:
            accs.append(0.0)
            continue
        with torch.no_grad():
            p = torch.softmax(final[b, i + j + 1] @ rows.T, dim=-1)  # p_{i+j+1}, (N, Vd)
        logp = torch.log_softmax(head.logits(hidden[b, i]).float(), dim=-1)  # (N, Vd)
        loss = loss + (-(p * logp).sum(-1)).mean()
        with torch.no_grad():
            accs.append(float((logp.argmax(-1) == p.argmax(-1)).float().mean()))
    return loss / steps, accs


def simulated_accept_len(accs: list[float]) -> float:
    total, run = 1.0, 1.0
    for a in accs:
        run *= a
        total += run
    return total


def train_step(head: DraftHead, embed, target_lm_rows, batch: Batch, optimizer, steps: int,
               grad_clip: float, bf16: bool = False) -> dict:
    """One optimizer step; fp32, or with bf16: the forward under bf16 autocast (about 2x faster
    on CPUs with bf16 units, about 5x slower on CPUs without; see tide.models.resolve_dtype)."""
    head.train()
    # weights, gradients and optimizer state stay fp32 either way
    with torch.autocast(target_lm_rows.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, accs = ttt_forward(head, embed, target_lm_rows, batch, steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(head.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "acc": accs, "sim_accept_len": simulated_accept_len(accs),
            "tokens": batch.num_tokens}


@torch.no_grad()
def evaluate(head: DraftHead, embed, target_lm_rows, records, steps: int, seq_len: int,
             batch_size: int = 8) -> dict:
    """Token-weighted loss / accuracy / simulated acceptance length over held-out records, in
    fp32 whatever the training precision (figures compare across machines and with the gate)."""
    head.eval()
    tot_loss, tot_acc, tot = 0.0, [0.0] * steps, 0
    for batch in make_batches(records, seq_len, batch_size):
        loss, accs = ttt_forward(head, embed, target_lm_rows, batch.to(target_lm_rows.device), steps)
        n = batch.num_tokens
        tot_loss += float(loss) * n
        tot_acc = [t + a * n for t, a in zip(tot_acc, accs)]
        tot += n
    if tot == 0:
        return {"loss": float("nan"), "acc": [0.0] * steps, "sim_accept_len": 1.0, "tokens": 0}
    accs = [a / tot for a in tot_acc]
    return {"loss": tot_loss / tot, "acc": accs, "sim_accept_len": simulated_accept_len(accs),
            "tokens": tot}


def make_optimizer(head: DraftHead, lr: float, weight_decay: float):
    return torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay)
