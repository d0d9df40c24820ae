"""RFC 6962 / RFC 9162 Merkle tree over stored perfect subtrees: appends, roots and proofs.

The tree is kept as its *perfect subtrees*: node (level, index) is the hash of leaves
``[index * 2**level, (index + 1) * 2**level)``, stored once all of them exist and never
changed after. Level 0 holds the leaf hashes. Any tree size's root and every proof node is
a fold of at most log2(n) of them (the binary decomposition of a range), so a proof costs
O(log n) reads and never a scan, at any size the log ever had. This is the layout of
tile-based logs (Sigstore, Go's checksum database) without the tiling.

Pure: storage is a ``get`` callable taking (level, index) pairs. Hashes come from the
standalone verifier (pipeline/transparency/verifier.py), so that the two can never differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pipeline.transparency.verifier import leaf_hash, node_hash

Node = tuple[int, int]  # (level, index)
GetNodes = Callable[[Sequence[Node]], list[bytes]]
EMPTY_ROOT = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def decompose(start: int, end: int) -> list[Node]:
    """The perfect subtrees covering ``[start, end)``, left to right (``start`` aligned as
    every range of RFC 6962's recursion is). Their right fold is the range's hash."""
    nodes: list[Node] = []
    while start < end:
        n = end - start
        k = n if n & (n - 1) == 0 else largest_power_of_two_below(n)
        level = k.bit_length() - 1
        nodes.append((level, start >> level))
        start += k
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its decomposition's hashes: H(a, H(b, H(c, ...)))."""
    result = hashes[-1]
    for h in reversed(hashes[:-1]):
        result = node_hash(h, result)
    return result


def _inclusion_ranges(index: int, start: int, end: int) -> list[tuple[int, int]]:
    """RFC 6962 2.1.1 PATH(m, D[n]) as ranges, leaf upwards."""
    ranges: list[tuple[int, int]] = []
    while end - start > 1:
        k = largest_power_of_two_below(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    return ranges[::-1]


def _consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """RFC 6962 2.1.2 PROOF(m, D[n]) as ranges, in proof order."""
    ranges: list[tuple[int, int]] = []
    start, end, m, whole = 0, second, first, True
    while m != end:
        k = largest_power_of_two_below(end - start)
        if m - start <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start, whole = start + k, False
    if not whole:
        ranges.append((start, end))
    return ranges[::-1]


def _resolve(ranges: list[tuple[int, int]], get: GetNodes) -> list[bytes]:
    plans = [decompose(s, e) for s, e in ranges]
    wanted = sorted({node for plan in plans for node in plan})
    found = dict(zip(wanted, get(wanted), strict=True))
    return [fold([found[node] for node in plan]) for plan in plans]


def root(size: int, get: GetNodes) -> bytes:
    """The root hash of the first ``size`` leaves."""
    if size == 0:
        return EMPTY_ROOT
    return _resolve([(0, size)], get)[0]


def inclusion_proof(index: int, size: int, get: GetNodes) -> list[bytes]:
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    return _resolve(_inclusion_ranges(index, 0, size), get)


def consistency_proof(first: int, second: int, get: GetNodes) -> list[bytes]:
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof between sizes {first} and {second}")
    if first == second:
        return []
    return _resolve(_consistency_ranges(first, second), get)


def right_edge(size: int) -> list[Node]:
    """The stored nodes a batch appended at ``size`` pairs with: at each level whose node
    count is odd, its last node (the left sibling still waiting for a right one)."""
    return [(level, (size >> level) - 1) for level in range(size.bit_length())
            if (size >> level) & 1]


def extend(size: int, edge: dict[Node, bytes], leaves: Iterable[bytes]) -> list[tuple[Node, bytes]]:
    """The perfect nodes that appending ``leaves`` (their data) at ``size`` creates, in
    order: each leaf's hash at level 0, then every parent it completes."""
    known = dict(edge)
    created: list[tuple[Node, bytes]] = []
    for offset, data in enumerate(leaves):
        index, level, h = size + offset, 0, leaf_hash(data)
        known[(0, index)] = h
        created.append(((0, index), h))
        while index & 1:
            h = node_hash(known[(level, index - 1)], h)
            level, index = level + 1, index >> 1
            known[(level, index)] = h
            created.append(((level, index), h))
    return created


def reference_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962's MTH, recursively over the leaf data: for tests and the full audit."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = largest_power_of_two_below(len(leaves))
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))
