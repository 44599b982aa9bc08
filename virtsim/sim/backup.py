"""Push backups: ``blockdev-backup`` as a :class:`BackupJob` plus its copy-before-write filter.

QEMU 7.2 runs a backup as a one-action transaction: prepare validates (in a fixed order,
with fixed texts that clients match on), freezes the sync bitmap, inserts a
``copy-before-write`` filter above the source and creates the job; commit starts it.
Point-in-time consistency comes from the filter: a write to a cluster the job has not
copied yet first copies the old data to the target.  Here the filter is a graph node
(:class:`CbwNode`) that takes over the source's parents, as ``bdrv_replace_node`` does (so
devices write through it and queries show it as QEMU does), unshares write on the source
(a direct writer gets QEMU's permission conflict), and copies from a ``before_write`` hook
on the source.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from . import perm as P
from .bitmap import CHECK_ALLOW_RO, CHECK_DEFAULT, DirtyBitmap, check_bitmap
from .block import DATA, UNALLOCATED, ZERO, BlockGraph, Edge, FileNode, Node, Qcow2Node
from .errors import ImageError, SimError
from .image.qcow2 import Qcow2Format
from .image.store import FileStore
from .job import BlockJob, Finished, JobManager, JobTxn, RateLimit, WorkResult
from .transaction import ACTIONS, Action
from .zeroes import is_zero

#: block-copy's largest request when copy_range is off (BLOCK_COPY_MAX_BUFFER).
MAX_CHUNK = 1 << 20
#: block-copy's default cluster size, used when the target cannot tell its own.
DEFAULT_CLUSTER = 65536
#: Seconds between a job's last file request and its completion (see BackupJob.work).
FILE_IO_LATENCY = 0.001
#: Bytes per second file reads complete at (tmpfs-like): only decides how long a burst's
#: requests stay in flight, which is what a cancel or the next command finds meanwhile.
FILE_IO_BANDWIDTH = 2 << 30
#: ``bdrv_op_is_blocked`` text a job puts on its nodes.
JOB_BLOCKER = "block device is in use by block job: backup"

_BLOCK_SIZE_WARNING = (
    "warning: The target block device doesn't provide information about the block size "
    "and it doesn't have a backing file. The default block size of 65536 bytes is used. "
    "If the actual block size of the target exceeds this default, the backup may be "
    "unusable")


class CbwNode(Node):
    """The ``copy-before-write`` filter node: what queries show above the source."""

    drv = "copy-before-write"
    is_filter = True

    def __init__(self, graph: BlockGraph, source: Node) -> None:
        super().__init__(graph, {"driver": "copy-before-write"})
        self.source = source

    def length(self) -> int:
        return self.source.length()

    def exact_filename(self) -> str | None:
        # a filter takes its child's filename (bdrv_refresh_filename)
        return self.source.filename()

    def has_get_info(self) -> bool:
        # bdrv_get_info falls through a filter to its child (cluster-size, dirty-flag)
        return self.source.has_get_info()

    def cluster_size(self) -> int | None:
        return self.source.cluster_size()

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        # cbw_child_perms: the job's BlockBackend is always a parent, so the source is
        # read consistently and nobody else may write or resize it behind the filter
        return perm | P.CONSISTENT_READ, shared & ~(P.WRITE | P.RESIZE)

    def image_info(self, flat: bool) -> dict[str, Any]:
        info = super().image_info(flat)
        if not flat:
            # a filter's filtered child is shown as its backing image
            info["backing-image"] = self.source.image_info(flat)
        return info

    def backing_depth(self) -> int:
        return 1 + self.source.backing_depth()

    def _drv_read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self.source.write(offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.source.write_zeroes(offset, length, unmap)

    def _drv_discard(self, offset: int, length: int) -> None:
        self.source.discard(offset, length)

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return self.source.block_status(offset, length)


def _touches_files(node: Node) -> bool:
    """Whether requests on ``node`` reach a host file (asynchronous I/O in QEMU)."""
    if isinstance(node, FileNode):
        return True
    return any(_touches_files(e.child) for e in node.children.values())


def _device_name(graph: BlockGraph, node: Node) -> str:
    """``bdrv_get_device_name``: the name of a BlockBackend on the node, else ''."""
    for blk in graph.backends:
        if blk.root is node and blk.name:
            return blk.name
    return ""


def _job_blocked(node: Node) -> str | None:
    for text in node.op_blockers:
        if text.startswith("block device is in use by block job"):
            return text
    return None


def _reaches(top: Node, node: Node) -> bool:
    """Whether ``node`` is ``top`` or below it in the graph."""
    return top is node or any(_reaches(e.child, node) for e in top.children.values())


def _is_zero(data: bytes) -> bool:
    return is_zero(data)


def _status_run(node: Node, offset: int, length: int) -> tuple[int, bool]:
    """``bdrv_block_status_above(node, NULL)``: how far the status at ``offset`` lasts
    (at most ``length``) and whether that run reads as zeroes."""
    extents = node.block_status(offset, length)
    if not extents:
        return length, True
    _o, n, kind = extents[0]
    n = min(n, length)
    if kind == DATA:
        return n, False
    if kind == ZERO:
        return n, True
    below = node.backing
    if below is None or offset >= below.length():
        return n, True
    return _status_run(below, offset, min(n, below.length() - offset))


class BackupJob(BlockJob):
    """One backup job: copies the clusters of its copy bitmap from source to target.

    The copy bitmap (block-copy's, anonymous on the source) is the work list: the job and
    the copy-before-write hook both clear what they copy, so each cluster is copied once
    and the target ends up equal to the source at job start.
    """

    job_type = "backup"

    def __init__(self, job_id: str, *, graph: BlockGraph, source: Node, target: Node,
                 sync: str, sync_bitmap: DirtyBitmap | None, bitmap_mode: str | None,
                 speed: int = 0, on_source_error: str = "report",
                 on_target_error: str = "report", auto_finalize: bool = True,
                 auto_dismiss: bool = True, filter_node_name: str | None = None,
                 max_workers: int = 64) -> None:
        super().__init__(job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.sync_bitmap = sync_bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.speed = speed
        self.len = source.length()
        self.cluster = max(target.cluster_size() or DEFAULT_CLUSTER, DEFAULT_CLUSTER)
        #: x-perf max-workers: requests in flight at once (a burst's size)
        self.max_workers = max_workers
        self.filter_node_name = filter_node_name
        self.filter: CbwNode | None = None
        self._filter_edge: Edge | None = None
        self._moved: list[Edge] = []
        self.copy_bitmap: DirtyBitmap | None = None
        self.done_bitmap: DirtyBitmap | None = None
        self.access_bitmap: DirtyBitmap | None = None
        self.ratelimit: RateLimit | None = None
        self._cursor = 0
        self._initialised = False
        #: drive-backup: the target was opened for the job, which closes it at the end
        self.owns_target = False
        self._file_io = _touches_files(source) or _touches_files(target)
        self._settled = False
        self._pending_error: OSError | None = None
        #: parked by an I/O error's ``stop`` action (see cancelled_step)
        self._stopped = False
        #: monotonic time at which the last burst's file requests have completed
        self._in_flight_until = 0.0

    # ----- the filter --------------------------------------------------------------------
    def warn_block_size(self) -> bool:
        """block_copy_calculate_cluster_size warns when bdrv_get_info is unsupported on the
        target (file-posix supports it, null-co does not) and it has no backing file."""
        return (self.target.cluster_size() is None and self.target.backing is None
                and not _touches_files(self.target))

    def insert_filter(self) -> None:
        """bdrv_cbw_append: block-copy bitmap on the source, filter node, its bitmaps."""
        node = CbwNode(self.graph, self.source)
        try:
            self.graph._register(node, self.filter_node_name)
        except SimError as e:
            raise SimError(f"Could not create node: {e.desc}") from None
        if self.warn_block_size():
            self.graph.warn(_BLOCK_SIZE_WARNING)
        self.filter = node
        # bdrv_replace_node: the source's parents (devices, ...) now use the filter
        # (bdrv_replace_node skips a parent the filter reaches through its target, such
        # as a fleecing scratch whose backing is the source: moving it would make a loop)
        self._moved = [e for e in self.source.parents
                       if not (isinstance(e.parent, Node) and _reaches(self.target, e.parent))]
        for edge in self._moved:
            self._move_edge(edge, node)
        try:
            self._filter_edge = self.graph.attach(node, self.source, "file", 0, P.ALL)
            self.graph._refresh_child_perms(node)
        except SimError:
            for edge in self._moved:
                self._move_edge(edge, self.source)
            self._moved = []
            self.graph._unregister(node)
            self.filter = None
            raise
        self.copy_bitmap = self.source.bitmaps.create(self.len, self.cluster)
        self.copy_bitmap.enabled = False
        self.copy_bitmap.set_dirty(0, self.len)
        self.done_bitmap = node.bitmaps.create(self.len, self.cluster)
        self.done_bitmap.enabled = False
        self.access_bitmap = node.bitmaps.create(self.len, self.cluster)
        self.access_bitmap.enabled = False
        self.access_bitmap.set_dirty(0, self.len)
        self.source.before_write.insert(0, self._before_write)
        self.target.op_blockers.append(JOB_BLOCKER)
        node.op_blockers.append(JOB_BLOCKER)

    @staticmethod
    def _move_edge(edge: Edge, to: Node) -> None:
        old = edge.child
        if edge in old.parents:
            old.parents.remove(edge)
        edge.child = to
        to.parents.append(edge)

    def drop_filter(self) -> None:
        """bdrv_cbw_drop: undo :meth:`insert_filter` (idempotent)."""
        if self._before_write in self.source.before_write:
            self.source.before_write.remove(self._before_write)
        if self.copy_bitmap is not None and self.copy_bitmap in self.source.bitmaps:
            self.source.bitmaps.remove(self.copy_bitmap)
        if JOB_BLOCKER in self.target.op_blockers:
            self.target.op_blockers.remove(JOB_BLOCKER)
        node, self.filter = self.filter, None
        if node is not None:
            if self._filter_edge is not None:
                self.graph.detach(self._filter_edge)
                self._filter_edge = None
            for edge in self._moved:
                if edge.child is node:
                    self._move_edge(edge, self.source)
            self._moved = []
            self.graph._refresh_child_perms(self.source)
            self.graph._unregister(node)
            node.close()

    def _before_write(self, node: Node, offset: int, length: int) -> None:
        """Copy-before-write: old data of not-yet-copied clusters goes to the target first."""
        bm = self.copy_bitmap
        if bm is None or length <= 0:
            return
        start = offset // self.cluster * self.cluster
        end = min(self.len, -(-(offset + length) // self.cluster) * self.cluster)
        # block_copy over the range: one request per status run and chunk, all in flight
        # together; the failed ones stay dirty and fail the guest write
        tasks: list[tuple[int, int, bool]] = []
        for off, n in list(bm.dirty_extents(start, end - start)):
            stop = off + n
            while off < stop:
                m, zero = self._task(off, min(stop - off, MAX_CHUNK))
                tasks.append((off, m, zero))
                off += m
        for off, m, _zero in tasks:
            bm.reset_dirty(off, m)
        error = self._run_tasks(tasks)
        if error is not None:
            raise error
        if self.done_bitmap is not None:
            # QEMU marks the whole written range "done", copied now or before
            self.done_bitmap.set_dirty(start, end - start)

    # ----- copying -----------------------------------------------------------------------
    def _task(self, offset: int, length: int) -> tuple[int, bool]:
        """block_copy_block_status: shrink a copy request to the run of one block status
        at its start (cluster-aligned; a run shorter than a cluster, or a failed query,
        gives one cluster copied as data).
        Returns the request's length and whether it is written as zeroes."""
        try:
            run, zero = _status_run(self.source, offset, length)
        except OSError:
            run, zero = 0, False  # block status failed: one cluster, copied as data
        if run < self.cluster:
            return min(self.cluster, length), False
        if offset + run >= self.len:
            run = -(-run // self.cluster) * self.cluster
        else:
            run = run // self.cluster * self.cluster
        return min(run, length), zero

    def _copy(self, offset: int, length: int, zero: bool) -> None:
        """block_copy_do_copy: zeroes as write-zeroes, the rest as data (raises OSError
        with ``filename`` 'read'/'write' telling which side failed)."""
        try:
            if zero:
                # block-copy asks block status first: known-zero areas are never read
                data = b""
            else:
                data = self.source.read(offset, length)
        except OSError as e:
            raise OSError(e.errno or errno.EIO, e.strerror, "read") from None
        try:
            if not data or _is_zero(data):
                self.target.write_zeroes(offset, length)
            else:
                self.target.write(offset, data)
        except OSError as e:
            raise OSError(e.errno or errno.EIO, e.strerror, "write") from None

    def _init_run(self) -> None:
        """backup_init_bcs_bitmap: the work list and the total progress."""
        self._initialised = True
        bm = self.copy_bitmap
        assert bm is not None
        if self.sync == "bitmap" and self.sync_bitmap is not None:
            bm.clear()
            bm.merge_from(self.sync_bitmap)
        self.progress_set_remaining(bm.count())
        if self.sync == "top":
            # backup_run's first pass (no throttling): drop clusters the top layer lacks
            for off, n, kind in self.source.block_status(0, self.len):
                if kind == UNALLOCATED:
                    start = -(-off // self.cluster) * self.cluster
                    end = off + n if off + n >= self.len else (off + n) // self.cluster \
                        * self.cluster
                    if end > start:
                        bm.reset_dirty(start, end - start)
            self.progress_set_remaining(bm.count())

    def _next_chunk(self, limit: int | None) -> tuple[int, int] | None:
        bm = self.copy_bitmap
        assert bm is not None
        off = bm.next_dirty(self._cursor)
        if off is None:
            off = bm.next_dirty(0)
            if off is None:
                return None
        end = bm.next_clean(off) or self.len
        cap = MAX_CHUNK if limit is None else max(self.cluster, min(MAX_CHUNK, limit))
        cap = max(self.cluster, cap // self.cluster * self.cluster)
        return off, min(end - off, cap, self.len - off)

    def _burst(self, limit: int | None) -> tuple[list[tuple[int, int, bool]], float]:
        """block_copy_dirty_clusters up to its next yield: the requests it creates (their
        clusters cleared) and the throttle's delay that ended the burst (0.0 if none).

        QEMU creates requests until the throttle makes it sleep, the worker pool is full
        or the pass reaches the end, and they only run once it yields: so every request of
        a burst runs even when an earlier one fails, and a cancel waits for them all.
        """
        throttled = self.ratelimit is not None and bool(self.speed)
        bm = self.copy_bitmap
        assert bm is not None
        tasks: list[tuple[int, int, bool]] = []
        budget = limit
        wait = 0.0
        # a full pool: the next request is created before the loop waits for a slot
        while len(tasks) <= self.max_workers and (budget is None or budget > 0):
            if throttled:
                assert self.ratelimit is not None
                # woken early (a drain, a resume) or mid-burst: the throttle still holds
                wait = self.ratelimit.delay(0)
                if wait > 0:
                    break
            chunk = self._next_chunk(budget)
            if chunk is None:
                break
            off, n = chunk
            if tasks and off < self._cursor:
                break  # the pass reached the end; the next one starts over at 0
            n, zero = self._task(off, n)
            bm.reset_dirty(off, n)
            self._cursor = off + n
            tasks.append((off, n, zero))
            if budget is not None:
                budget -= n
            if throttled:
                assert self.ratelimit is not None
                self.ratelimit.delay(n)
        return tasks, wait

    def _run_tasks(self, tasks: list[tuple[int, int, bool]]) -> OSError | None:
        """Run a burst's requests; a failed one re-dirties its clusters.  Returns the
        first error."""
        bm = self.copy_bitmap
        assert bm is not None
        error: OSError | None = None
        for off, n, zero in tasks:
            try:
                self._copy(off, n, zero)
            except OSError as e:
                bm.set_dirty(off, n)
                error = error or e
                continue
            self.progress_update(n)
        return error

    def work(self, limit: int | None) -> WorkResult:
        """One burst of requests; the job sees a failure (it re-dirtied only the failed
        request's clusters) once the burst is over."""
        if not self._initialised:
            self._init_run()
        self._stopped = False
        if self.sync == "none":
            return None  # copies happen only in the filter; runs until cancelled
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            return self._io_error(err)
        tasks, wait = self._burst(limit)
        if not tasks:
            if wait > 0:
                return wait
            if self._file_io and not self._settled:
                # the last file request completes through the main loop: QEMU replies to
                # the command that started an unthrottled job before the job finishes
                self._settled = True
                return FILE_IO_LATENCY
            return Finished()
        started = self._now()
        error = self._run_tasks(tasks)
        latency = self._in_flight(tasks, started)
        if error is not None:
            if wait > 0 or latency > 0:
                # the job notices once it runs again: after the throttle's sleep, or once
                # its file requests (failed ones too) have completed through the main loop
                self._pending_error = error
                return max(wait, latency)
            return self._io_error(error)
        return max(wait, latency)

    def _in_flight(self, tasks: list[tuple[int, int, bool]], started: float) -> float:
        """Seconds until a burst's file requests have completed (0.0 without file I/O);
        until then a cancel waits for them, so its events follow its reply.  The time
        spent copying counts: the modelled bandwidth caps the speed, it adds no delay."""
        if not self._file_io or not tasks:
            return 0.0
        data = sum(n for _off, n, zero in tasks if not zero)
        self._in_flight_until = started + FILE_IO_LATENCY + data / FILE_IO_BANDWIDTH
        return max(0.0, self._in_flight_until - self._now())

    def pause_delay(self) -> float:
        """backup_pause cancels the running block-copy call and waits for its requests."""
        return max(0.0, self._in_flight_until - self._now())

    def cancelled_step(self) -> WorkResult:
        """A cancelled job ends once its requests in flight are done.  One stopped by an
        I/O error (``stop``) first leaves its pause point into the retry: backup_loop
        starts the next block-copy call before it looks at the cancel, so one more burst
        runs."""
        if self._stopped:
            self._stopped = False
            tasks, _wait = self._burst(None)
            started = self._now()
            self._run_tasks(tasks)  # the cancelled call's errors are not reported
            self._in_flight(tasks, started)
        left = self._in_flight_until - self._now()
        return left if left > 0 else Finished()

    def _io_error(self, e: OSError) -> WorkResult:
        """backup_loop after a failed block-copy call: the error action decides."""
        is_read = e.filename == "read"
        err = e.errno or errno.EIO
        action = self.error_action(self.on_source_error if is_read
                                   else self.on_target_error, is_read=is_read, err=err)
        if action == "report":
            return Finished(-err)
        self._stopped = action == "stop"
        self._cursor = 0  # the retry is a new block-copy call over the whole disk
        return 0.0  # ignore / stop: retry (a stop parks the job first)

    def on_set_speed(self, speed: int) -> None:
        if self.ratelimit is not None:
            self.ratelimit.set_speed(speed)

    # ----- completion ---------------------------------------------------------------------
    def _cleanup_sync_bitmap(self, ret: int) -> None:
        """backup_cleanup_sync_bitmap: the bitmap outcome table of QEMU 7.2."""
        bm = self.sync_bitmap
        if bm is None or bm.successor is None:
            return
        mode = self.bitmap_mode
        bms = self.source.bitmaps
        if (ret == 0 or mode == "always") and mode != "never":
            out = bms.abdicate(bm)
        else:
            out = bms.reclaim(bm)
        if ret < 0 and mode == "always" and self.copy_bitmap is not None:
            out.merge_from(self.copy_bitmap)
        self.sync_bitmap = out

    def commit(self) -> None:
        self._cleanup_sync_bitmap(0)

    def abort(self) -> None:
        self._cleanup_sync_bitmap(self.ret or -errno.ECANCELED)

    def clean(self) -> None:
        self.drop_filter()
        if self.owns_target and not self.target.closed:
            self.graph._destroy(self.target)


# --------------------------------------------------------------------------- creation


def _x_perf_check(perf: dict[str, Any] | None) -> None:
    if not perf:
        return
    workers = perf.get("max-workers", 64)
    if workers < 1 or workers > 2147483647:
        raise SimError("max-workers must be between 1 and 2147483647")
    if perf.get("max-chunk", 0) < 0:
        raise SimError("max-chunk must be zero (which means no limit) or positive")


def create_backup(graph: BlockGraph, jobs: JobManager, args: dict[str, Any],
                  source: Node, target: Node, txn: JobTxn | None = None) -> BackupJob:
    """do_backup_common + backup_job_create + job_create, checks in QEMU 7.2's order.

    ``source``/``target`` are already looked up.  On error nothing is left behind.
    """
    sync = args["sync"]
    has_mode = "bitmap-mode" in args
    mode: str | None = args.get("bitmap-mode")
    name: str | None = args.get("bitmap")
    if sync in ("bitmap", "incremental") and name is None:
        raise SimError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if has_mode and mode != "on-success":
            raise SimError("Bitmap sync mode must be 'on-success' when using sync mode "
                           "'incremental'")
        sync, mode, has_mode = "bitmap", "on-success", True
    bitmap: DirtyBitmap | None = None
    if name is not None:
        bitmap = source.bitmaps.find(name)
        if bitmap is None:
            raise SimError(f"Bitmap '{name}' could not be found")
        if not has_mode:
            raise SimError("Bitmap sync mode must be given when providing a bitmap")
        check_bitmap(bitmap, CHECK_ALLOW_RO)
        if sync == "none":
            raise SimError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise SimError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                           f"with sync mode '{sync}'")
    if name is None and has_mode:
        raise SimError("Cannot specify bitmap sync mode without a bitmap")
    # backup_job_create
    if source is target:
        raise SimError("Source and target cannot be the same")
    if args.get("compress") and not isinstance(target, Qcow2Node):
        raise SimError(f"Compression is not supported for this drive "
                       f"{_device_name(graph, target)}")
    for node in (source, target):
        blocker = _job_blocked(node)
        if blocker is not None:
            raise SimError(f"Node '{node.node_name}' is busy: {blocker}")
    _x_perf_check(args.get("x-perf"))
    if bitmap is not None:
        if mode != "never":
            check_bitmap(bitmap, CHECK_DEFAULT)
        source.bitmaps.create_successor(bitmap)
    job: BackupJob | None = None
    try:
        if source.length() != target.length():
            raise SimError("Source and target image have different sizes")
        job_id = args.get("job-id")
        if job_id is None:
            job_id = _device_name(graph, source)
        job = BackupJob(
            job_id, graph=graph, source=source, target=target, sync=sync,
            sync_bitmap=bitmap, bitmap_mode=mode, speed=int(args.get("speed", 0)),
            on_source_error=args.get("on-source-error", "report"),
            on_target_error=args.get("on-target-error", "report"),
            auto_finalize=bool(args.get("auto-finalize", True)),
            auto_dismiss=bool(args.get("auto-dismiss", True)),
            filter_node_name=args.get("filter-node-name"),
            max_workers=int((args.get("x-perf") or {}).get("max-workers", 64)))
        job.insert_filter()
        jobs.add(job, txn)
    except SimError:
        if job is not None:
            job.drop_filter()
        if bitmap is not None and bitmap.successor is not None:
            source.bitmaps.reclaim(bitmap)
        raise
    job.ratelimit = RateLimit(jobs.clock)
    job.ratelimit.set_speed(job.speed)
    return job


# --------------------------------------------------------------------------- drains


def _drained_jobs(jobs: JobManager, node: Node) -> list[BackupJob]:
    """Jobs whose nodes a ``bdrv_drained_begin(node)`` reaches (source or target)."""
    return [j for j in reversed(jobs.jobs())
            if isinstance(j, BackupJob) and node in (j.source, j.target)]


class BackupAction(Action):
    """The ``blockdev-backup`` transaction action (also what the command runs)."""

    kind = "blockdev-backup"
    supports_grouped = True
    #: drive-backup creates/opens its target after the drain instead of looking it up
    opens_target = False

    def __init__(self, graph: BlockGraph, args: dict[str, Any], ctx: Any) -> None:
        super().__init__(graph, args, ctx)
        self.job: BackupJob | None = None
        self.source: Node | None = None
        self._drained: list[BackupJob] = []
        self._target: Node | None = None

    def _lookup_target(self) -> Node:
        return self.graph.lookup_bs(self.args["target"], self.args["target"])

    def _open_target(self, source: Node) -> Node:
        """After the drain: drive-backup creates and opens its target here."""
        assert self._target is not None
        return self._target

    def prepare(self) -> None:
        jobs: JobManager = self.ctx.jobs
        device = self.args["device"]
        source = self.graph.lookup_bs(device, device)
        self._target = None if self.opens_target else self._lookup_target()
        self.source = source
        # bdrv_drained_begin(source), ended in clean()
        self._drained = _drained_jobs(jobs, source)
        for job in self._drained:
            job.internal_pause()
        target = self._open_target(source)
        txn: JobTxn | None = None
        if self.ctx.completion_mode == "grouped":
            sources: list[Node] = self.ctx.extra.setdefault("backup-sources", [])
            if source in sources:
                # QEMU 7.2 crashes (SIGSEGV) here; refuse instead
                raise SimError("virtsim: two grouped backups of the same source node "
                               f"'{source.node_name}' in one transaction are not supported "
                               "(QEMU 7.2 crashes)")
            sources.append(source)
            if self.ctx.txn is None:
                self.ctx.txn = JobTxn()
            txn = self.ctx.txn
        self.job = create_backup(self.graph, jobs, self.args, source, target, txn)
        # attached inside the drained section: the new job is drained too
        self.job.internal_pause()
        self._drained.append(self.job)

    def commit(self) -> None:
        if self.job is not None:
            self.job.start()

    def abort(self) -> None:
        if self.job is not None:
            self.job.cancel_sync(True)

    def clean(self) -> None:
        drained, self._drained = self._drained, []
        for job in drained:
            if job.pause_count > 0:
                job.internal_resume()


class DriveBackupAction(BackupAction):
    """The deprecated ``drive-backup``: the target is an image file that QEMU creates
    (``mode: absolute-paths``, the default) or opens (``existing``), as an anonymous node
    the job owns and closes when it ends."""

    kind = "drive-backup"
    opens_target = True

    def _open_target(self, source: Node) -> Node:
        args = self.args
        filename: str = args["target"]
        mode = args.get("mode", "absolute-paths")
        fmt: str | None = args.get("format")
        if fmt is None and mode != "existing":
            fmt = source.drv
        blocker = _job_blocked(source)
        if blocker is not None:
            raise SimError(f"Node '{source.node_name}' is busy: {blocker}")
        sync = args["sync"]
        backing: Node | None = None
        if sync == "top":
            backing = source.backing
            if backing is None:
                args = self.args = {**args, "sync": "full"}
        elif sync == "none":
            backing = source
        if mode != "existing":
            assert fmt is not None
            _create_image(filename, fmt, source.length(), backing)
        if fmt is None:
            fmt = _probe_format(filename)
        options: dict[str, Any] = {"driver": fmt, "discard": "unmap", "detect-zeroes": "unmap",
                                   "file": {"driver": "file", "filename": filename}}
        if fmt == "qcow2":
            options["backing"] = None if backing is None else backing.node_name
        target = self.graph.open_node(options, inherited_ro=None)
        self._target = target
        return target

    def prepare(self) -> None:
        try:
            super().prepare()
        finally:
            # bdrv_unref(target_bs): the job holds its own reference from here on
            if self.job is None and self._target is not None:
                self.graph._destroy(self._target)
                self._target = None
        if self.job is not None:
            self.job.owns_target = True


def _create_image(filename: str, fmt: str, size: int, backing: Node | None) -> None:
    """bdrv_img_create for drive-backup's target (qcow2 or raw, preallocation off)."""
    if fmt not in ("qcow2", "raw"):
        raise SimError(f"Unknown file format '{fmt}'")
    if backing is not None and fmt == "raw":
        raise SimError("Backing file not supported for file format 'raw'")
    try:
        store = FileStore.create(filename, size if fmt == "raw" else 0)
    except OSError as e:
        raise SimError(f"Could not create '{filename}': "
                       f"{os.strerror(e.errno or errno.EIO)}") from None
    if fmt == "raw":
        store.close()
        return
    try:
        img = Qcow2Format.create(store, size,
                                 backing_file=None if backing is None else backing.filename(),
                                 backing_fmt=None if backing is None else backing.drv)
    except ImageError as e:
        store.close()
        raise SimError(str(e)) from None
    img.close()


def _probe_format(filename: str) -> str:
    """Format probing for ``mode: existing`` without ``format``: qcow2 magic or raw."""
    try:
        with open(filename, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "raw"  # the open below reports the error
    return "qcow2" if magic == b"QFI\xfb" else "raw"


ACTIONS[BackupAction.kind] = BackupAction
ACTIONS[DriveBackupAction.kind] = DriveBackupAction
