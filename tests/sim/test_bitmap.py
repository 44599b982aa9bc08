"""Dirty bitmaps (virtsim.sim.bitmap): unit tests against a naive model, scale tests, and a
differential test that replays the same writes, clears and merges on real QEMU 7.2 and
compares ``count`` and ``x-debug-block-dirty-bitmap-sha256``."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator

import pytest
from pyroaring import BitMap, BitMap64

from tests.sim.real_qemu import RealQemu, real_qemu_session
from virtsim.sim.bitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    BitmapList,
    DirtyBitmap,
    check_bitmap,
    merge_bitmaps,
)
from virtsim.sim.errors import SimError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# --------------------------------------------------------------------------- naive oracle


class Naive:
    """A plain set of granule indices, QEMU's rules written the obvious way."""

    def __init__(self, size: int, gran: int) -> None:
        self.size, self.gran = size, gran
        self.nbits = -(-size // gran)
        self.bits: set[int] = set()

    def set(self, off: int, length: int) -> None:
        if length:
            last = min((off + length - 1) // self.gran, self.nbits - 1)
            self.bits.update(range(off // self.gran, last + 1))

    def extents(self, off: int, length: int) -> list[tuple[int, int]]:
        end = min(off + length, self.size)
        out: list[tuple[int, int]] = []
        for byte in range(off, end):
            if byte // self.gran in self.bits:
                if out and out[-1][0] + out[-1][1] == byte:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                else:
                    out.append((byte, 1))
        return out

    def sha256(self) -> str:
        words = [0] * max((self.nbits + 63) // 64, 1)
        for b in self.bits:
            words[b // 64] |= 1 << (b % 64)
        return hashlib.sha256(b"".join(w.to_bytes(8, "little") for w in words)).hexdigest()


# --------------------------------------------------------------------------- basics


def test_set_dirty_touches_every_granule() -> None:
    bm = DirtyBitmap(64 * MiB, 64 * KiB, "b")
    bm.set_dirty(65535, 2)  # straddles granules 0 and 1
    assert bm.count() == 128 * KiB
    bm.set_dirty(20 * MiB, 1)
    assert bm.count() == 192 * KiB
    bm.set_dirty(30 * MiB, 0)
    assert bm.count() == 192 * KiB
    assert bm.is_dirty(0) and bm.is_dirty(131071) and not bm.is_dirty(131072)
    assert not bm.is_dirty(64 * MiB) and not bm.is_dirty(-1)


def test_count_is_not_clipped_to_the_disk() -> None:
    bm = DirtyBitmap(64 * MiB, 2 * GiB, "g")
    bm.set_dirty(20 * MiB, 1)
    assert bm.count() == 2 * GiB  # QEMU reports 2147483648 on a 64 MiB disk
    assert list(bm.dirty_extents()) == [(0, 64 * MiB)]


def test_partial_last_granule() -> None:
    size = 64 * MiB + 512
    bm = DirtyBitmap(size, 64 * KiB, "b")
    assert bm.granule_count == 1025
    bm.set_dirty(size - 1, 1)
    assert bm.count() == 64 * KiB
    assert list(bm.dirty_extents()) == [(64 * MiB, 512)]
    bm.set_dirty(size, 4096)  # past the end: QEMU never sends it, the model ignores it
    assert bm.count() == 64 * KiB


def test_reset_dirty_follows_hbitmap_reset() -> None:
    size = 1 * MiB + 512
    bm = DirtyBitmap(size, 64 * KiB)
    bm.set_dirty(0, size)
    bm.reset_dirty(64 * KiB, 128 * KiB)  # aligned: exactly granules 1 and 2
    assert list(bm.dirty_extents()) == [(0, 64 * KiB), (192 * KiB, size - 192 * KiB)]
    bm.reset_dirty(1 * MiB, 512)  # the partial last granule: ends at the node's end
    assert not bm.is_dirty(1 * MiB)
    bm.reset_dirty(100, 200 * KiB)  # unaligned: only fully covered granules (none dirty)
    assert bm.is_dirty(0) and bm.is_dirty(192 * KiB)
    bm.reset_dirty(100, 300 * KiB)  # covers granule 3 fully
    assert not bm.is_dirty(192 * KiB) and bm.is_dirty(256 * KiB) and bm.is_dirty(0)
    bm.clear()
    assert bm.count() == 0


def test_next_dirty_and_next_clean() -> None:
    bm = DirtyBitmap(10 * MiB, 64 * KiB)
    assert bm.next_dirty(0) is None and bm.next_clean(0) == 0
    bm.set_dirty(1 * MiB, 1 * MiB)
    assert bm.next_dirty(0) == 1 * MiB
    assert bm.next_dirty(1 * MiB + 5) == 1 * MiB + 5
    assert bm.next_dirty(2 * MiB) is None
    assert bm.next_dirty(0, 1 * MiB) is None and bm.next_dirty(0, 1 * MiB + 1) == 1 * MiB
    assert bm.next_clean(1 * MiB) == 2 * MiB and bm.next_clean(1 * MiB + 7) == 2 * MiB
    assert bm.next_clean(1 * MiB, 1 * MiB) is None
    assert bm.next_clean(10 * MiB) is None and bm.next_dirty(10 * MiB) is None
    bm.set_dirty(0, 10 * MiB)
    assert bm.next_clean(0) is None


@pytest.mark.parametrize("seed", range(12))
def test_matches_naive_model(seed: int) -> None:
    rng = random.Random(seed)
    gran = 512 << rng.randrange(6)
    size = rng.choice([0, 512, gran * 70 + 512, rng.randrange(1, 300) * 512])
    bm, naive = DirtyBitmap(size, gran, "b"), Naive(size, gran)
    for _ in range(rng.randrange(0, 25)):
        if size == 0:
            break
        off = rng.randrange(size)
        length = rng.randrange(0, min(size - off, gran * 9) + 1)
        bm.set_dirty(off, length)
        naive.set(off, length)
    assert bm.count() == len(naive.bits) * gran
    assert bm.sha256() == naive.sha256()
    for _ in range(10):
        off = rng.randrange(size + 1)
        length = rng.randrange(0, size - off + 2)
        assert list(bm.dirty_extents(off, length)) == naive.extents(off, length)
        dirty = [b for b in range(off, min(off + length, size)) if b // gran in naive.bits]
        clean = [b for b in range(off, min(off + length, size)) if b // gran not in naive.bits]
        assert bm.next_dirty(off, length) == (dirty[0] if dirty else None)
        assert bm.next_clean(off, length) == (clean[0] if clean else None)


@pytest.mark.parametrize("size, words", [(0, 1), (512, 1), (64 * 512, 1), (65 * 512, 2)])
def test_sha256_length_rules(size: int, words: int) -> None:
    assert DirtyBitmap(size, 512).sha256() == hashlib.sha256(bytes(8 * words)).hexdigest()


def test_sha256_of_the_reference_transcript() -> None:
    # b_bitmaps.jsonl: 64 MiB qcow2, writes 1M@0, 64k@10M, 1 byte@20M
    bm = DirtyBitmap(64 * MiB, 64 * KiB, "bm-transient")
    bm.set_dirty(0, 1 * MiB)
    bm.set_dirty(10 * MiB, 64 * KiB)
    bm.set_dirty(20 * MiB, 1)
    assert bm.count() == 1179648
    assert bm.sha256() == "aa9708536e95c0e569bccb66d97da1ae72183b6f54976058024512ded23b1b58"


def test_sha256_streams_long_runs() -> None:
    size = 1 * TiB  # 2**24 granules: 2 MiB of words, mostly runs of ones and zeros
    bm, naive = DirtyBitmap(size, 64 * KiB), Naive(size, 64 * KiB)
    for off, length in ((0, 1), (100 * 64 * KiB + 5, 3 * GiB), (size - 1, 1),
                        (512 * GiB - 7 * 64 * KiB, 64 * KiB * 200)):
        bm.set_dirty(off, length)
    words = bytearray(2 * MiB)
    for a_off, a_len in bm.dirty_extents():
        for g in range(a_off // (64 * KiB), (a_off + a_len - 1) // (64 * KiB) + 1):
            words[g // 8] |= 1 << (g % 8)
    assert bm.sha256() == hashlib.sha256(bytes(words)).hexdigest()
    assert naive.nbits == bm.granule_count


# --------------------------------------------------------------------------- whole bitmaps


@pytest.mark.parametrize("src_gran, dst_gran", [(512, 64 * KiB), (64 * KiB, 512),
                                                 (2 * GiB, 64 * KiB), (4096, 4096)])
def test_merge_across_granularities(src_gran: int, dst_gran: int) -> None:
    size = 10 * MiB + 512
    src, dst = DirtyBitmap(size, src_gran), DirtyBitmap(size, dst_gran)
    naive = Naive(size, dst_gran)
    for off, length in ((0, 1), (70000, 3), (5 * MiB + 1, 200000), (size - 1, 1)):
        src.set_dirty(off, length)
    dst.set_dirty(1 * MiB, 1)
    naive.set(1 * MiB, 1)
    for off, length in src.dirty_extents():
        naive.set(off, length)
    dst.merge_from(src)
    assert dst.sha256() == naive.sha256()
    with pytest.raises(ValueError):
        dst.merge_from(DirtyBitmap(size + 512, dst_gran))


def test_merge_checks_in_qemu_order() -> None:
    dst, src = DirtyBitmap(MiB, 512, "d"), DirtyBitmap(2 * MiB, 512, "s")
    src.readonly = True
    dst.busy = True
    with pytest.raises(SimError, match="'d' is currently in use"):
        merge_bitmaps(dst, src)
    dst.busy = False
    with pytest.raises(SimError) as exc:
        merge_bitmaps(dst, src)  # a read-only source is fine; the size is not
    assert exc.value.desc == ("Bitmaps are of different sizes (destination size is 1048576, "
                              "source size is 2097152) and can't be merged")
    src.inconsistent = True
    with pytest.raises(SimError, match="'s' is inconsistent"):
        merge_bitmaps(dst, src)


def test_copy_restore_and_granules() -> None:
    bm = DirtyBitmap(4 * MiB, 64 * KiB, "b")
    bm.persistent = True
    bm.set_dirty(0, 1)
    backup = bm.copy()
    assert backup.persistent and backup.name == "b" and backup.sha256() == bm.sha256()
    bm.set_dirty(1 * MiB, 1 * MiB)
    bm.restore_from(backup)
    assert bm.count() == 64 * KiB
    g = bm.granules()
    assert isinstance(g, BitMap64) and list(g) == [0]
    g.add(5)
    assert bm.count() == 64 * KiB  # a copy, not the live set
    bm.set_granules(BitMap64([1, 2, 63, 64, 1000]))  # 64 granules: 64 and 1000 are dropped
    assert list(bm.granules()) == [1, 2, 63]
    bm.set_granules(BitMap([3]))
    assert bm.count() == 64 * KiB and bm.is_dirty(3 * 64 * KiB)


def test_truncate() -> None:
    bm = DirtyBitmap(4 * MiB, 1 * MiB)
    bm.set_dirty(0, 4 * MiB)
    bm.truncate(2 * MiB + 1)
    assert bm.granule_count == 3 and bm.count() == 3 * MiB
    bm.truncate(8 * MiB)
    assert bm.count() == 3 * MiB and not bm.is_dirty(4 * MiB)


def test_info_keys_in_qemu_order() -> None:
    bm = DirtyBitmap(64 * MiB, 64 * KiB, "p")
    bm.persistent, bm.enabled, bm.inconsistent = True, False, True
    assert list(bm.info().items()) == [
        ("name", "p"), ("recording", False), ("persistent", True), ("busy", False),
        ("granularity", 65536), ("count", 0), ("inconsistent", True)]
    anon = DirtyBitmap(64 * MiB, 64 * KiB)
    anon.set_dirty(0, 64 * MiB)
    anon.enabled = False
    assert anon.info() == {"recording": False, "persistent": False, "busy": False,
                           "granularity": 65536, "count": 67108864}


def test_check_order_and_texts() -> None:
    bm = DirtyBitmap(MiB, 512, "N")
    check_bitmap(bm, CHECK_DEFAULT)
    bm.busy = bm.readonly = bm.inconsistent = True
    texts = []
    for _ in range(3):
        with pytest.raises(SimError) as exc:
            check_bitmap(bm, CHECK_DEFAULT)
        assert exc.value.error_class == "GenericError"
        texts.append(exc.value.desc)
        if bm.busy:
            bm.busy = False
        elif bm.readonly:
            check_bitmap(bm, CHECK_BUSY)
            with pytest.raises(SimError, match="inconsistent"):
                check_bitmap(bm, CHECK_ALLOW_RO)
            bm.readonly = False
    assert texts == ["Bitmap 'N' is currently in use by another operation and cannot be used",
                     "Bitmap 'N' is readonly and cannot be modified",
                     "Bitmap 'N' is inconsistent and cannot be used"]


# --------------------------------------------------------------------------- successors


def test_successor_records_writes_during_a_job() -> None:
    node = BitmapList()
    old = node.create(64 * MiB, 64 * KiB, "old")
    bm = node.create(64 * MiB, 64 * KiB, "bm0")
    bm.persistent = True
    node.set_dirty(0, 1 * MiB)
    succ = node.create_successor(bm)
    assert node.all() == [succ, bm, old]
    assert bm.busy and not bm.enabled and bm.recording and succ.enabled and succ.name is None
    node.set_dirty(8 * MiB, 64 * KiB)  # during the job: only the successor records it
    assert (bm.count(), succ.count(), old.count()) == (1 * MiB, 64 * KiB, 1 * MiB + 64 * KiB)
    assert [i.get("name") for i in node.infos()] == [None, "bm0", "old"]
    with pytest.raises(SimError, match="'bm0' is currently in use"):
        node.create_successor(bm)
    bm.busy = False  # only reachable this way: a successor always comes with busy
    with pytest.raises(SimError, match="^Cannot create a successor for a bitmap that already "
                                       "has one$"):
        bm.create_successor()
    bm.busy = True

    new = node.abdicate(bm)  # success: the successor takes over, at its list position
    assert new is succ and new.name == "bm0" and new.persistent and not new.busy
    assert node.all() == [new, old] and node.find("bm0") is new
    assert new.count() == 64 * KiB and not bm.persistent and bm.name is None


def test_reclaim_merges_back_and_keeps_position() -> None:
    node = BitmapList()
    bm = node.create(64 * MiB, 64 * KiB, "bm0")
    other = node.create(64 * MiB, 64 * KiB, "other")
    bm.set_dirty(0, 64 * KiB)
    succ = node.create_successor(bm)
    node.set_dirty(1 * MiB, 64 * KiB)
    assert node.reclaim(bm) is bm
    assert node.all() == [other, bm] and succ not in node
    assert bm.enabled and not bm.busy and bm.successor is None and bm.count() == 128 * KiB

    bm.enabled = False  # a disabled parent gets a disabled successor, and stays disabled
    succ = node.create_successor(bm)
    assert not succ.enabled and not bm.recording
    node.set_dirty(2 * MiB, 1)
    node.reclaim(bm)
    assert not bm.enabled and bm.count() == 128 * KiB


def test_successor_errors() -> None:
    bm = DirtyBitmap(MiB, 512, "x")
    with pytest.raises(SimError, match="^Cannot relinquish control if there's no successor "
                                       "present$"):
        bm.abdicate()
    with pytest.raises(SimError, match="^Cannot reclaim a successor when none is present$"):
        bm.reclaim()
    with pytest.raises(ValueError):
        bm.enable_successor()
    bm.enabled = False
    succ = bm.create_successor()
    bm.enable_successor()
    assert succ.enabled and bm.recording


def test_bitmap_list() -> None:
    node = BitmapList()
    a = node.create(MiB, 512, "a")
    b = node.create(MiB, 512, "b")
    anon = DirtyBitmap(MiB, 512)
    node.add(anon)
    assert list(node) == [anon, b, a] and len(node) == 3
    assert node.find("a") is a and node.find("zz") is None
    with pytest.raises(SimError, match="^Dirty bitmap 'zz' not found$"):
        node.get("zz")
    with pytest.raises(SimError, match="^Bitmap already exists: a$"):
        node.create(MiB, 512, "a")
    node.create(MiB, 512, "n" * 1023)
    with pytest.raises(SimError, match="^Bitmap name too long: "):
        node.create(MiB, 512, "n" * 1024)
    with pytest.raises(SimError, match="^Bitmap name too long: "):
        node.create(MiB, 512, "é" * 512)  # 1024 bytes of UTF-8
    b.enabled = False
    node.set_dirty(0, 1)
    assert (a.count(), b.count(), anon.count()) == (512, 0, 512)
    node.remove(b)
    assert b not in node
    with pytest.raises(ValueError):
        node.remove(b)
    node.truncate(512)
    assert a.granule_count == 1


def test_constructor_rejects_bad_granularity() -> None:
    for gran in (0, 256, 1000):
        with pytest.raises(ValueError):
            DirtyBitmap(MiB, gran)


# --------------------------------------------------------------------------- scale


def test_sixteen_tib_at_a_thousandth_dirty() -> None:
    size, gran = 16 * TiB, 64 * KiB
    granules = size // gran
    a, b = DirtyBitmap(size, gran, "a"), DirtyBitmap(size, gran, "b")
    step = 1000
    for i in range(0, granules, step * 64):  # 0.1% dirty as 64-granule runs
        a.set_dirty(i * gran, 64 * gran)
        b.set_dirty((i + step * 32) * gran, 64 * gran)
    assert a.count() >= size // 1000 and b.count() >= size // 1000 * 0.99
    assert a.memory_bytes() <= 1 * MiB
    expected = a.count() + b.count()  # disjoint runs
    t0 = time.perf_counter()
    a.merge_from(b)
    count = a.count()
    a.clear()
    elapsed = time.perf_counter() - t0
    assert count == expected and a.count() == 0
    assert elapsed < 0.5, elapsed  # milliseconds in practice


def test_more_than_two_to_the_32_granules() -> None:
    size = 16 * TiB  # at 512 bytes: 2**35 granules
    bm = DirtyBitmap(size, 512, "fine")
    bm.set_dirty(size - 1, 1)
    bm.set_dirty(3 * TiB + 100, 1000)
    assert bm.count() == 512 * 4
    assert list(bm.dirty_extents()) == [(3 * TiB, 1536), (size - 512, 512)]
    assert bm.next_dirty(3 * TiB + 1536) == size - 512


def test_block_status_over_ten_thousand_extents() -> None:
    size, gran = 1 * TiB, 64 * KiB
    bm = DirtyBitmap(size, gran)
    rng = random.Random(5)
    starts = sorted(rng.sample(range(0, size // gran - 2000, 1500), 10000))
    for s in starts:
        bm.set_dirty(s * gran, rng.randrange(1, 1000) * gran)
    t0 = time.perf_counter()
    extents = list(bm.dirty_extents())
    elapsed = time.perf_counter() - t0
    assert len(extents) == 10000 and sum(n for _, n in extents) == bm.count()
    assert elapsed < 1.0, elapsed


# --------------------------------------------------------------------------- differential

GRANS = [512, 4 * KiB, 64 * KiB, 1 * MiB, 2 * GiB]


class Pair:
    """The same bitmaps on a real QEMU node and in the model."""

    def __init__(self, qemu: RealQemu, node: str, size: int, grans: list[int],
                 discard: str = "ignore") -> None:
        self.qemu, self.node, self.size = qemu, qemu.image(node, size, discard=discard), size
        self.discard_dirties = discard == "unmap"  # with "ignore" QEMU drops discards early
        self.model: dict[str, DirtyBitmap] = {}
        for g in grans:
            self.add(f"g{g}", g)

    def add(self, name: str, gran: int, disabled: bool = False) -> None:
        self.qemu.cmd("block-dirty-bitmap-add", node=self.node, name=name, granularity=gran,
                      disabled=disabled)
        self.model[name] = DirtyBitmap(self.size, gran, name)
        self.model[name].enabled = not disabled

    def io(self, command: str, off: int, length: int) -> None:
        reply, out, err = self.qemu.hmp(f'qemu-io {self.node} "{command} {off} {length}"')
        assert (reply, out, err) == ("", "", ""), (command, off, length, reply, out, err)
        if command.startswith("discard") and not self.discard_dirties:
            return
        for bm in self.model.values():
            if bm.enabled:
                bm.set_dirty(off, length)

    def write(self, off: int, length: int) -> None:
        self.io("write -q", off, length)

    def clear(self, name: str) -> None:
        self.qemu.cmd("block-dirty-bitmap-clear", node=self.node, name=name)
        self.model[name].clear()

    def merge(self, target: str, sources: list[str]) -> None:
        self.qemu.cmd("block-dirty-bitmap-merge", node=self.node, target=target,
                      bitmaps=sources)
        for s in sources:
            merge_bitmaps(self.model[target], self.model[s])

    def compare(self, when: str) -> None:
        nodes = self.qemu.cmd("query-named-block-nodes", flat=True)
        (info,) = [n for n in nodes if n["node-name"] == self.node]
        real = {b["name"]: b for b in info["dirty-bitmaps"]}
        for name, bm in self.model.items():
            sha = self.qemu.cmd("x-debug-block-dirty-bitmap-sha256", node=self.node,
                                name=name)["sha256"]
            assert (real[name], sha) == (bm.info(), bm.sha256()), (when, name)


@pytest.fixture(scope="module")
def qemu() -> Iterator[RealQemu]:
    yield from real_qemu_session()


@pytest.mark.real_qemu
def test_writes_clears_and_merges_match_qemu(qemu: RealQemu) -> None:
    size = 64 * MiB + 512  # not a multiple of any granularity above 512
    p = Pair(qemu, "odd", size, GRANS, discard="unmap")
    for off, length in ((0, 1), (511, 2), (4095, 4098), (size - 1, 1), (size - 512, 512),
                        (size - 1000, 1000), (10 * MiB, 64 * KiB), (20 * MiB + 3, 1),
                        (1 * MiB - 1, 2), (33 * MiB, 2 * MiB + 7)):
        p.write(off, length)
    p.compare("fixed writes")
    rng = random.Random(7)
    for _ in range(40):
        off = rng.randrange(size)
        p.write(off, rng.randrange(1, min(300 * KiB, size - off) + 1))
    p.compare("random writes")

    p.clear(f"g{64 * KiB}")
    p.io("write -q -z", 40 * MiB + 17, 3000)
    p.io("write -q -z -u", 48 * MiB, 1 * MiB)
    p.io("discard -q", 50 * MiB + 1, 1)
    p.io("discard -q", 52 * MiB, 128 * KiB)
    p.compare("clear, zero writes, discards")
    plain = Pair(qemu, "plain", 4 * MiB, [512])
    plain.io("discard -q", 0, 1 * MiB)
    plain.compare("discard on a node without discard=unmap")

    p.add("m1", 1 * MiB, disabled=True)
    p.add("m2", 512, disabled=True)
    p.add("m3", 64 * KiB, disabled=True)
    p.merge("m1", ["g512"])
    p.merge("m2", [f"g{1 * MiB}"])
    p.merge("m3", [f"g{2 * GiB}", "g4096"])
    p.merge(f"g{64 * KiB}", [f"g{2 * GiB}"])
    p.merge("g512", ["g512", f"g{64 * KiB}"])
    p.compare("merges across granularities")


@pytest.mark.real_qemu
def test_sizes_at_the_edges_match_qemu(qemu: RealQemu) -> None:
    empty = Pair(qemu, "empty", 0, [512, 64 * KiB])
    empty.compare("empty disk")
    big = Pair(qemu, "big", 5 * GiB + 512, [512, 64 * KiB, 2 * GiB])
    for off, length in ((0, 1), (4 * GiB + 123, 70000), (big.size - 1, 1),
                        (2 * GiB - 1, 2), (3 * GiB, 1 * MiB)):
        big.write(off, length)
    big.compare("5 GiB disk")
    huge = Pair(qemu, "huge", 16 * TiB, [64 * KiB, 2 * GiB])
    for off in (0, 8 * TiB + 5, 16 * TiB - 1):
        huge.write(off, 1)
    huge.compare("16 TiB disk")
