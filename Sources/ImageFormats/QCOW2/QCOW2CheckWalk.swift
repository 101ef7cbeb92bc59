import BlockEngine

/// One pass of the qcow2 check (`QCOW2Check.run`): count every reference reachable from the
/// header, compare the counts with the stored refcounts (raising and lowering them with
/// repair), then check the COPIED flags of the active tables.
final class QCOW2CheckWalk {
    let file: ImageFile
    let h: QCOW2Header
    let repair: Bool
    let progress: ((UInt64, UInt64) -> Void)?
    let cs: UInt64
    let fileSize: UInt64
    let fileClusters: UInt64
    let counts: ReferenceCounts
    var report = QCOW2CheckReport()
    /// How many references the range being counted stands for (an L2 table named by
    /// several L1 entries is read once and its clusters counted that many times).
    var weight: UInt64 = 1
    /// Every L1 (active and snapshots) names L2 tables; each distinct table is then read
    /// once, so aliased entries (hostile, or many snapshots sharing tables) cost no more
    /// reading than the tables the file holds.
    var l2References: [UInt64: (count: UInt64, name: String)] = [:]
    /// The active L1's L2 tables in L1 order, and per table what qemu-img's fragmentation
    /// count needs: its first and last data cluster and the breaks inside it.
    var activeL2Order: [UInt64] = []
    var activeTables: [UInt64: TableRun] = [:]
    struct TableRun {
        var first: UInt64? = nil, last: UInt64? = nil
        var breaks = 0, allocated = 0, compressed = 0
    }

    init(file: ImageFile, header: QCOW2Header, repair: Bool, progress: ((UInt64, UInt64) -> Void)?) throws {
        self.file = file; h = header; self.repair = repair; self.progress = progress
        cs = header.clusterSize
        fileSize = try file.size()
        fileClusters = (fileSize + cs - 1) / cs
        counts = ReferenceCounts(file: file.path)
    }

    func run() throws -> QCOW2CheckReport {
        _ = try addRange(0, cs, "the header")
        try walkL1(h.l1Offset, UInt64(h.l1Entries), "active")
        // A damaged snapshot table is corruption to report, not a reason to stop (as qemu-img).
        do {
            let (snapshots, snapshotBytes) = try QCOW2Snapshots.readTable(from: file, header: h)
            if snapshotBytes > 0 { _ = try addRange(h.snapshotsOffset, snapshotBytes, "the snapshot table") }
            for s in snapshots { try walkL1(s.l1Offset, UInt64(s.l1Entries), "snapshot '\(s.name)'") }
        } catch let e as BlockError {
            invalid("\(e)")
        }
        try walkL2Tables()
        (report.allocatedClusters, report.fragmentedClusters, report.activeCompressedClusters) = fragmentation()
        do {
            try QCOW2Check.walkBitmaps(file: file, header: h, fileSize: fileSize, addRange)
        } catch let e as BlockError {
            invalid("\(e)")
        }
        let refcounts = try QCOW2Refcounts(file: file, header: h, fileSize: fileSize, excluded: { [counts] in counts.count($0) > 0 })
        try countRefcountStructures(refcounts)
        try compareRefcounts(refcounts)
        try checkCopiedFlags(refcounts)
        if repair { try file.sync() }
        return report
    }

    /// An entry or structure that is not valid (counted as corruption, as qemu-img does).
    func invalid(_ text: String) {
        report.invalidEntries += 1
        report.note(text)
    }

    /// Counts the clusters of `[start, start+length)` once per `weight`; false (and an
    /// invalid entry noted) when the range is not inside the file.
    func addRange(_ start: UInt64, _ length: UInt64, _ what: String) throws -> Bool {
        guard length > 0 else { return true }
        guard start < fileSize, start + length <= fileClusters * cs else {
            invalid("\(what) at \(start) (\(length) bytes) lies outside the \(fileSize)-byte file")
            return false
        }
        var c = start / cs
        while c <= (start + length - 1) / cs { try counts.add(c, times: weight); c += 1 }
        return true
    }

    func walkL1(_ offset: UInt64, _ entries: UInt64, _ name: String) throws {
        guard try addRange(offset, entries * 8, "\(name) L1 table") else { return }
        try FlatTable.forEachEntry(file, start: offset, count: entries, encoding: .u64BE, what: "\(name) L1 table") { i, e in
            let t = e & QCOW2Check.l1Mask
            // Bits the spec reserves (1-8 and 56-62), as qemu-img check counts them.
            if e & 0x7F00_0000_0000_01FE != 0 {
                invalid("\(name) L1 entry \(i) has reserved bits set: 0x\(String(e, radix: 16))")
            }
            guard t != 0 else { return }
            guard t % cs == 0 else {
                invalid("\(name) L1 entry \(i): L2 table offset \(t) is not cluster aligned")
                return
            }
            l2References[t, default: (0, name)].count += 1
            if name == "active" {
                activeL2Order.append(t)
                activeTables[t] = TableRun()
            }
        }
    }

