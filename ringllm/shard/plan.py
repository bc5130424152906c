"""The shard plan: which slice of every tensor each peer owns.

A pure function of (model hyperparameters, capacity weights, FFN block size), so every peer
computes the same plan independently; its digest goes into the handshake so peers with
different plans refuse each other.

Megatron-style split (gpt-fast's "colwise"/"rowwise"):
- attention by query heads: attn_q by output rows (column-parallel), attn_output by input
  columns (row-parallel). A peer also holds the k and v rows of every KV head its query heads
  read, so a KV head whose query group is cut between two peers is computed and cached by
  both (vLLM's KV-head replication). Why not whole KV groups: SmolLM2 has only 3 KV heads, so
  P=2 would split attention 2/1 and P=4 would leave a peer without attention, whatever the
  capacity weights say; each layer's attention ends in an all-reduce that waits for the
  slowest peer. Query heads split 5/4 at P=2 and 3/2/2/2 at P=4; the duplicated k/v rows cost
  2 * head_dim rows per cut group. (On the 2-core test box the tok/s difference at P=2 was
  within its noise: there both peers wait ~125 us per all-reduce whatever the split.)
- FFN by hidden units, in whole quant blocks of ffn_down's type (ffn_down is row-parallel, so
  its input dimension must be cut on block boundaries): ffn_gate/ffn_up by rows, ffn_down by
  columns.
- vocabulary by rows of token_embd / output (column-parallel logits).

Units are apportioned to capacity weights by the largest-remainder method, ties broken by
rank, so the split is deterministic and proportional (within one unit) to the weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

from ringllm.errors import ConfigError
from ringllm.model_file import ModelConfig

Range = tuple[int, int]  # [start, stop)


@dataclass(frozen=True)
class PeerShard:
    rank: int
    heads: Range  # query heads
    q_per_kv: int
    head_dim: int
    ffn: Range
    vocab: Range

    @property
    def kv_heads(self) -> Range:
        """KV heads whose keys and values this peer computes: those its query heads read."""
        h0, h1 = self.heads
        if h1 <= h0:
            return (h0 // self.q_per_kv, h0 // self.q_per_kv)
        return (h0 // self.q_per_kv, (h1 - 1) // self.q_per_kv + 1)

    @property
    def q_offset(self) -> int:
        """Query heads of the first owned KV group that belong to earlier peers."""
        return self.heads[0] - self.kv_heads[0] * self.q_per_kv

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[PeerShard, ...]

    @property
    def size(self) -> int:
        return len(self.shards)

    def __getitem__(self, rank: int) -> PeerShard:
        return self.shards[rank]

    def digest(self) -> str:
        """A stable hash of the plan, compared at the handshake."""
        text = json.dumps([asdict(s) for s in self.shards], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def apportion(total: int, weights: Sequence[float]) -> list[Range]:
    """Split ``total`` units into contiguous ranges proportional to ``weights``.

    Largest-remainder method: each share is floor(total * w / sum(w)), then the leftover units
    go to the largest fractional parts (lower rank first on ties). Shares may be zero.
    """
    if not weights or any(not (w > 0) for w in weights):
        raise ConfigError(f"capacity weights must all be positive, got {list(weights)}")
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def plan_shards(config: ModelConfig, weights: Sequence[float], ffn_block: int = 32) -> ShardPlan:
    """Plan the shards of ``config`` over ``len(weights)`` peers.

    ``ffn_block`` is the block size (values per block) of ffn_down's quant type; the FFN
    hidden dimension is cut only at multiples of it.
    """
    if config.ffn_dim % ffn_block:
        raise ConfigError(f"ffn dimension {config.ffn_dim} is not a multiple of its block size {ffn_block}")
    heads = apportion(config.n_heads, weights)
    ffn = [(a * ffn_block, b * ffn_block) for a, b in apportion(config.ffn_dim // ffn_block, weights)]
    vocab = apportion(config.vocab_size, weights)
    return ShardPlan(tuple(
        PeerShard(rank=r, heads=heads[r], q_per_kv=config.q_per_kv, head_dim=config.head_dim,
                  ffn=ffn[r], vocab=vocab[r])
        for r in range(len(weights))
    ))
