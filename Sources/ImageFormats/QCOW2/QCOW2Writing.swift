import BlockEngine
import Glibc
import Synchronization

/// What `allocate` handed out, for `commit` and `abandon` (kept by host offset).
struct InFlightAllocation: Sendable {
    /// Clusters taken from the refcounts for this allocation (given back if it is abandoned).
    var newClusters: (offset: UInt64, bytes: UInt64)?
    /// Extended L2: the run covers only some subclusters of its cluster.
    var partial: Bool
}

/// qcow2 writing, in QEMU's order:
/// - guest data, then the refcount increase of every cluster it (or a new table) uses,
///   both durable before an L2 slice naming them is written (the L2 cache's barrier);
/// - a new or copied L2 table durable before the L1 entry naming it;
/// - a cluster an L2 or L1 entry stopped naming keeps its refcount until that change is
///   durable; only then does it drop (and the host range is punched), so space becomes
///   reusable only when a crash can no longer leave two owners.
extension QCOW2Driver {
    /// Largest run one allocation covers (4 MiB, at least one cluster), so the engine's fill
    /// buffer stays small even with 2 MiB clusters.
    var maxClustersPerAllocation: UInt64 { max(1, (4 << 20) / header.clusterSize) }

    /// Commits look entries up again and merge subcluster bits, so fills may overlap.
    public var fillsConcurrently: Bool { true }

    /// Header features as QEMU treats them on a writable open: a corrupt image is refused,
    /// a dirty one (lazy refcounts after a crash) has its refcounts rebuilt, the bitmaps are
    /// opened for keeping (`openBitmaps`) and unknown autoclear bits are cleared, all before
    /// any guest write.
    static func prepareForWriting(_ file: ImageFile, _ header: QCOW2Header,
                                  onNote: ((String) -> Void)?) throws -> (QCOW2Header, QCOW2BitmapSet?) {
        var h = header
        if h.incompatible & QCOW2Header.incompatibleCorrupt != 0 {
            throw BlockError.unsupported(file: file.path, feature: "writing an image QEMU marked corrupt (incompatible feature bit 1: "
                + "QEMU found its metadata inconsistent and will not write it either); mount it --read-only, "
                + "or repair it first with `rawmount check --repair` or `qemu-img check -r all`")
        }
        if h.incompatible & QCOW2Header.incompatibleDirty != 0 {
            let report = try QCOW2Check.run(file: file, header: h, repair: true)
            onNote?("the image was left dirty (lazy refcounts, not closed cleanly); refcounts rebuilt: \(report)")
            guard report.corruptions == 0 else {
                throw BlockError.invalid(file: file.path, field: "metadata", detail: "the image was left dirty and its check found damage refcounts cannot fix: \(report)")
            }
            h.incompatible &= ~QCOW2Header.incompatibleDirty
            try QCOW2Header.writeField(file, at: QCOW2Header.Field.incompatible, h.incompatible, bytes: 8)
            try file.sync()
        }
        let bitmaps: QCOW2BitmapSet?
        (h, bitmaps) = try openBitmaps(file, h, onNote: onNote)
        // Unknown autoclear bits go, as the spec asks of a writer that does not know them.
        let autoclear = h.hasBitmaps ? h.autoclear & QCOW2Header.autoclearBitmaps : 0
        if h.version == 3 && autoclear != h.autoclear {
            h.autoclear = autoclear
            try QCOW2Header.writeField(file, at: QCOW2Header.Field.autoclear, autoclear, bytes: 8)
            try file.sync()
        }
        return (h, bitmaps)
    }

    var writer: QCOW2Refcounts {
        get throws {
            guard let refcounts else { throw BlockError.readOnly(file: file.path) }
            return refcounts
        }
    }

    /// The L2 entry (and bitmap) for the cluster at guest `offset`, or zeros without a table.
    private func currentEntry(_ offset: UInt64) throws -> (entry: UInt64, bitmap: UInt64) {
        let table = try l1.entry(offset / header.l1Coverage) & Self.offsetMask
        guard table != 0 else { return (0, 0) }
        return try l2Entry(table, (offset / header.clusterSize) % header.l2Entries)
    }

