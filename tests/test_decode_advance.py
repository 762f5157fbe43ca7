"""The decode round's metadata step (kernels/decode_advance.py; the interpreter on CPU, the GPU
with marker gpu) against its torch reference: rows at and below their last position, padding
rows past the sampled ones, rows past the bucket left alone, block tables crossed mid-pass."""
import pytest
import torch

from fastazr.kernels.decode_advance import advance_decode
from fastazr.kernels.decode_advance_reference import META_ROWS, advance_decode_reference


def make_meta(rows, bucket, block_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (rows,), generator=g)
    lengths[0] = max(int(lengths[0]), 2)
    starts = torch.cumsum(lengths, 0) - lengths
    tables = torch.randperm(int(lengths.sum()) + 7, generator=g)[:int(lengths.sum())]
    positions = torch.stack([torch.randint(0, int(n) * block_size, (1,), generator=g)[0] for n in lengths])
    # a third of the rows already at their last position, the rest up to 3 passes short of it;
    # row 0 crosses from its first block into its second
    last = torch.minimum(positions + torch.randint(0, 4, (rows,), generator=g), lengths * block_size - 1)
    last[1::3] = positions[1::3]
    positions[0], last[0] = block_size - 2, block_size + 1
    meta = torch.cat([torch.randint(0, 1000, (rows,), generator=g), positions, torch.randint(0, 99, (rows,), generator=g),
                      positions + 1, starts, last, tables]).to(torch.int32)
    return meta.to(device)


def check(device, rows=37, bucket=29, sampled=23, block_size=4, passes=4):
    meta = make_meta(rows, bucket, block_size, device)
    before, expected = meta.clone(), meta.clone()
    g = torch.Generator().manual_seed(1)
    for i in range(passes):
        tokens = torch.randint(0, 49152, (sampled,), generator=g).to(device)
        advance_decode(meta, rows, bucket, tokens, block_size, scratch_slot=999)
        advance_decode_reference(expected, rows, bucket, tokens, block_size, scratch_slot=999)
        assert torch.equal(meta, expected)
        if i == 0 and bucket > 3:  # rows that moved to a slot and rows that stayed on scratch
            slots = meta[2 * rows:2 * rows + bucket]
            assert (slots == 999).any() and (slots != 999).any()
    positions = meta[rows:2 * rows]
    assert (positions[:bucket] <= meta[5 * rows:5 * rows + bucket]).all(), "a row ran past its last position"
    for i in range(META_ROWS):
        assert torch.equal(meta[i * rows + bucket:(i + 1) * rows], before[i * rows + bucket:(i + 1) * rows]), \
            "rows past the bucket changed"
    assert torch.equal(meta[META_ROWS * rows:], before[META_ROWS * rows:]), "the block tables changed"


def test_matches_reference():
    check("cpu")


def test_one_row_bucket():
    check("cpu", rows=5, bucket=1, sampled=1, block_size=4, passes=4)
    check("cpu", rows=5, bucket=1, sampled=0, block_size=16, passes=2)  # no token: ids stay


def test_rejects_what_would_write_out_of_place():
    meta = torch.zeros(6 * 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="bucket 9"):
        advance_decode(meta, 8, 9, torch.zeros(2, dtype=torch.int64), 16, 0)
    with pytest.raises(ValueError, match="int32"):
        advance_decode(meta.long(), 8, 4, torch.zeros(2, dtype=torch.int64), 16, 0)
    with pytest.raises(ValueError, match="at most that many"):
        advance_decode(meta, 8, 2, torch.zeros(3, dtype=torch.int64), 16, 0)
    with pytest.raises(ValueError, match="contiguous 1-D int64"):  # the kernel would read every row's first
        advance_decode(meta, 8, 4, torch.arange(8)[::2], 16, 0)
    with pytest.raises(ValueError, match="contiguous 1-D int64"):
        advance_decode(meta, 8, 4, torch.zeros(2, dtype=torch.int32), 16, 0)
    with pytest.raises(ValueError, match="block_size"):
        advance_decode(meta, 8, 4, torch.zeros(2, dtype=torch.int64), 0, 0)


@pytest.mark.gpu
def test_gpu_matches_reference():
    check("cuda", rows=512, bucket=496, sampled=481, block_size=16)
