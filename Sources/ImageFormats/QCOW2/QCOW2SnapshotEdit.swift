import BlockEngine
import Glibc

/// Internal snapshots taken, reverted to and deleted (`rawmount snapshot -c|-a|-d`), in
/// QEMU's order, so a crash at any point leaves at worst leaked clusters, never a cluster
/// with fewer references than owners:
/// - take: the active L1 copied to new clusters; every table and cluster it reaches gains a
///   reference (durable); only then the snapshot table names the copy.
/// - revert: the snapshot's clusters gain a reference; the active L1 is overwritten with the
///   snapshot's (durable); then what the old active L1 reached loses one.
/// - delete: the snapshot leaves the table first; then what its L1 reached loses a reference
///   and its L1 is freed.
/// After each, the active tables' COPIED flags are set again from the refcounts. The driver
/// must be closed after one edit (its header is the one it opened with).
extension QCOW2Driver {
    /// Takes a snapshot of the active disk named `name` (IDs count up from the highest).
    public func createSnapshot(name: String, dateSeconds: UInt32, dateNanoseconds: UInt32) throws -> QCOW2Snapshot {
        let refcounts = try editable()
        let h = try QCOW2Header.read(from: file)
        let list = try QCOW2Snapshots.read(from: file, header: h)
        guard UInt32(list.count) < QCOW2Snapshots.maxSnapshots else {
            throw BlockError.unsupported(file: file.path, feature: "more than \(QCOW2Snapshots.maxSnapshots) internal snapshots (QEMU's limit)")
        }
        guard name.utf8.count <= Int(UInt16.max) else { throw BlockError.usage("\(file.path): a snapshot name of \(name.utf8.count) bytes is too long") }
        let id = String((list.compactMap { UInt64($0.id) }.max() ?? 0) + 1)
        try checkDistinctTables(l1.all)  // before anything is written
        try flush()
        // The copy of the active L1, as it is (QEMU keeps its COPIED flags).
        let entries = l1.entries, cs = header.clusterSize
        var copyAt: UInt64 = 0
        if entries > 0 {
            let clusters = (entries * 8 + cs - 1) / cs
            copyAt = try refcounts.allocateRun(clusters)
            var bytes = [UInt8](repeating: 0, count: Int(clusters * cs))
            for (i, e) in l1.all.enumerated() { put64be(&bytes, i * 8, e) }
            try metadata.guardWrite(copyAt, clusters * cs, as: "a snapshot's L1 table", file: file.path)
            try file.write(bytes, at: copyAt)
            metadata.insert(.init(start: copyAt, length: entries * 8, what: "a snapshot's L1 table"))
        }
        // Flags first: an entry without COPIED whose refcount is still 1 is only copied
        // needlessly by a writer; one with COPIED whose cluster is shared would be overwritten.
        try setCopiedFlags(clearingAll: true)
        try flush()
        try addReferences(l1Entries: l1.all, by: 1)
        try flush()
        let entry = QCOW2Snapshots.entry(l1Offset: copyAt, l1Entries: UInt32(entries), id: id, name: name,
                                         dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds, diskSize: header.size)
        try rewriteSnapshotTable(list.map(\.stored) + [entry], header: h)
        var s = QCOW2Snapshot(id: id, name: name, l1Offset: copyAt, l1Entries: UInt32(entries), diskSize: header.size,
                              dateSeconds: dateSeconds, vmStateSize: 0)
        s.dateNanoseconds = dateNanoseconds
        return s
    }