    // MARK: allocate / commit (the engine holds its allocation lock)

    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        let refcounts = try writer
        let cs = header.clusterSize
        let clusterStart = offset.alignedDown(cs)
        let (e, _) = try currentEntry(offset)
        let host = e & Self.offsetMask
        let compressed = e & Self.compressedFlag != 0
        let owned = e & Self.copiedFlag != 0 && !compressed
        let a: Allocation, record: InFlightAllocation
        if header.extendedL2 {
            let sub = cs / 32
            let first = offset.alignedDown(sub)
            let last = min((offset + length).alignedUp(sub), clusterStart + cs)
            if host != 0 && owned && !compressed {
                // Our own cluster: only the subclusters written become allocated, in place.
                a = Allocation(guestOffset: first, hostOffset: host + (first - clusterStart), length: last - first)
                record = InFlightAllocation(newClusters: nil, partial: true)
            } else if host != 0 || compressed {
                // Shared or compressed: the whole cluster is copied (its subclusters may be of
                // every kind, so the engine fills through the read path).
                let n = try refcounts.allocate(maxClusters: 1)
                a = Allocation(guestOffset: clusterStart, hostOffset: n.offset, length: cs, fresh: n.fresh, mixed: true)
                record = InFlightAllocation(newClusters: (n.offset, cs), partial: false)
            } else {
                let n = try refcounts.allocate(maxClusters: 1)
                a = Allocation(guestOffset: first, hostOffset: n.offset + (first - clusterStart), length: last - first, fresh: n.fresh)
                record = InFlightAllocation(newClusters: (n.offset, cs), partial: last - first < cs)
            }
        } else if host != 0 && !compressed && e & Self.zeroFlag != 0 && owned {
            // A preallocated zero cluster of our own: written in place, the zero flag goes.
            a = Allocation(guestOffset: clusterStart, hostOffset: host, length: cs)
            record = InFlightAllocation(newClusters: nil, partial: false)
        } else if host != 0 || compressed {
            let n = try refcounts.allocate(maxClusters: 1)
            a = Allocation(guestOffset: clusterStart, hostOffset: n.offset, length: cs, fresh: n.fresh)
            record = InFlightAllocation(newClusters: (n.offset, cs), partial: false)
        } else {
            // Unallocated or zero clusters: a run of them, up to the end of their L2 table.
            let tableEnd = (offset / header.l1Coverage + 1) * header.l1Coverage
            let end = min((offset + length).alignedUp(cs), tableEnd, clusterStart + maxClustersPerAllocation * cs)
            let n = try refcounts.allocate(maxClusters: max(1, (end - clusterStart) / cs))
            a = Allocation(guestOffset: clusterStart, hostOffset: n.offset, length: n.clusters * cs, fresh: n.fresh)
            record = InFlightAllocation(newClusters: (n.offset, n.clusters * cs), partial: false)
        }
        inFlight.withLock { $0[a.hostOffset] = record }
        return a
    }

    /// The host bytes an entry names (a compressed cluster's range may span two clusters).
    private func replaced(_ e: UInt64) throws -> (offset: UInt64, bytes: UInt64)? {
        if e & Self.compressedFlag != 0 {
            let r = header.compressedRange(e)
            return (r.host, r.bytes)
        }
        let host = e & Self.offsetMask
        return host == 0 ? nil : (host, header.clusterSize)
    }

    public func commit(_ a: Allocation) throws {
        let record = inFlight.withLock { $0.removeValue(forKey: a.hostOffset) } ?? InFlightAllocation(partial: false)
        let cs = header.clusterSize
        let table = try writableL2(for: a.guestOffset)
        let clusterStart = a.guestOffset.alignedDown(cs)
        let hostCluster = a.hostOffset.alignedDown(cs)
        if header.extendedL2 {
            let (old, bitmap) = try currentEntry(clusterStart)
            let sub = cs / 32
            let firstSC = (a.guestOffset - clusterStart) / sub
            let count = a.length / sub
            let bits: UInt64 = count >= 32 ? 0xFFFF_FFFF : ((1 << count) - 1) << firstSC
            // Compressed entries carry no bitmap; a copied cluster is allocated whole.
            let base = old & Self.compressedFlag != 0 || count >= 32 ? 0 : bitmap
            let newBitmap = (base | bits) & ~(bits << 32)
            try checkRelease(old, guest: clusterStart)
            try setL2(table, clusterStart, entry: hostCluster | Self.copiedFlag, bitmap: newBitmap)
            try freeReplaced(old, keeping: hostCluster)
            if record.partial, record.newClusters != nil {
                try file.extend(to: hostCluster + cs)  // its unwritten subclusters read as zeros
            }
        } else {
            for k in 0 ..< a.length / cs {
                let (old, _) = try currentEntry(clusterStart + k * cs)
                try checkRelease(old, guest: clusterStart + k * cs)
                try setL2(table, clusterStart + k * cs, entry: (hostCluster + k * cs) | Self.copiedFlag, bitmap: 0)
                try freeReplaced(old, keeping: hostCluster + k * cs)
            }
        }
    }

    /// Refuses (as metadata damage: the image is marked corrupt) to release a compressed
    /// entry whose range lies in a cluster another entry names as data: its refcount would
    /// fall to 0 and that data would be freed and punched.
    private func checkRelease(_ old: UInt64, guest: UInt64) throws {
        guard old & Self.compressedFlag != 0 else { return }
        let r = header.compressedRange(old)
        let owners = try compressedOwners.withLock { owners in
            if let owners { return owners }
            let built = try QCOW2CompressedOwners(self)
            owners = built
            return built
        }
        if let c = owners.dataCluster(in: r.host, bytes: r.bytes, clusterSize: header.clusterSize) {
            throw BlockError.metadataOverlap(file: file.path, detail: "releasing the compressed cluster of guest offset \(guest) "
                + "(host \(r.host), \(r.bytes) bytes) would free host cluster \(c), which another L2 entry names as data")
        }
    }

    /// Queues what an overwritten entry named (a shared, compressed or preallocated-zero
    /// cluster) unless the new entry names the same cluster.
    private func freeReplaced(_ old: UInt64, keeping host: UInt64) throws {
        if let r = try replaced(old), r.offset != host { try writer.deferFree(r.offset, length: r.bytes) }
    }

    public func abandon(_ a: Allocation) {
        guard let record = inFlight.withLock({ $0.removeValue(forKey: a.hostOffset) }), let n = record.newClusters else { return }
        try? refcounts?.release(n.offset, length: n.bytes)
    }

    func setL2(_ table: UInt64, _ guest: UInt64, entry: UInt64, bitmap: UInt64) throws {
        let perSlice = l2SliceBytes / 8
        let word = (guest / header.clusterSize) % header.l2Entries * (header.l2EntryBytes / 8)
        let slice = table + (word / perSlice) * l2SliceBytes
        try l2.setEntry(table: slice, index: Int(word % perSlice), value: entry)
        if header.extendedL2 { try l2.setEntry(table: slice, index: Int(word % perSlice) + 1, value: bitmap) }
    }

    /// The L2 table for guest `offset`, ready to change: a missing one is created zeroed, a
    /// shared one (L1 COPIED clear) is copied; either is written to its new cluster at once,
    /// and the L1 entry changes in memory, reaching the disk after the table (`flush`).
    func writableL2(for offset: UInt64) throws -> UInt64 {
        let refcounts = try writer
        let index = offset / header.l1Coverage
        let e = try l1.entry(index)
        let old = e & Self.offsetMask
        if old != 0 && e & Self.copiedFlag != 0 { return old }
        let cs = header.clusterSize
        let n = try refcounts.allocate(maxClusters: 1)
        // A shared table is copied (its entries stay shared); a missing one starts zeroed.
        let copy = old == 0 ? nil : try file.readBytes(count: Int(cs), at: old, what: "qcow2 L2 table")
        try l2.createTable(at: n.offset, bytes: cs, contents: copy, fresh: n.fresh, metadata: metadata, what: "an L2 table")
        l1.set(index, n.offset | Self.copiedFlag)
        if old != 0 { refcounts.deferFree(old, length: cs) }
        return n.offset
    }

    // MARK: zeroing

    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        // Without a zero flag (version 2) only unallocation reads as zeros, and only with
        // nothing underneath.
        if header.version < 3 && hasBacking { return (offset, 0) }
        return try setClusters(offset, length: length, toBacking: false)
    }

    /// Whole clusters of the range stop being this image's: they read from the backing file
    /// again (`commit` empties the image it committed). The cluster the disk ends in counts
    /// as whole.
    public func unallocate(_ offset: UInt64, length: UInt64) throws -> (offset: UInt64, length: UInt64) {
        try setClusters(offset, length: length, toBacking: true)
    }

    /// Sets whole clusters of the range to read as zeros (`toBacking` false: the zero flag,
    /// or unallocated without a backing file) or from the backing file (unallocated), the
    /// clusters they named freed once that is durable.
    private func setClusters(_ offset: UInt64, length: UInt64, toBacking: Bool) throws -> (offset: UInt64, length: UInt64) {
        let refcounts = try writer
        let cs = header.clusterSize
        let start = offset.alignedUp(cs)
        let last = toBacking && offset + length >= header.size ? (offset + length).alignedUp(cs) : (offset + length).alignedDown(cs)
        let end = min(last, (start / header.l1Coverage + 1) * header.l1Coverage, start + UInt64(Self.maxClustersPerMap) * cs)
        guard start < end else { return (offset, 0) }
        let unallocated = toBacking || !hasBacking
        if try l1.entry(start / header.l1Coverage) & Self.offsetMask == 0 && unallocated { return (start, min(end, offset + length) - start) }
        let table = try writableL2(for: start)
        var pos = start
        while pos < end {
            let (e, bitmap) = try currentEntry(pos)
            let entry: UInt64, newBitmap: UInt64
            if header.extendedL2 { (entry, newBitmap) = (0, unallocated ? 0 : 0xFFFF_FFFF << 32) } else { (entry, newBitmap) = (unallocated ? 0 : Self.zeroFlag, 0) }
            if e != entry || bitmap != newBitmap {
                try checkRelease(e, guest: pos)
                try setL2(table, pos, entry: entry, bitmap: newBitmap)
                if let r = try replaced(e) { refcounts.deferFree(r.offset, length: r.bytes) }
            }
            pos += cs
        }
        return (start, min(end, offset + length) - start)
    }

    // MARK: lifecycle

    /// What the last commit or zeroing stopped pointing at (the engine releases it after a flush).
    /// Tests only: pauses between the two writes of each ordering a crash must not break (a
    /// new L2 table durable / the L1 naming it; an unlink durable / the refcount drop; a new
    /// refcount table durable / the header naming it), so a kill -9 lands exactly there.
    static let testPause: UInt32 = getenv("RAWMOUNT_TEST_QCOW2_PAUSE_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    public func takeUnlinked() -> [HostRange] {
        refcounts?.takePendingFrees().map { HostRange(offset: $0.start, length: $0.length) } ?? []
    }

    /// Drops the refcounts of ranges whose unlinking the engine made durable; a cluster that
    /// reaches 0 is punched and stops counting as metadata before it can be handed out.
    public func release(_ ranges: [HostRange]) throws {
        let refcounts = try writer
        if Self.testPause > 0 { usleep(Self.testPause) }
        var freed: [UInt64] = []
        try refcounts.applyFrees(ranges.map { ($0.offset, $0.length) }) { cluster in
            metadata.remove(start: cluster)  // a freed L2 table may come back as data
            _ = try? file.punchHole(offset: cluster, length: header.clusterSize)
            freed.append(cluster)
        }
        for cluster in freed { l2.discard(cluster, length: header.clusterSize) }
    }

    /// Every metadata layer in its order (`writeBackChain`, one pass at a time), then a barrier.
    public func flush() throws {
        try writeBackChain?.flush()
    }

    /// The periodic write-back: a full flush, but only when a table changed (in-place data
    /// writes need no metadata; fsync makes them durable).
    public func writeBack() throws {
        guard let writeBackChain, writeBackChain.isDirty else { return }
        try flush()
    }

    /// Every write, zeroing and discard reaches the enabled bitmaps.
    public func noteGuestChange(_ offset: UInt64, length: UInt64) { bitmaps?.record(offset, length: length) }

    /// The guest's data durable first, then the bitmaps that describe it.
    public func close() throws {
        try flush()
        try storeBitmaps()
    }
}
