import BlockEngine
import Synchronization

/// qcow2: the active L1 table -> L2 tables (read in slices through the shared table cache)
/// -> clusters that are data, zero, unallocated (backing file or zeros) or compressed
/// (deflate or zstd); extended L2 images map per subcluster. A data cluster whose COPIED
/// flag is clear is shared (with an internal snapshot) and maps as `.shared`, so a write
/// copies it. Writing (allocation from the refcounts, copy-on-write, zeroing, the order
/// of table writes) is in `QCOW2Writing.swift`.
public final class QCOW2Driver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { refcounts != nil }
    public var readOnlyReason: String? { snapshot != nil && file.isWritable ? "an internal snapshot is shown read-only" : nil }
    public let header: QCOW2Header
    /// The internal snapshot shown instead of the active disk, if one was asked for.
    public let snapshot: QCOW2Snapshot?

    let l1: QCOW2L1
    let l2: TableCache
    /// Writable images only: the refcounts and the allocator on them.
    let refcounts: QCOW2Refcounts?
    /// Writable: the order metadata reaches the disk (refcounts, then L2 tables after the
    /// data, then the L1), as QEMU orders it.
    let writeBackChain: WriteBackChain?
    /// Writable images: the persistent dirty bitmaps being kept (nil for version 2).
    public let bitmaps: QCOW2BitmapSet?
    /// Read-only images: consistent bitmaps, loaded when first asked for.
    let loadedBitmaps = Mutex<[(name: String, bits: DirtyBitmap)]?>(nil)
    /// Whether a backing image sits under this one (zeroing must then hide it).
    let hasBacking: Bool
    /// Allocations handed out and not yet linked, by host offset (engine's allocation lock).
    let inFlight = Mutex<[UInt64: InFlightAllocation]>([:])
    let l2SliceBytes: UInt64
    let fileSize: UInt64
    let inflated: InflatedClusters
    /// Header cluster, the L1 and the L2 tables it names: no data cluster may point into them.
    let metadata: MetadataRanges
    /// L1 entries whose L2 table is really other metadata (the header, the L1, a refcount
    /// structure, the snapshot table...), found once at open: using one fails (`l2Table`).
    /// New tables come from the allocator, which never hands out metadata.
    let aliasedL2: [UInt64: String]
    /// Writable images: built when a compressed entry is first released (`checkRelease`).
    let compressedOwners = Mutex<QCOW2CompressedOwners?>(nil)
    /// Compressed output (`convert -c`): the next free byte of the cluster compressed data is
    /// being packed into (0: none yet), as QEMU packs it.
    let compressedTail = Mutex<UInt64>(0)
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    /// Longest run one `map` call assembles, so a call stays cheap on huge requests.
    static let maxClustersPerMap = 512

    /// `snapshot`: an internal snapshot's ID or name, to show that instead of the active disk.
    /// `onNote` hears what a writable open changed before the mount goes on (a repair of a
    /// dirty (lazy-refcount) image fixed before a writable mount.
    public init(file: ImageFile, snapshot key: String? = nil,
                onNote: ((String) -> Void)? = nil) throws {
        var h = try QCOW2Header.read(from: file)
        self.file = file
        hasBacking = h.backingName != nil
        let writable = file.isWritable && key == nil
        var bitmaps: QCOW2BitmapSet? = nil
        if writable { (h, bitmaps) = try Self.prepareForWriting(file, h, onNote: onNote) }
        self.bitmaps = bitmaps
        header = h
        fileSize = try file.size()
        var l1Offset = h.l1Offset, l1Entries = h.l1Entries
        if let key {
            let s = try QCOW2Snapshots.find(key, in: try QCOW2Snapshots.read(from: file, header: h), file: file.path)
            try h.checkL1(offset: s.l1Offset, entries: s.l1Entries, diskSize: s.diskSize, fileSize: fileSize,
                          path: file.path, what: "snapshot '\(s.name)' L1")
            guard s.diskSize % 512 == 0 else {
                throw BlockError.invalid(file: file.path, field: "snapshot '\(s.name)' disk size", detail: "\(s.diskSize) is not a multiple of 512")
            }
            // As qemu-img convert -l and qemu-nbd -l show it: the snapshot's tables at the
            // image's current size (past what its L1 covers reads as unallocated).
            (l1Offset, l1Entries) = (s.l1Offset, s.l1Entries)
            snapshot = s
        } else {
            snapshot = nil
        }
        l1 = try QCOW2L1(file: file, offset: l1Offset, entries: UInt64(l1Entries), fileSize: fileSize, writable: writable)
        // L2 tables are read in slices of at most 4 KiB, as QEMU does, so a 2 MiB-cluster
        // image does not read 2 MiB of table for one small read. Before any L2 slice is
        // written, the refcounts of what it points at and the data are made durable.
        metadata = try Self.metadataRanges(file: file, header: h, l1Offset: l1Offset, l1Entries: UInt64(l1Entries), fileSize: fileSize)
        let refcounts = writable ? try QCOW2Refcounts(file: file, header: h, fileSize: fileSize, metadata: metadata) : nil
        self.refcounts = refcounts
        l2SliceBytes = min(h.clusterSize, 4096)
        l2 = TableCache(file: file, tableBytes: Int(l2SliceBytes), encoding: .u64BE, capacity: 4096)
        if let refcounts, writable {
            writeBackChain = WriteBackChain([.init(refcounts.chain), .init(l2, afterData: true), .init(l1)], barrier: { [file] in try file.sync() })
        } else {
            writeBackChain = nil
        }
        inflated = InflatedClusters(clusterBytes: Int(h.clusterSize))
        if let refcounts {
            // A write must never land on the refcount structures, the snapshot table, a
            // snapshot's L1 or the bitmaps either (their tables are bounded by QEMU's limits).
            var extra: [MetadataRanges.Range] = []
            let (snapshots, snapshotBytes) = try QCOW2Snapshots.readTable(from: file, header: h)
            if snapshotBytes > 0 { extra.append(.init(start: h.snapshotsOffset, length: snapshotBytes, what: "the snapshot table")) }
            for s in snapshots where s.l1Entries > 0 {
                extra.append(.init(start: s.l1Offset, length: UInt64(s.l1Entries) * 8, what: "a snapshot's L1 table"))
            }
            // (By now the bitmaps are valid and flagged in use, or QEMU ignores them.)
            if h.autoclear & QCOW2Header.autoclearBitmaps != 0 {
                try QCOW2Check.walkBitmaps(file: file, header: h, fileSize: fileSize, tablesOnly: true) { start, length, _ in
                    extra.append(.init(start: start, length: length, what: "a bitmap directory or table"))
                    return true
                }
            }
            let t = refcounts.tableRange
            extra.append(.init(start: t.offset, length: t.bytes, what: "the refcount table"))
            try metadata.insert(contentsOf: extra, file: file.path)
            var blocks: [MetadataRanges.Range] = []
            for b in refcounts.blockOffsets {
                guard b <= fileSize, h.clusterSize <= fileSize - b else {
                    throw BlockError.invalid(file: file.path, field: "refcount table", detail: "block offset \(b) lies outside the \(fileSize)-byte file")
                }
                if let m = metadata.overlap(b, h.clusterSize) {
                    throw BlockError.invalid(file: file.path, field: "refcount table", detail: "block at \(b) lies in \(m.what) at \(m.start)")
                }
                blocks.append(.init(start: b, length: h.clusterSize, what: "a refcount block"))
            }
            try metadata.insert(contentsOf: blocks, file: file.path)
        }
        var aliased: [UInt64: String] = [:]
        let metadata = self.metadata
        let usedL1 = min(UInt64(l1Entries), (h.size + h.l1Coverage - 1) / h.l1Coverage)
        try FlatTable.forEachEntry(file, start: l1Offset, count: usedL1, encoding: .u64BE, fileSize: fileSize, what: "qcow2 L1 table") { i, e in
            let table = e & Self.offsetMask
            if table != 0, let m = metadata.overlap(table, h.clusterSize, except: "an L2 table") {
                aliased[i] = "L2 table at \(table) lies in \(m.what) at \(m.start)"
            }
        }
        aliasedL2 = aliased
        var details: [(String, String)] = [
            ("version", "\(h.version)"),
            ("compression type", h.compressionType == 0 ? "zlib" : "zstd"),  // qemu-img's names
            ("refcount bits", "\(h.refcountBits)"),
        ]
        if h.compatible & QCOW2Header.compatibleLazyRefcounts != 0 { details.append(("lazy refcounts", "on (rawmount writes ordered refcounts all the same)")) }
        if h.extendedL2 { details.append(("extended L2", "yes (32 subclusters per cluster)")) }
        if let s = snapshot {
            details.append(("snapshot shown", "\(s.id) (\(s.name)), taken \(s.dateText) when the disk was \(s.diskSize) bytes"))
        } else if h.snapshots > 0 {
            details.append(("internal snapshots", "\(h.snapshots) (the active disk is shown)"))
        }
        if h.hasBitmaps {
            details.append(("dirty bitmaps", h.autoclear & QCOW2Header.autoclearBitmaps == 0
                ? "\(h.bitmapCount), stale (autoclear bit 0 clear: a program without bitmap support wrote the image)" : "\(h.bitmapCount)"))
        }
        if h.incompatible & QCOW2Header.incompatibleDirty != 0 { details.append(("dirty", "yes (refcounts may be stale; reads are not affected)")) }
        if h.incompatible & QCOW2Header.incompatibleCorrupt != 0 { details.append(("corrupt", "marked corrupt by QEMU")) }
        info = ImageInfo(format: "qcow2", virtualSize: h.size, clusterSize: h.clusterSize, details: details)
    }

    /// The L1 entries the disk's range uses are read once (at most QEMU's 32 MiB L1).
    static func metadataRanges(file: ImageFile, header h: QCOW2Header, l1Offset: UInt64, l1Entries: UInt64,
                               fileSize: UInt64) throws -> MetadataRanges {
        var ranges = [MetadataRanges.Range(start: 0, length: h.clusterSize, what: "the header cluster"),
                      MetadataRanges.Range(start: l1Offset, length: l1Entries * 8, what: "the L1 table")]
        let used = min(l1Entries, (h.size + h.l1Coverage - 1) / h.l1Coverage)
        try FlatTable.forEachEntry(file, start: l1Offset, count: used, encoding: .u64BE, fileSize: fileSize, what: "qcow2 L1 table") { _, e in
            let table = e & offsetMask
            if table != 0 { ranges.append(.init(start: table, length: h.clusterSize, what: "an L2 table")) }
            try MetadataRanges.checkCount(ranges.count, file: file.path)
        }
        return try MetadataRanges(ranges, file: file.path)
    }

    /// L2 entry `i` of the table at `table` (and its subcluster bitmap with extended L2).
    func l2Entry(_ table: UInt64, _ i: UInt64) throws -> (entry: UInt64, bitmap: UInt64) {
        let perSlice = l2SliceBytes / 8
        let word = i * (header.l2EntryBytes / 8)
        let slice = table + (word / perSlice) * l2SliceBytes
        let entry = try l2.entry(table: slice, index: Int(word % perSlice))
        guard header.extendedL2 else { return (entry, 0) }
        return (entry, try l2.entry(table: slice, index: Int(word % perSlice) + 1))
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let cs = header.clusterSize
        let l1Index = offset / header.l1Coverage
        let end = min(offset + maxLength, (l1Index + 1) * header.l1Coverage)
        let table = try l2Table(l1Index)
        if table == 0 { return .unallocated(length: end - offset) }
        // Long walks (status, SEEK_DATA) skip an empty L2 table in one step; the cache
        // remembers it, so L1 entries that all alias one table cost one scan.
        if end - offset > 64 * cs, try isEmptyL2(table) { return .unallocated(length: end - offset) }
        // Inside one cluster (every small guest request): its entry alone, one cache lookup.
        if end - offset <= cs - offset % cs {
            let (e, bitmap) = try l2Entry(table, (offset / cs) % header.l2Entries)
            return try mapCluster(e, bitmap, offset, end - offset)
        }
        // One scan per L2 slice the range crosses, each under one cache lookup.
        let words = header.l2EntryBytes / 8, perSlice = l2SliceBytes / 8
        return try l2.mapRun(from: offset, to: end, unit: cs, stride: Int(words), maxPieces: Self.maxClustersPerMap, locate: { pos in
            let word = (pos / cs) % header.l2Entries * words
            return (table + word / perSlice * l2SliceBytes, Int(word % perSlice))
        }) { view, w, pos, n in
            try mapCluster(view[w], header.extendedL2 ? view[w + 1] : 0, pos, n)
        }
    }

    /// The L2 table L1 entry `l1Index` names (0: none, or past the L1), checked to be a
    /// cluster inside the file.
    func l2Table(_ l1Index: UInt64) throws -> UInt64 {
        guard l1Index < l1.entries else { return 0 }
        let table = try l1.entry(l1Index) & Self.offsetMask
        if table == 0 { return 0 }
        let cs = header.clusterSize
        let fileSize = file.end(cached: knownEnd)  // a writer may have grown it (--force-share)
        guard table % cs == 0, table <= fileSize, cs <= fileSize - table else {
            throw BlockError.invalid(file: file.path, field: "L1 entry \(l1Index)",
                                     detail: "L2 table offset \(table) is not a cluster inside the \(fileSize)-byte file")
        }
        // An L2 table that is really the header, the L1, a refcount structure or a snapshot
        // table: its "entries" would map guest writes onto that structure.
        if !aliasedL2.isEmpty, let why = aliasedL2[l1Index] {
            throw BlockError.invalid(file: file.path, field: "L1 entry \(l1Index)", detail: why)
        }
        return table
    }

    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? { metadata.overlap(host, length) }

    /// As QEMU's qcow2_signal_corruption: the corrupt bit goes into the header (durably), so
    /// the image mounts only read-only until `check --repair` (or qemu-img check -r all).
    public func signalCorruption(_ error: BlockError) {
        guard refcounts != nil, let field = try? file.readBytes(count: 8, at: UInt64(QCOW2Header.Field.incompatible), what: "qcow2 header") else { return }
        let flags = field.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        try? QCOW2Header.writeField(file, at: QCOW2Header.Field.incompatible, flags | QCOW2Header.incompatibleCorrupt, bytes: 8)
        try? file.sync()
    }

    /// The file's end as far as this process knows (it grows as clusters are allocated).
    var knownEnd: UInt64 { refcounts?.end ?? fileSize }

    private func isEmptyL2(_ table: UInt64) throws -> Bool {
        var slice = table
        while slice < table + header.clusterSize {
            guard try l2.isEmpty(table: slice) else { return false }
            slice += l2SliceBytes
        }
        return true
    }

    /// What guest bytes from `offset` are, up to the end of their cluster (or of their run
    /// of like subclusters) and never past `end`.
    /// Guest bytes `[offset, offset+maxLength)` of one cluster (L2 entry `e`, and its
    /// subcluster bitmap with extended L2), or a first part of them.
    private func mapCluster(_ e: UInt64, _ bitmap: UInt64, _ offset: UInt64, _ maxLength: UInt64) throws -> Mapping {
        let cs = header.clusterSize
        let inCluster = offset % cs
        let clusterEnd = offset + maxLength
        if e & Self.compressedFlag != 0 {
            let (host, size) = header.compressedRange(e)
            guard host < knownEnd || host < file.end(cached: knownEnd) else {
                throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset - inCluster)",
                                         detail: "compressed cluster at \(host) lies outside the \(fileSize)-byte file")
            }
            // The whole range, not its first byte: its clusters are freed when it is overwritten.
            if let m = metadata.overlap(host, size) {
                throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset - inCluster)",
                                         detail: "compressed cluster at \(host) lies in \(m.what) at \(m.start)")
            }
            return .compressed(host: host, size: size, length: clusterEnd - offset)
        }
        let host = e & Self.offsetMask
        if host != 0 && host % cs != 0 {
            throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset - inCluster)",
                                     detail: "data offset \(host) is not cluster aligned")
        }
        if host != 0, let m = metadata.overlap(host, cs) {
            throw BlockError.invalid(file: file.path, field: "L2 entry for guest offset \(offset - inCluster)",
                                     detail: "data cluster \(host) lies in \(m.what) at \(m.start)")
        }
        // A cluster other tables (snapshots) also point at is copied before it is written.
        let owned = e & Self.copiedFlag != 0
        guard header.extendedL2 else {
            if e & Self.zeroFlag != 0 { return .zero(length: clusterEnd - offset) }
            if host == 0 { return .unallocated(length: clusterEnd - offset) }
            return owned ? .data(host: host + inCluster, length: clusterEnd - offset) : .shared(host: host + inCluster, length: clusterEnd - offset)
        }
        // Extended L2: bit sc of the bitmap allocates subcluster sc, bit 32+sc makes it read as zeros.
        let sub = cs / 32
        func state(_ sc: UInt64) throws -> Int {
            let allocated = bitmap >> sc & 1 != 0, zero = bitmap >> (32 + sc) & 1 != 0
            if allocated && zero || allocated && host == 0 {
                throw BlockError.invalid(file: file.path, field: "L2 bitmap for guest offset \(offset - inCluster)",
                                         detail: "subcluster \(sc) is " + (zero ? "both allocated and zero" : "allocated in an unallocated cluster"))
            }
            return zero ? 0 : allocated ? 1 : 2
        }
        let first = inCluster / sub
        let kind = try state(first)
        var sc = first + 1
        // A bad subcluster further on ends the run; it is reported when it is read itself.
        while sc < 32 && (offset - inCluster) + sc * sub < clusterEnd, (try? state(sc)) == kind { sc += 1 }
        let runEnd = min(clusterEnd, offset - inCluster + sc * sub)
        switch kind {
        case 0: return .zero(length: runEnd - offset)
        case 1: return owned ? .data(host: host + inCluster, length: runEnd - offset) : .shared(host: host + inCluster, length: runEnd - offset)
        default: return .unallocated(length: runEnd - offset)
        }
    }

    /// The image's internal snapshots (reads the snapshot table).
    public func snapshots() throws -> [QCOW2Snapshot] { try QCOW2Snapshots.read(from: file, header: header) }

    public func readCompressed(_ mapping: Mapping, guestOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard case let .compressed(host, size, _) = mapping else { return }
        let cs = Int(header.clusterSize)
        let at = Int(guestOffset % header.clusterSize)
        let cluster = try inflated.cluster(at: host, need: at + buffer.count) { limit in
            let stored = try Decompress.stored(file, count: Int(min(size, UInt64(2 * cs) + 512)), at: host)
            return try Decompress.first(limit, of: stored, as: header.compressionType == 1 ? .zstd : .rawDeflate, whole: cs,
                                        file: file.path, what: "compressed cluster at \(host)")
        }
        cluster.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at ..< at + buffer.count])) }
    }

}