    /// Makes the active disk what snapshot `key` (ID, then name) holds; the snapshot stays.
    /// Returns the disk size afterwards (the snapshot's).
    public func applySnapshot(_ key: String) throws -> UInt64 {
        let refcounts = try editable()
        let h = try QCOW2Header.read(from: file)
        let s = try QCOW2Snapshots.find(key, in: try QCOW2Snapshots.read(from: file, header: h), file: file.path)
        try h.checkL1(offset: s.l1Offset, entries: s.l1Entries, diskSize: s.diskSize, fileSize: try file.size(),
                      path: file.path, what: "snapshot '\(s.name)' L1")
        if s.diskSize != header.size {
            guard s.diskSize % 512 == 0 else {
                throw BlockError.invalid(file: file.path, field: "snapshot '\(s.name)' disk size", detail: "\(s.diskSize) is not a multiple of 512")
            }
            if let e = bitmaps?.entries.first(where: { !$0.consistent }) {
                throw BlockError.unsupported(file: file.path, feature: "reverting to a snapshot of another disk size while bitmap '\(e.bitmap.name)' "
                    + "is inconsistent (it cannot be resized; remove it first)")
            }
        }
        var theirs = [UInt64](repeating: 0, count: Int(s.l1Entries))
        try FlatTable.forEachEntry(file, start: s.l1Offset, count: UInt64(s.l1Entries), encoding: .u64BE, what: "snapshot '\(s.name)' L1") { i, e in
            theirs[Int(i)] = e
        }
        try checkDistinctTables(theirs)  // before anything is written
        try checkDistinctTables(l1.all)
        try flush()
        if UInt64(s.l1Entries) > l1.entries { try growL1(to: UInt64(s.l1Entries)) }
        let wanted = theirs + [UInt64](repeating: 0, count: Int(l1.entries) - theirs.count)
        try addReferences(l1Entries: wanted, by: 1)
        try flush()
        // Written without COPIED (every table is shared with the snapshot now); the flags
        // come back where the refcount falls to 1, at the end.
        let old = l1.all
        for (i, e) in wanted.enumerated() where old[i] != e & ~Self.copiedFlag { l1.set(UInt64(i), e & ~Self.copiedFlag) }
        try flush()
        if s.diskSize != header.size {
            try bitmaps?.resize(to: s.diskSize)  // stored at close, for the snapshot's size
            try QCOW2Header.writeField(file, at: 24, s.diskSize, bytes: 8)
            try file.sync()
        }
        try addReferences(l1Entries: old, by: -1)
        try setCopiedFlags()
        try flush()
        _ = refcounts
        return s.diskSize
    }

    /// Deletes snapshot `key` (by name, as qemu-img snapshot -d, then by ID).
    public func deleteSnapshot(_ key: String) throws -> QCOW2Snapshot {
        _ = try editable()
        let h = try QCOW2Header.read(from: file)
        let list = try QCOW2Snapshots.read(from: file, header: h)
        let s = try list.first(where: { $0.name == key }) ?? QCOW2Snapshots.find(key, in: list, file: file.path)
        let index = list.firstIndex { $0.id == s.id && $0.name == s.name } ?? 0
        try h.checkL1(offset: s.l1Offset, entries: s.l1Entries, diskSize: s.diskSize, fileSize: try file.size(),
                      path: file.path, what: "snapshot '\(s.name)' L1")
        var theirs = [UInt64](repeating: 0, count: Int(s.l1Entries))
        try FlatTable.forEachEntry(file, start: s.l1Offset, count: UInt64(s.l1Entries), encoding: .u64BE, what: "snapshot '\(s.name)' L1") { i, e in
            theirs[Int(i)] = e
        }
        try checkDistinctTables(theirs)
        try checkDistinctTables(l1.all)
        try flush()
        var rest = list
        rest.remove(at: index)
        try rewriteSnapshotTable(rest.map(\.stored), header: h)
        try addReferences(l1Entries: theirs, by: -1)
        if s.l1Entries > 0 {
            metadata.remove(start: s.l1Offset)
            try release([HostRange(offset: s.l1Offset, length: UInt64(s.l1Entries) * 8)])
        }
        try setCopiedFlags()
        try flush()
        return s
    }

    // MARK: the steps

