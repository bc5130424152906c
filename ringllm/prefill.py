"""The pipelined prefill of a model that runs alone: a long batch cut into token blocks, one
per kernel thread, each run through every layer on its own thread.

With kernel threads splitting each matrix product, the attention, norms and gates of a long
prefill still run on one thread. Cut instead into blocks (the tokens in order, a sequence's
tokens split where a cut falls), each block runs all of its layer on its own thread with its
kernels to itself; block ``j``'s attention at layer ``l`` waits until block ``j-1`` has
written its keys and values there, and never otherwise. Only a model alone may do this: in a
ring, the all-reduces of two blocks would pair up across peers in a different order.

The model stays unaware of threads: it gives :func:`run_pipelined` a ``layers(x, spans,
after_kv)`` function that calls ``after_kv(layer)`` once that layer's keys and values of the
spans are in the caches, before it reads any.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ringllm.model_file import ModelConfig
from ringllm.ops import quant

# A prefill is cut into blocks only if each gets at least this many tokens. Measured with two
# threads on SmolLM2 here (median time ratio, plain over pipelined, 6-12 interleaved pairs):
# 128 tokens 0.99-1.08, 192 1.12, 256 1.19, 512 1.35-1.40. Below that both threads decoding
# every weight for few rows costs more than the attention they share out.
PIPELINE_MIN_ROWS = 64
# The cost of attending to one key, per query-head width, in matrix weights' worth of work.
# Measured on SmolLM2 here, one thread, 128-token prefill: attention 58 ms, the matrix
# products 500 ms (numpy's softmax passes make a key cost ~11x its multiply-adds).
ATTENTION_WEIGHTS_PER_KEY = 11


@dataclass(frozen=True)
class Span:
    """Tokens [start, start + count) of one sequence (its KV cache), in one forward: a whole
    segment, or a segment's share of a pipelined block."""

    cache: Any  # model.KVCache
    start: int
    count: int


AfterKV = Callable[[int], None]
Layers = Callable[[np.ndarray, Sequence[Span], AfterKV | None], np.ndarray]


def plan_blocks(cfg: ModelConfig, spans: Sequence[Span], threads: int) -> list[list[Span]]:
    """The token blocks for ``threads`` threads, or ``[spans]`` if the batch is too short to cut.

    Blocks are sized for equal work: a row's attention grows with its position, so later
    blocks get fewer rows.
    """
    n = sum(s.count for s in spans)
    if threads <= 1 or n < threads * PIPELINE_MIN_ROWS:
        return [list(spans)]
    # Work of a row, in matrix weights: one layer's weights, plus its attention over its keys
    # at ATTENTION_WEIGHTS_PER_KEY per key and query-head width.
    c = cfg
    layer_weights = (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
                     + 3 * c.dim * c.ffn_dim)
    per_key = ATTENTION_WEIGHTS_PER_KEY * c.n_heads * c.head_dim
    keys = np.concatenate([np.arange(s.start + 1, s.start + s.count + 1) for s in spans])
    work = np.cumsum(layer_weights + per_key * keys)
    cuts = [int(np.searchsorted(work, work[-1] * j / threads)) for j in range(1, threads)]
    blocks, row, si, taken = [], 0, 0, 0
    for end in cuts + [n]:
        block = []
        while row < end:
            s = spans[si]
            take = min(s.count - taken, end - row)
            block.append(Span(s.cache, s.start + taken, take))
            row, taken = row + take, taken + take
            if taken == s.count:
                si, taken = si + 1, 0
        blocks.append(block)
    return [b for b in blocks if b]


class _LayerEvents:
    """Between two blocks: one event per layer, set once the earlier block has written its keys
    and values there; all set, and ``failed``, if it ended early."""

    def __init__(self, n_layers: int) -> None:
        self.events = [threading.Event() for _ in range(n_layers)]
        self.failed = False

    def fail(self) -> None:
        self.failed = True
        for e in self.events:
            e.set()


@dataclass(frozen=True)
class _Gate:
    """A block's two event lists: the block before it, and the one after."""

    wait_for: _LayerEvents | None
    announce: _LayerEvents | None

    def wrote(self, li: int) -> None:
        """This block's keys and values of layer li are in the cache: the next may read them.
        Then wait until the block before has written its own (the keys this block reads)."""
        if self.announce is not None:
            self.announce.events[li].set()
        if self.wait_for is not None:
            self.wait_for.events[li].wait()
            if self.wait_for.failed:
                raise RuntimeError("the pipelined prefill block before this one failed")


def run_pipelined(layers: Layers, n_layers: int, x: np.ndarray, blocks: list[list[Span]]) -> np.ndarray:
    """Run each block's rows of x through ``layers`` on its own kernel thread; the rows come
    back in order. A failing block releases the one after it, and the failure is raised."""
    written = [_LayerEvents(n_layers) for _ in blocks[1:]]  # block j -> block j + 1
    gates = [_Gate(written[j - 1] if j else None, written[j] if j < len(written) else None)
             for j in range(len(blocks))]
    bounds = np.cumsum([0] + [sum(s.count for s in b) for b in blocks])
    outs: list[np.ndarray] = [x[:0]] * len(blocks)

    def run(j: int) -> None:
        try:
            outs[j] = layers(x[bounds[j]:bounds[j + 1]], blocks[j], gates[j].wrote)
        except BaseException:
            if gates[j].announce is not None:
                gates[j].announce.fail()  # the next block must not wait forever
            raise

    quant.run_together([lambda j=j: run(j) for j in range(len(blocks))])
    return np.concatenate(outs)


def layers_maybe_pipelined(cfg: ModelConfig, layers: Layers, x: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """``layers(x, spans)``, pipelined over the kernel threads when the batch is long enough."""
    blocks = plan_blocks(cfg, spans, quant.threads())
    if len(blocks) == 1:
        return layers(x, spans, None)
    return run_pipelined(layers, cfg.n_layers, x, blocks)