    func walkL2Tables() throws {
        let total = UInt64(l2References.count) * cs
        var done: UInt64 = 0
        for (t, r) in l2References.sorted(by: { $0.key < $1.key }) {
            done += cs
            progress?(done, total)
            weight = r.count
            defer { weight = 1 }
            guard try addRange(t, cs, "\(r.name) L2 table") else { continue }
            report.l2Tables += Int(r.count)
            try walkL2(t, r.name)
        }
    }

    func walkL2(_ table: UInt64, _ name: String) throws {
        let bytes = try file.readBytes(count: Int(cs), at: table, what: "qcow2 L2 table")
        let view = TableView(bytes: bytes, encoding: .u64BE)
        let step = Int(h.l2EntryBytes / 8)
        var run = activeTables[table]
        defer { if let run { activeTables[table] = run } }
        for i in stride(from: 0, to: view.count, by: step) {
            let e = view[i]
            let bitmap = h.extendedL2 ? view[i + 1] : 0
            // qemu-img's allocation and fragmentation counts (active tables): a compressed
            // cluster is allocated and fragmented by nature; a data cluster is fragmented
            // when it does not follow the one before it on the host.
            if run != nil {
                if e & QCOW2Driver.compressedFlag != 0 {
                    run!.allocated += 1; run!.compressed += 1
                } else if e & QCOW2Driver.offsetMask != 0 {
                    let host = e & QCOW2Driver.offsetMask
                    run!.allocated += 1
                    if let last = run!.last { if host != last + cs { run!.breaks += 1 } } else { run!.first = host }
                    run!.last = host
                }
            }
            if e & QCOW2Driver.compressedFlag != 0 {
                let (host, bytes) = h.compressedRange(e)
                if e & QCOW2Driver.copiedFlag != 0 {
                    report.copiedErrors += 1
                    report.note("\(name) L2 table at \(table), entry \(i / step): a compressed cluster has COPIED set")
                }
                if try addRange(host, bytes, "compressed cluster (L2 table at \(table))") { report.compressedClusters += 1 }
                continue
            }
            let host = e & QCOW2Driver.offsetMask
            // Reserved in a standard descriptor: bits 1-8 and 56-61 (bit 0 too with extended L2).
            if e & (0x3F00_0000_0000_01FE | (h.extendedL2 ? 1 : 0)) != 0 {
                invalid("\(name) L2 table at \(table), entry \(i / step) has reserved bits set: 0x\(String(e, radix: 16))")
            }
            if h.extendedL2 && (bitmap & (bitmap >> 32) & 0xFFFF_FFFF != 0 || host == 0 && bitmap & 0xFFFF_FFFF != 0) {
                invalid("\(name) L2 table at \(table), entry \(i / step): subcluster bitmap 0x\(String(bitmap, radix: 16)) is invalid")
            }
            guard host != 0 else { continue }
            guard host % cs == 0 else {
                invalid("\(name) L2 table at \(table), entry \(i / step): data offset \(host) is not cluster aligned")
                continue
            }
            if try addRange(host, cs, "data cluster (L2 table at \(table))") { report.dataClusters += 1 }
        }
    }

    /// qemu-img check's allocated-clusters and fragmented-clusters over the active tables,
    /// in guest order (the host order continues from one L2 table to the next).
    func fragmentation() -> (allocated: Int, fragmented: Int, compressed: Int) {
        var allocated = 0, fragmented = 0, compressed = 0
        var last: UInt64? = nil
        for t in activeL2Order {
            guard let r = activeTables[t] else { continue }
            allocated += r.allocated
            compressed += r.compressed
            fragmented += r.compressed + r.breaks
            if let first = r.first {
                if let last, first != last + cs { fragmented += 1 }
                last = r.last
            }
        }
        return (allocated, fragmented, compressed)
    }