    private func editable() throws -> QCOW2Refcounts {
        let refcounts = try writer
        guard header.refcountBits > 1 else {
            throw BlockError.unsupported(file: file.path, feature: "internal snapshots with 1-bit refcounts (a cluster could not have two owners)")
        }
        return refcounts
    }

    /// Every L2 table an L1 names and every cluster those tables name gain (`by` 1) or lose
    /// (`by` -1) one reference, as QEMU counts them: once per L1 entry naming the table. Lost
    /// references are applied table by table, a cluster reaching 0 punched. A gained one
    /// clears the entry's COPIED flag (the cluster is shared now), as QEMU does.
    private func addReferences(l1Entries: [UInt64], by delta: Int64) throws {
        let refcounts = try writer
        let cs = header.clusterSize, end = knownEnd
        try checkDistinctTables(l1Entries)
        for (i, e) in l1Entries.enumerated() {
            let table = e & Self.offsetMask
            guard table != 0 else { continue }
            guard table % cs == 0, table < end else {
                throw BlockError.invalid(file: file.path, field: "L1 entry \(i)", detail: "L2 table offset \(table) is not a cluster inside the file")
            }
            if let m = metadata.overlap(table, cs, except: "an L2 table") {
                throw BlockError.invalid(file: file.path, field: "L1 entry \(i)", detail: "L2 table at \(table) lies in \(m.what) at \(m.start)")
            }
            var ranges: [HostRange] = []
            for j in 0 ..< header.l2Entries {
                let (entry, bitmap) = try l2Entry(table, j)
                if delta > 0 && entry & Self.copiedFlag != 0 {
                    try setL2(table, UInt64(i) * header.l1Coverage + j * cs, entry: entry & ~Self.copiedFlag, bitmap: bitmap)
                }
                if entry & Self.compressedFlag != 0 {
                    let r = header.compressedRange(entry)
                    guard r.host < end, r.bytes <= end - r.host, metadata.overlap(r.host, r.bytes) == nil else {
                        throw BlockError.invalid(file: file.path, field: "L2 table at \(table), entry \(j)",
                                                 detail: "compressed cluster at \(r.host) is not free-standing data inside the file")
                    }
                    ranges.append(HostRange(offset: r.host, length: r.bytes))
                    continue
                }
                let host = entry & Self.offsetMask
                guard host != 0 else { continue }
                guard host % cs == 0, host < end, metadata.overlap(host, cs) == nil else {
                    throw BlockError.invalid(file: file.path, field: "L2 table at \(table), entry \(j)",
                                             detail: "data offset \(host) is not a free-standing cluster inside the file")
                }
                ranges.append(HostRange(offset: host, length: cs))
            }
            ranges.append(HostRange(offset: table, length: cs))
            if delta > 0 {
                for r in ranges { try refcounts.change(bytes: r.offset, length: r.length, by: 1) }
            } else {
                try release(ranges)
            }
        }
    }

    /// The active tables' COPIED flags from the refcounts: set exactly where the refcount is 1
    /// (never on compressed or unallocated entries); `clearingAll`: cleared everywhere.
    private func setCopiedFlags(clearingAll: Bool = false) throws {
        let refcounts = try writer
        let cs = header.clusterSize
        try checkDistinctTables(l1.all)
        for (i, e) in l1.all.enumerated() {
            let table = e & Self.offsetMask
            guard table != 0 else { continue }
            let l1Wanted = try !clearingAll && refcounts.refcount(table / cs) == 1 ? table | Self.copiedFlag : table
            if l1Wanted != e { l1.set(UInt64(i), l1Wanted) }
            for j in 0 ..< header.l2Entries {
                let (entry, bitmap) = try l2Entry(table, j)
                let host = entry & Self.offsetMask
                var wanted = entry & ~Self.copiedFlag
                if !clearingAll, entry & Self.compressedFlag == 0, host != 0, try refcounts.refcount(host / cs) == 1 { wanted |= Self.copiedFlag }
                if wanted != entry { try setL2(table, UInt64(i) * header.l1Coverage + j * cs, entry: wanted, bitmap: bitmap) }
            }
        }
    }

