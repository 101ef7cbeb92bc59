import BlockEngine
import Dispatch
import Synchronization

/// QED read/write over the shared engine. Translation: L1 -> L2 -> cluster; L2 entry 0 is
/// unallocated (backing image or zeros), 1 is a zero cluster. Allocation appends at the end
/// of the file: data first (written by the engine), then a new L2 table if needed, then the
/// L1 entry; NEED_CHECK is set before the first allocation and cleared on clean close.
public final class QEDDriver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { file.isWritable }
    public let header: QEDHeader
    public let backingName: String?

    let tables: QEDTables
    /// Header, L1 and every L2 table: no data cluster may point into them.
    let metadata: MetadataRanges
    let allocator: Allocator
    let clusterBits: UInt64
    let l1Shift: UInt64
    /// Header features as currently on disk (NEED_CHECK toggles); guarded by the engine's
    /// allocation lock for writes, read under this mutex.
    private let onDiskFeatures: Mutex<UInt64>
    /// Bumped by every metadata change; the idle timer clears NEED_CHECK only if it did not
    /// move for `idleClean` seconds (QEMU does the same after 5 s).
    private let changes = Mutex(ChangeState())
    private struct ChangeState {
        var generation: UInt64 = 0
        var closed = false
        /// One timer at a time, re-armed from the last change (not one timer per change).
        var timerArmed = false
        var lastChange = 0.0
    }
    static let idleClean = 5.0

    public init(file: ImageFile, repairReport: ((QEDCheckReport) -> Void)? = nil) throws {
        var h = try QEDHeader.read(from: file)
        self.file = file
        if h.hasBacking {
            let bytes = try file.readBytes(count: Int(h.backingNameSize), at: UInt64(h.backingNameOffset), what: "backing file name")
            backingName = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        } else {
            backingName = nil
        }
        let cs = UInt64(h.clusterSize)
        clusterBits = UInt64(cs.trailingZeroBitCount)
        l1Shift = clusterBits + UInt64(h.entriesPerTable.trailingZeroBitCount)
        let fileSize = try file.size()
        allocator = Allocator(file: file.path, nextOffset: fileSize, alignment: cs, preallocating: file)

        if file.isWritable {
            if h.features & QEDHeader.featureNeedCheck != 0 {
                let report = try QEDCheck.run(file: file, header: h, repair: true)
                repairReport?(report)
                try file.sync()
            }
            // No autoclear features are defined: unknown ones are cleared before any write.
            if h.autoclearFeatures != 0 || h.features & QEDHeader.featureNeedCheck != 0 {
                h.autoclearFeatures = 0
                h.features &= ~QEDHeader.featureNeedCheck
                try file.write(h.encoded(), at: 0)
                try file.sync()
            }
        }
        header = h
        onDiskFeatures = Mutex(h.features)
        tables = QEDTables(file: file, header: h)
        metadata = try Self.metadataRanges(file: file, header: h, l1Shift: l1Shift)
        var details: [(String, String)] = [
            ("table size", "\(h.tableSize) clusters"),
            ("features", "0x" + String(h.features, radix: 16)),
        ]
        if let backingName { details.append(("backing file", backingName)) }
        if h.features & QEDHeader.featureBackingNoProbe != 0 { details.append(("backing format", "raw")) }
        info = ImageInfo(format: "qed", virtualSize: h.imageSize, clusterSize: cs, details: details)
    }

    var clusterSize: UInt64 { UInt64(header.clusterSize) }

    /// Commits set only their own entries (a missing L2 table is made at commit time), and
    /// an abandoned run is given back only if it is still the last one: fills may overlap.
    public var fillsConcurrently: Bool { true }

    /// The L2 tables the L1 names for the disk's range (read once, in 1 MiB pieces; bounded
    /// by the L1, not by the data), plus the header area and the L1 itself.
    static func metadataRanges(file: ImageFile, header h: QEDHeader, l1Shift: UInt64) throws -> MetadataRanges {
        let cs = UInt64(h.clusterSize)
        var ranges = [MetadataRanges.Range(start: 0, length: max(h.headerBytes, cs), what: "the header"),
                      MetadataRanges.Range(start: h.l1TableOffset, length: h.tableBytes, what: "the L1 table")]
        let used = min(h.entriesPerTable, (h.imageSize + (1 << l1Shift) - 1) >> l1Shift)
        try FlatTable.forEachEntry(file, start: h.l1TableOffset, count: used, encoding: .u64LE, what: "QED L1 table") { _, e in
            if e != 0 { ranges.append(.init(start: e, length: h.tableBytes, what: "an L2 table")) }
            try MetadataRanges.checkCount(ranges.count, file: file.path)
        }
        return try MetadataRanges(ranges, file: file.path)
    }

    // MARK: translation

    func l2Table(for offset: UInt64) throws -> UInt64 {
        let l2 = try tables.entry(header.l1TableOffset, offset >> l1Shift)
        if l2 != 0 {
            try header.checkTableOffset(l2, path: file.path, fileSize: file.end(cached: allocator.end), what: "L2 table offset in L1 entry \(offset >> l1Shift)")
            let l1 = header.l1TableOffset
            if l2 < l1 + header.tableBytes && l1 < l2 + header.tableBytes {
                throw BlockError.invalid(file: file.path, field: "L2 table offset in L1 entry \(offset >> l1Shift)",
                                         detail: "table at \(l2) overlaps the L1 table at \(l1)")
            }
        }
        return l2
    }

    private func classify(_ e: UInt64, at offset: UInt64) throws -> Mapping {
        switch e {
        case 0: return .unallocated(length: 0)
        case 1: return .zero(length: 0)
        default:
            guard e & (clusterSize - 1) == 0, e >= header.headerBytes, e < allocator.end || e < file.end(cached: allocator.end) else {
                throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset)",
                                         detail: "cluster offset \(e) is unaligned, inside the header or past the end of the file")
            }
            if let m = metadata.overlap(e, clusterSize) {
                throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset)",
                                         detail: "data cluster \(e) lies in \(m.what) at \(m.start)")
            }
            return .data(host: e, length: 0)
        }
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let spanEnd = min(offset + maxLength, ((offset >> l1Shift) + 1) << l1Shift)
        let l2 = try l2Table(for: offset)
        if l2 == 0 { return .unallocated(length: spanEnd - offset) }
        let mask = clusterSize - 1
        let entryMask = header.entriesPerTable - 1
        return try tables.cache.mapRun(from: offset, to: spanEnd, unit: clusterSize, locate: { pos in
            let s = tables.slot(l2, (pos >> clusterBits) & entryMask)
            return (s.chunk, s.index)
        }) { view, i, pos, n in
            switch try classify(view[i], at: pos) {
            case let .data(host, _): return .data(host: host + (pos & mask), length: n)
            case .zero: return .zero(length: n)
            default: return .unallocated(length: n)
            }
        }
    }

    // MARK: allocation (engine holds its allocation lock)

    /// Largest run one allocation covers, so the engine's fill buffer stays small.
    private var maxAllocationBytes: UInt64 { max(clusterSize, 4 << 20) }

    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        guard isWritable else { throw BlockError.readOnly(file: file.path) }
        try markNeedCheck()
        let start = offset.alignedDown(clusterSize)
        let tableEnd = ((offset >> l1Shift) + 1) << l1Shift
        let end = min((offset + length).alignedUp(clusterSize), tableEnd, start + maxAllocationBytes.alignedDown(clusterSize))
        let bytes = max(end - start, clusterSize)
        let host = try allocator.allocate(bytes)
        return Allocation(guestOffset: start, hostOffset: host, length: bytes, fresh: true) // appended
    }

    public func commit(_ a: Allocation) throws {
        try beginMetadataChange()
        defer { scheduleIdleClean() }
        try link(a.guestOffset, clusters: a.length / clusterSize) { a.hostOffset + $0 * clusterSize }
    }

    /// Sets the L2 entries of `clusters` clusters from guest `offset` (creating their L2
    /// table if needed, then linking it in the L1).
    private func link(_ offset: UInt64, clusters: UInt64, _ value: (UInt64) -> UInt64) throws {
        let l2 = try l2TableCreatingIfNeeded(for: offset)
        try TwoLevelLink.link(child: l2.offset, isNew: l2.isNew, first: (offset >> clusterBits) & (header.entriesPerTable - 1),
                              count: clusters, value, setEntry: tables.set) { child in
            try tables.set(header.l1TableOffset, offset >> l1Shift, child)
        }
    }

    /// The data write failed (host disk full): the clusters go back, so the file does not
    /// keep a cluster nothing links.
    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? { metadata.overlap(host, length) }

    public func abandon(_ a: Allocation) {
        allocator.giveBack(a.hostOffset, a.length) { file.cutBack(to: a.hostOffset) }
    }

    /// The L2 table for `offset`; a missing one is allocated after the data clusters. Its file
    /// range is beyond the old end and reads as zeros once the file is extended.
    private func l2TableCreatingIfNeeded(for offset: UInt64) throws -> (offset: UInt64, isNew: Bool) {
        let existing = try l2Table(for: offset)
        if existing != 0 { return (existing, false) }
        let l2 = try allocator.allocate(header.tableBytes)
        let entry = tables.slot(l2, (offset >> clusterBits) & (header.entriesPerTable - 1)).chunk
        try tables.cache.createTable(at: l2, bytes: header.tableBytes, fresh: true, touched: entry, metadata: metadata, what: "an L2 table")
        return (l2, true)
    }

    /// Sets NEED_CHECK (durably) before the first metadata change, as QEMU does.
    private func markNeedCheck() throws {
        try onDiskFeatures.withLock { f in
            guard f & QEDHeader.featureNeedCheck == 0 else { return }
            var h = header
            h.features = f | QEDHeader.featureNeedCheck
            h.autoclearFeatures = 0
            try file.write(h.encoded(), at: 0)
            try file.sync()
            f = h.features
        }
    }

    // MARK: zeroing

    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        let start = offset.alignedUp(clusterSize)
        let end = min((offset + length).alignedDown(clusterSize), ((start >> l1Shift) + 1) << l1Shift)
        guard start < end else { return (offset, 0) }
        var pos = start
        while pos < end {
            let m = try map(pos, maxLength: end - pos)
            let n = m.length
            switch m {
            case .zero:
                break
            case .unallocated:
                if backingName != nil { // must hide the backing image: zero-cluster entries
                    try beginMetadataChange()
                    defer { scheduleIdleClean() }
                    try link(pos, clusters: n / clusterSize) { _ in 1 }
                }
            case let .data(host, _):
                // Keep the cluster (QED never reuses space; dropping it would leak) and punch
                // its bytes in the host file so they read as zeros.
                guard try file.punchHole(offset: host, length: n) else {
                    return (start, pos - start)
                }
            case .compressed, .shared:  // (neither format has them)
                return (start, pos - start)
            }
            pos += n
        }
        return (start, pos - start)
    }

    // MARK: lifecycle

    public func flush() throws {
        guard isWritable else { return }
        try tables.cache.flush()
        try file.sync()
    }

    public func writeBack() throws {
        guard isWritable else { return }
        try tables.cache.writeBackSettled()
    }

    /// Called before any table changes: stops a pending idle clean from passing its check,
    /// then makes sure NEED_CHECK is on disk (the timer may have cleared it since allocate()).
    private func beginMetadataChange() throws {
        changes.withLock { $0.generation += 1 }
        try markNeedCheck()
    }

    /// After a quiet period, write the tables back and clear NEED_CHECK, so a crash of a
    /// long-idle mount leaves a clean image.
    private func scheduleIdleClean() {
        let arm = changes.withLock { c -> Bool in
            c.generation += 1
            c.lastChange = monotonicSeconds()
            defer { c.timerArmed = true }
            return !c.timerArmed
        }
        if arm { armIdleTimer(after: Self.idleClean) }
    }

    private func armIdleTimer(after seconds: Double) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [weak self] in
            self?.idleTimerFired()
        }
    }

    private func idleTimerFired() {
        let (wait, generation) = changes.withLock { c -> (Double?, UInt64) in
            let quiet = monotonicSeconds() - c.lastChange
            if !c.closed && quiet < Self.idleClean { return (Self.idleClean - quiet, c.generation) }
            c.timerArmed = false
            return (nil, c.generation)
        }
        if let wait { armIdleTimer(after: wait) } else { cleanIfIdle(since: generation) }
    }

    private func cleanIfIdle(since generation: UInt64) {
        guard changes.withLock({ $0.generation == generation && !$0.closed }) else { return }
        try? onDiskFeatures.withLock { f in
            guard f & QEDHeader.featureNeedCheck != 0 else { return }
            // Re-check under the header lock: a commit sets NEED_CHECK again before it changes
            // any table, so clearing here never leaves a change unflagged.
            guard changes.withLock({ $0.generation == generation && !$0.closed }) else { return }
            try tables.cache.flush()
            try file.sync()
            var h = header
            h.features = f & ~QEDHeader.featureNeedCheck
            try file.write(h.encoded(), at: 0)
            try file.sync()
            f = h.features
        }
    }

    public func close() throws {
        changes.withLock { $0.closed = true }
        guard isWritable else { return }
        defer { allocator.release() }
        try flush()
        try onDiskFeatures.withLock { f in
            guard f & QEDHeader.featureNeedCheck != 0 else { return }
            var h = header
            h.features = f & ~QEDHeader.featureNeedCheck
            try file.write(h.encoded(), at: 0)
            try file.sync()
            f = h.features
        }
    }
}
