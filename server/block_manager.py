"""Paged KV blocks: allocation, reference counts and the prefix cache (pure policy, no torch).

A full block whose K/V have been computed is registered under a hash chain that starts from
the sequence's adapter *version* (name, load generation), so two adapters, or two loads of
one adapter, never share cached K/V. Freed blocks keep their hash until the space is reused:
an identical prefix arriving later (or a preempted sequence coming back) picks them up again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loraplex.server.sequence import AdapterRef, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once full and computed; the key in the prefix cache
    token_ids: tuple[int, ...] = ()


def prefix_root_hash(adapter: AdapterRef | None) -> int:
    """Where a sequence's hash chain starts: base model and each adapter version differ."""
    if adapter is None:
        return hash(("loraplex-prefix", None, 0))
    return hash(("loraplex-prefix", adapter.name, adapter.generation))


def chain_hash(parent: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    """Owns `num_blocks` physical KV blocks of `block_size` token positions each."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ref-count-0 blocks in reuse order: unhashed first, then least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._seq_hashes: dict[int, list[int]] = {}  # seq_id -> hash of each committed full block
        self.num_prefix_hit_tokens = 0  # lifetime total, for stats and tests
        self.num_prefix_query_tokens = 0  # tokens looked up at admission (vLLM's prefix_cache_queries)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission of a sequence that holds no blocks ---------------------------------------

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of `seq`. The last token is never served from the
        cache: the model must run on at least one token to produce the next logits. None for a
        sequence that must compute every position (prompt logprobs, see `Sequence.reads_prefix_cache`)."""
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        hits: list[int] = []
        parent = prefix_root_hash(seq.adapter)
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self._hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        return len(self._lookup_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `seq` (holding no blocks) can get its cached prefix plus `num_new_tokens`."""
        hits = self._lookup_prefix(seq)
        hits_in_free = sum(1 for b in hits if b in self._free)
        num_needed = self.num_blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return num_needed <= len(self._free) - hits_in_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Take the cached prefix (setting `seq.num_cached_tokens`) and blocks for new tokens."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        hits = self._lookup_prefix(seq)
        hashes: list[int] = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            hashes.append(block.hash)  # type: ignore[arg-type]
        self._seq_hashes[seq.seq_id] = hashes
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_prefix_hit_tokens = seq.num_cached_tokens
        self.num_prefix_hit_tokens += seq.num_cached_tokens
        if seq.reads_prefix_cache:  # a scoring sequence looks nothing up (vLLM counts it so too)
            self.num_prefix_query_tokens += seq.num_tokens
        self.may_append(seq, num_new_tokens)

    # -- growth of a running sequence --------------------------------------------------------

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks the table lacks for the next `num_new_tokens` positions (<= 0: none); per sequence per step."""
        return -(-(seq.num_cached_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self._num_missing_blocks(seq, num_new_tokens) <= len(self._free)

    def may_append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow the block table to cover the next `num_new_tokens` positions."""
        missing = self._num_missing_blocks(seq, num_new_tokens)
        if missing <= 0:
            return
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks for {seq} (check can_append first)")
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._hash_to_block.get(block.hash) == block_id:
            del self._hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    # -- after a step -----------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        parent = hashes[-1] if hashes else prefix_root_hash(seq.adapter)
        for i in range(len(hashes), seq.num_cached_tokens // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            hashes.append(parent)
            block = self.blocks[seq.block_table[i]]
            if parent in self._hash_to_block:
                continue  # another sequence computed the same prefix first; keep that copy
            block.hash, block.token_ids = parent, tokens
            self._hash_to_block[parent] = block.block_id

    def deallocate(self, seq: Sequence) -> None:
        """Drop the sequence's references; hashed blocks stay cached until reused."""
        for block_id in reversed(seq.block_table):  # tail blocks are the least likely to be shared
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_cached_tokens = 0
        self._seq_hashes.pop(seq.seq_id, None)