    /// QEMU never names one L2 table twice in an L1; a hostile L1 that does would make these
    /// walks cost its entries times a table's, so it is refused (its L2 walks stay bounded by
    /// the tables the file holds).
    private func checkDistinctTables(_ entries: [UInt64]) throws {
        var seen: [UInt64: Int] = [:]
        for (i, e) in entries.enumerated() where e & Self.offsetMask != 0 {
            if let j = seen.updateValue(i, forKey: e & Self.offsetMask) {
                throw BlockError.invalid(file: file.path, field: "L1 entries \(j) and \(i)",
                                         detail: "both name the L2 table at \(e & Self.offsetMask) (check the image: qemu-img check)")
            }
        }
    }

    /// Writes the snapshot table to new clusters, switches the header to it (count and offset
    /// in one write), then frees the old table.
    private func rewriteSnapshotTable(_ entries: [[UInt8]], header h: QCOW2Header) throws {
        let refcounts = try writer
        let cs = header.clusterSize
        let bytes = entries.flatMap { $0 }
        guard UInt64(bytes.count) <= QCOW2Snapshots.maxTableBytes else {
            throw BlockError.unsupported(file: file.path, feature: "a snapshot table over QEMU's 64 MiB")
        }
        var at: UInt64 = 0
        if !bytes.isEmpty {
            let clusters = (UInt64(bytes.count) + cs - 1) / cs
            at = try refcounts.allocateRun(clusters)
            try metadata.guardWrite(at, clusters * cs, as: "the snapshot table", file: file.path)
            try file.write(bytes + [UInt8](repeating: 0, count: Int(clusters * cs) - bytes.count), at: at)
            metadata.insert(.init(start: at, length: UInt64(bytes.count), what: "the snapshot table"))
        }
        try flush()
        var field = [UInt8](repeating: 0, count: 12)
        put32be(&field, 0, UInt32(entries.count))
        put64be(&field, 4, at)
        try file.write(field, at: 60)
        try file.sync()
        if h.snapshots > 0 {
            let old = try QCOW2Snapshots.readTable(from: file, header: h).bytes
            metadata.remove(start: h.snapshotsOffset)
            try release([HostRange(offset: h.snapshotsOffset, length: old)])
        }
    }

    /// Moves the active L1 table to a fresh run of clusters with `entries` entries (the old
    /// ones, then empty ones), as QEMU grows it: the new table durable, then the header naming
    /// it (count and offset in one write), then the old clusters freed.
    public func growL1(to entries: UInt64) throws {
        let refcounts = try writer
        guard entries > l1.entries else { return }
        let cs = header.clusterSize
        guard entries * 8 <= QCOW2Header.maxL1Bytes else {
            throw BlockError.unsupported(file: file.path, feature: "an L1 table of \(entries) entries (QEMU's limit is \(QCOW2Header.maxL1Bytes / 8))")
        }
        try flush()
        let clusters = (entries * 8 + cs - 1) / cs
        let at = try refcounts.allocateRun(clusters)
        var bytes = [UInt8](repeating: 0, count: Int(clusters * cs))
        for (i, e) in l1.all.enumerated() { put64be(&bytes, i * 8, e) }
        try metadata.guardWrite(at, clusters * cs, as: "the L1 table", file: file.path)
        try file.write(bytes, at: at)
        try flush()
        var field = [UInt8](repeating: 0, count: 12)
        put32be(&field, 0, UInt32(entries))
        put64be(&field, 4, at)
        try file.write(field, at: 36)
        try file.sync()
        let old = (offset: l1.offset, bytes: l1.entries * 8)
        l1.relocate(to: at, entries: entries)
        metadata.remove(start: old.offset)
        metadata.insert(.init(start: at, length: entries * 8, what: "the L1 table"))
        if old.bytes > 0 { try release([HostRange(offset: old.offset, length: old.bytes)]) }
    }
}