    /// The refcount table and blocks are counted as references too.
    func countRefcountStructures(_ refcounts: QCOW2Refcounts) throws {
        let table = refcounts.tableRange
        _ = try addRange(table.offset, table.bytes, "the refcount table")
        for i in refcounts.entriesWithReservedBits {
            invalid("refcount table entry \(i) has reserved bits set")
        }
        for b in refcounts.blockOffsets {
            guard b % cs == 0 else {
                invalid("refcount block offset \(b) is not cluster aligned")
                continue
            }
            _ = try addRange(b, cs, "refcount block")
        }
    }

    /// Stored refcounts against the counts, where either can be nonzero: the clusters some
    /// table references and those an existing refcount block covers (not every cluster of
    /// the file: a tiny image truncated to 16 TiB has one block, not 2^28 clusters to visit).
    func compareRefcounts(_ refcounts: QCOW2Refcounts) throws {
        var raise: [(UInt64, UInt64)] = [], lower: [(UInt64, UInt64)] = []
        func compare(_ c: UInt64) throws {
            let want = counts.count(c), have = try refcounts.refcount(c)
            if have < want {
                report.refcountErrors += 1
                report.note("cluster \(c): refcount \(have), referenced \(want) times")
                raise.append((c, want))
            } else if have > want {
                report.leakedClusters += 1
                lower.append((c, want))
            }
        }
        var spans = counts.countedRanges + refcounts.blockIndices.map { ($0 * refcounts.perBlock, ($0 + 1) * refcounts.perBlock) }
        spans.sort { $0.start < $1.start }
        var next: UInt64 = 0
        for span in spans {
            let from = max(span.start, next), to = min(span.end, fileClusters)
            guard from < to else { continue }
            next = to
            for c in from..<to {
                try compare(c)
            }
        }
        if repair {
            for (c, want) in raise { try refcounts.set(c, to: want); report.repairedRefcounts += 1 }
            // Blocks and a moved table a raise created are in use: not leaks.
            let t = refcounts.tableRange
            let structures = Set(refcounts.blockOffsets.map { $0 / cs } + Array(t.offset / cs ..< (t.offset + t.bytes) / cs))
            for (c, want) in lower where !structures.contains(c) { try refcounts.set(c, to: want); report.repairedRefcounts += 1 }
            try refcounts.writeDirty()
            try file.sync()
        }
    }

    /// COPIED on the active tables: set exactly when the refcount is 1.
    func checkCopiedFlags(_ refcounts: QCOW2Refcounts) throws {
        func refcountNow(_ c: UInt64) throws -> UInt64 { repair ? counts.count(c) : try refcounts.refcount(c) }
        var visited = Set<UInt64>()
        try FlatTable.forEachEntry(file, start: h.l1Offset, count: UInt64(h.l1Entries), encoding: .u64BE, what: "active L1 table") { i, e in
            let t = e & QCOW2Check.l1Mask
            guard t != 0, t % cs == 0, t + cs <= fileSize else { return }
            let copied = e & QCOW2Driver.copiedFlag != 0
            if copied != (try refcountNow(t / cs) == 1) {
                report.copiedErrors += 1
                report.note("active L1 entry \(i): COPIED is \(copied ? "set" : "clear") but the L2 table's refcount is \(try refcountNow(t / cs))")
                if repair {
                    var b = [UInt8](repeating: 0, count: 8)
                    put64be(&b, 0, e ^ QCOW2Driver.copiedFlag)
                    try file.write(b, at: h.l1Offset + i * 8)
                    report.repairedCopied += 1
                }
            }
            guard visited.insert(t).inserted else { return }  // an aliased table is looked at once
            let bytes = try file.readBytes(count: Int(cs), at: t, what: "qcow2 L2 table")
            let view = TableView(bytes: bytes, encoding: .u64BE)
            let step = Int(h.l2EntryBytes / 8)
            for k in stride(from: 0, to: view.count, by: step) {
                let x = view[k]
                let host = x & QCOW2Driver.offsetMask
                guard x & QCOW2Driver.compressedFlag == 0, host != 0, host % cs == 0, host < fileSize else { continue }
                let copied = x & QCOW2Driver.copiedFlag != 0
                let rc = try refcountNow(host / cs)
                if copied != (rc == 1) {
                    report.copiedErrors += 1
                    report.note("L2 table at \(t), entry \(k / step): COPIED is \(copied ? "set" : "clear") but the cluster's refcount is \(rc)")
                    if repair {
                        var b = [UInt8](repeating: 0, count: 8)
                        put64be(&b, 0, x ^ QCOW2Driver.copiedFlag)
                        try file.write(b, at: t + UInt64(k) * 8)
                        report.repairedCopied += 1
                    }
                }
            }
        }
    }
}
