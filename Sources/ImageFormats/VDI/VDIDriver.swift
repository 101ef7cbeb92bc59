import BlockEngine
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// VDI read/write over the shared engine. The block map is read in sector-sized chunks
/// through the shared table cache. New blocks are appended after the last block in the file;
/// ordering: block data, then the map sector, then the header's blocks_allocated.
public final class VDIDriver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    /// Differencing images are read-only: VirtualBox keeps their chain's consistency (the
    /// parent's modification UUID) in its own registry, which writes here would bypass.
    public var isWritable: Bool { file.isWritable && !header.isDifferencing }
    public var readOnlyReason: String? { header.isDifferencing ? "VirtualBox differencing (snapshot) images are served read-only" : nil }
    public let header: VDIHeader

    let map: TableCache
    static let chunkBytes = 512
    static let maxChunksPerMap = 64
    static let entriesPerChunk = chunkBytes / 4
    let blockSize: UInt64
    /// blocks_allocated as it will be written, and whether the header needs rewriting.
    /// Not the shared `Allocator`: that one hands space out at `allocate`, so a write that
    /// fails before `commit` would skip an index. QEMU puts its next block at index
    /// blocks_allocated, so every index below the frontier must be linked, or QEMU would
    /// later reuse one of ours. Here the frontier moves only at `commit`.
    /// `unwritten`: indices from here on were never handed to a write that failed, so their
    /// host space still reads as zeros (a failed write may have left bytes in its block).
    private let allocation: Mutex<(count: UInt32, next: UInt64, dirty: Bool, unwritten: UInt64)>
    /// Reserves host space for the next blocks off the write path.
    private let preallocator: Preallocator?

    /// Written before any map sector: the header's blocks_allocated covers every index the
    /// map is about to name (set once `self` exists; see `flush`).
    private let headerFirst = LateBarrier()

    /// `repairReport`: told what a writable open fixed (a crash left orphaned blocks or a
    /// blocks_allocated that disagrees with the map).
    public init(file: ImageFile, repairReport: ((VDIRepairReport) -> Void)? = nil) throws {
        var h = try VDIHeader.read(from: file)
        if file.isWritable && !h.isDifferencing {
            let report = try VDIRepair.run(file: file, header: h)
            if report.changed {
                repairReport?(report)
                h = try VDIHeader.read(from: file)
            }
        }
        self.file = file
        header = h
        blockSize = UInt64(h.blockSize)
        // Map sectors reach the file only after the data they point to is durable and the
        // header counts their blocks: QEMU allocates at index blocks_allocated, so a map entry
        // at or above it could be handed out again (QEMU itself writes the header first).
        map = TableCache(file: file, tableBytes: Self.chunkBytes, encoding: .u32LE, capacity: 4096,
                         beforeWriteBack: { [file, headerFirst] in
                             try file.sync()
                             try headerFirst()
                         })
        // Append after everything in the file, never under it: even if blocks_allocated is
        // stale (a crash after the map but before the header), no block is handed out twice.
        let fileSize = try file.size()
        let used = fileSize > UInt64(h.offsetData) ? (fileSize - UInt64(h.offsetData) + h.blockStride - 1) / h.blockStride : 0
        let next = max(UInt64(h.blocksAllocated), used)
        allocation = Mutex((h.blocksAllocated, next, false, next))
        preallocator = file.isWritable ? Preallocator(file: file) : nil
        info = ImageInfo(format: "vdi", virtualSize: h.virtualSize, clusterSize: blockSize, details: [
            ("image type", h.imageType == 2 ? "static" : h.isDifferencing ? "differencing (parent \(VDIHeader.uuidText(h.uuidLink)))" : "dynamic"),
            ("UUID", VDIHeader.uuidText(h.uuidImage)),
            ("blocks", "\(h.blocksAllocated) of \(h.blocksInImage) allocated"),
            ("block extra", "\(h.blockExtra)"),
            ("header text", String(h.text.filter { $0 != "\n" })),
        ])
        headerFirst.body = { [unowned self] _ in
            if try self.writeHeaderIfNeeded() { try self.file.sync() }
        }
    }

    private func entryLocation(_ block: UInt64) -> (chunk: UInt64, index: Int) {
        let chunk = block / UInt64(Self.entriesPerChunk)
        return (UInt64(header.offsetBmap) + chunk * UInt64(Self.chunkBytes), Int(block % UInt64(Self.entriesPerChunk)))
    }

    private func host(ofEntry e: UInt64) -> UInt64 {
        UInt64(header.offsetData) + e * header.blockStride + UInt64(header.blockExtra)
    }

    /// Map sectors a walk reads and skips in one I/O (1 MiB of map, 256 Ki blocks).
    static let skipChunks = 2048

    public var allocatedBytesHint: UInt64? {
        min(UInt64(allocation.withLock { $0.count }) * blockSize, info.virtualSize)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        var result: Mapping? = nil
        var pos = offset
        let end = offset + maxLength
        var chunks = 0
        var skippedOnce = false
        // At most `maxChunksPerMap` map sectors per call, plus one skip of at most
        // `skipChunks`, so a status walk's work budget (and a hostile map) is counted in
        // bounded steps: one call reads at most about 1 MiB of map.
        while pos < end && chunks < Self.maxChunksPerMap {
            chunks += 1
            let block = pos / blockSize
            let loc = entryLocation(block)
            // A long walk passes a run of map sectors of unallocated blocks in one step (read
            // in one I/O of at most `skipChunks` sectors, up to the map's end).
            let span = UInt64(Self.entriesPerChunk) * blockSize
            let long = !skippedOnce && loc.index == 0 && end - pos > span
                && result.map({ if case .unallocated = $0 { return true } else { return false } }) ?? true
            if long {
                let spanStart = block * blockSize
                let want = min(UInt64(Self.skipChunks), (end - spanStart) / span)
                let n = try map.countFilled(from: loc.chunk, upTo: UInt64(header.offsetBmap) + header.mapBytes,
                                            byte: 0xFF, limit: Int(want))
                skippedOnce = true
                if n > 0 {
                    let skipped = min(end, spanStart + UInt64(n) * span) - pos
                    result = .unallocated(length: (result?.length ?? 0) + skipped)
                    pos += skipped
                    if n == Int(want) { break }  // the next call goes on
                    continue
                }
            }
            let chunkEnd = min(end, (block - UInt64(loc.index) + UInt64(Self.entriesPerChunk)) * blockSize)
            let scan = try map.mapRun(into: &result, from: pos, to: chunkEnd, unit: blockSize, locate: { p in
                let l = entryLocation(p / blockSize)
                return (l.chunk, l.index)
            }) { view, i, p, n in
                let e = view[i]
                if e == UInt64(VDIHeader.blockFree) { return .unallocated(length: n) }
                if e == UInt64(VDIHeader.blockDiscarded) { return .zero(length: n) }
                guard e < UInt64(header.blocksInImage) else {
                    throw BlockError.invalid(file: file.path, field: "block map entry \(p / blockSize)",
                                             detail: "block index \(e) is not below blocks_in_image \(header.blocksInImage)")
                }
                return .data(host: host(ofEntry: e) + p % blockSize, length: n)
            }
            pos = scan.position
            if scan.ended || pos < chunkEnd { break }
        }
        return result ?? .unallocated(length: maxLength)
    }

    // MARK: allocation (engine holds its allocation lock)

    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        guard isWritable else { throw BlockError.readOnly(file: file.path) }
        let (index, unwritten) = allocation.withLock { ($0.next, $0.unwritten) }
        guard index < UInt64(header.blocksInImage) else {
            throw BlockError.io(file: file.path, operation: "allocate block", offset: offset, errno: 28 /* ENOSPC */)
        }
        if header.blockExtra > 0 { // the per-block prefix VirtualBox keeps: zeros
            try file.write([UInt8](repeating: 0, count: Int(header.blockExtra)), at: host(ofEntry: index) - UInt64(header.blockExtra))
        }
        // Blocks are appended after everything in the file (see `allocation`): fresh, unless
        // an abandoned write may have left bytes there (the engine then writes the whole block).
        return Allocation(guestOffset: offset.alignedDown(blockSize), hostOffset: host(ofEntry: index), length: blockSize,
                          fresh: index >= unwritten)
    }

    /// The block stays the next one handed out (every index below blocks_allocated must be
    /// linked), but no longer as fresh: the failed write may have put bytes in it.
    public func abandon(_ a: Allocation) {
        let index = (a.hostOffset - host(ofEntry: 0)) / header.blockStride
        allocation.withLock { $0.unwritten = max($0.unwritten, index + 1) }
    }

    public func commit(_ a: Allocation) throws {
        let index = (a.hostOffset - host(ofEntry: 0)) / header.blockStride
        allocation.withLock { s in
            s.next = max(s.next, index + 1)
            s.count += 1
            s.dirty = true
        }
        let loc = entryLocation(a.guestOffset / blockSize)
        try map.setEntry(table: loc.chunk, index: loc.index, value: index)
        preallocator?.reached(host(ofEntry: index + 1))
    }

    // MARK: zeroing

    /// Whole blocks: unallocated ones already read zeros; allocated ones are hole-punched
    /// in the host file and stay linked, so blocks_allocated stays exact and no index is
    /// ever handed to another guest block while a reader or writer that mapped it may still
    /// use it (QEMU allocates at index blocks_allocated and never gives a block back either).
    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        let start = offset.alignedUp(blockSize)
        let end = (offset + length).alignedDown(blockSize)
        guard start < end else { return (offset, 0) }
        var pos = start
        while pos < end {
            let m = try map(pos, maxLength: blockSize)
            switch m {
            case .unallocated, .zero: break
            case let .data(host, _):
                if try !file.punchHole(offset: host, length: blockSize) { return (start, pos - start) }
            case .compressed, .shared:  // (neither format has them)
                return (start, pos - start)
            }
            pos += blockSize
        }
        return (start, pos - start)
    }

    // MARK: lifecycle

    /// Writes blocks_allocated if it changed; true if it wrote.
    @discardableResult
    private func writeHeaderIfNeeded() throws -> Bool {
        let count: UInt32? = allocation.withLock { s in
            guard s.dirty else { return nil }
            s.dirty = false
            return s.count
        }
        guard let count else { return false }
        var h = header
        h.blocksAllocated = count
        do { try file.write(Array(h.raw[0..<512]), at: 0) } catch {
            allocation.withLock { $0.dirty = true }
            throw error
        }
        return true
    }

    /// Data, then the header (its count covers the new blocks), then the map sectors that
    /// name them, each step durable before the next (the map cache's barrier does the first two).
    public func flush() throws {
        guard isWritable else { return }
        try file.sync()
        if try writeHeaderIfNeeded() {
            try file.sync()
            if Self.testPauseAfterHeader > 0 { usleep(Self.testPauseAfterHeader) }
        }
        try map.flush()
        try file.sync()
    }

    /// Tests only: a pause between the header write and the map write of a flush, so a
    /// kill -9 can land exactly there.
    static let testPauseAfterHeader: UInt32 = getenv("RAWMOUNT_TEST_VDI_PAUSE_AFTER_HEADER_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    public func close() throws {
        defer { preallocator?.release() }
        try flush()
    }
}
