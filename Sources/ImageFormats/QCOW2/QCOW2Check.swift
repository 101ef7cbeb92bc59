import BlockEngine
import Synchronization

/// What a qcow2 refcount walk found (as `qemu-img check` counts it) and, with repair, fixed.
public struct QCOW2CheckReport: Sendable, CustomStringConvertible {
    public var l2Tables = 0
    public var dataClusters = 0
    public var compressedClusters = 0
    /// Entries that point outside the file or at unaligned offsets, bad subcluster bitmaps.
    public var invalidEntries = 0
    /// Clusters referenced more often than their refcount says (or with refcount 0).
    public var refcountErrors = 0
    /// L1/L2 entries whose COPIED flag disagrees with the refcount.
    public var copiedErrors = 0
    public var leakedClusters = 0
    public var repairedRefcounts = 0
    public var repairedCopied = 0
    /// The first few findings, named.
    public var messages: [String] = []

    public var corruptions: Int { invalidEntries + refcountErrors + copiedErrors }

    mutating func note(_ text: String) { if messages.count < 20 { messages.append(text) } }

    public var description: String {
        var parts = ["\(l2Tables) L2 tables, \(dataClusters) data clusters (\(compressedClusters) compressed)"]
        if invalidEntries > 0 { parts.append("\(invalidEntries) invalid entries") }
        if refcountErrors > 0 { parts.append("\(refcountErrors) clusters referenced more often than their refcount") }
        if copiedErrors > 0 { parts.append("\(copiedErrors) COPIED flags wrong") }
        if leakedClusters > 0 { parts.append("\(leakedClusters) leaked clusters") }
        if repairedRefcounts > 0 { parts.append("\(repairedRefcounts) refcounts repaired") }
        if repairedCopied > 0 { parts.append("\(repairedCopied) COPIED flags repaired") }
        return parts.joined(separator: "; ") + messages.map { "\n  " + $0 }.joined()
    }
}

/// References per host cluster, counted in pages so memory follows what is referenced.
final class ReferenceCounts: @unchecked Sendable {  // used by one thread
    private var pages: [UInt64: [UInt16]] = [:]
    static let pageBits: UInt64 = 16
    static let maxPages = 2048  // 256 MiB
    let file: String
    init(file: String) { self.file = file }

    func add(_ cluster: UInt64, times: UInt64 = 1) throws {
        let p = cluster >> Self.pageBits
        if pages[p] == nil {
            guard pages.count < Self.maxPages else {
                throw BlockError.invalid(file: file, field: "references", detail: "more referenced clusters than a check can count")
            }
            pages[p] = [UInt16](repeating: 0, count: 1 << Self.pageBits)
        }
        let i = Int(cluster & ((1 << Self.pageBits) - 1))
        pages[p]![i] = UInt16(min(UInt64(pages[p]![i]) + times, UInt64(UInt16.max)))
    }

    /// The clusters of the pages that hold any count (in order): `[start, end)` ranges.
    var countedRanges: [(start: UInt64, end: UInt64)] {
        pages.keys.sorted().map { ($0 << Self.pageBits, ($0 + 1) << Self.pageBits) }
    }

    func count(_ cluster: UInt64) -> UInt64 {
        pages[cluster >> Self.pageBits].map { UInt64($0[Int(cluster & ((1 << Self.pageBits) - 1))]) } ?? 0
    }
}

/// The qcow2 consistency check: every table and data cluster reachable from the header,
/// the active and snapshot L1 tables, the refcount structures and the bitmaps is counted,
/// and the counts are compared with the stored refcounts and COPIED flags. Repair sets
/// refcounts to the counts (leaks and refcounts too low) and fixes COPIED flags, then
/// checks again; it never drops an entry.
public enum QCOW2Check {
    static let l1Mask: UInt64 = 0x00FF_FFFF_FFFF_FE00

    /// `progress(done, total)`: bytes of L2 tables read so far, of all there are (the check's
    /// cost on a large image), for a progress line on a terminal.
    public static func run(file: ImageFile, header h: QCOW2Header, repair: Bool,
                           progress: ((UInt64, UInt64) -> Void)? = nil) throws -> QCOW2CheckReport {
        var report = try walk(file: file, header: h, repair: repair, progress: progress)
        guard repair, report.refcountErrors + report.copiedErrors + report.leakedClusters > 0 else { return report }
        let again = try walk(file: file, header: h, repair: false)
        report.invalidEntries = again.invalidEntries
        report.refcountErrors = again.refcountErrors
        report.copiedErrors = again.copiedErrors
        report.leakedClusters = again.leakedClusters
        report.messages = again.messages
        return report
    }

    private static func walk(file: ImageFile, header h: QCOW2Header, repair: Bool,
                             progress: ((UInt64, UInt64) -> Void)? = nil) throws -> QCOW2CheckReport {
        var report = QCOW2CheckReport()
        let cs = h.clusterSize
        let fileSize = try file.size()
        let fileClusters = (fileSize + cs - 1) / cs
        let counts = ReferenceCounts(file: file.path)
        // How many references the range being counted stands for (an L2 table named by
        // several L1 entries is read once and its clusters counted that many times).
        var weight: UInt64 = 1
        func addRange(_ start: UInt64, _ length: UInt64, _ what: String) throws -> Bool {
            guard length > 0 else { return true }
            guard start < fileSize, start + length <= fileClusters * cs else {
                report.invalidEntries += 1
                report.note("\(what) at \(start) (\(length) bytes) lies outside the \(fileSize)-byte file")
                return false
            }
            var c = start / cs
            while c <= (start + length - 1) / cs { try counts.add(c, times: weight); c += 1 }
            return true
        }
        _ = try addRange(0, cs, "the header")

        // Every L1 (active and snapshots) names L2 tables; each distinct table is then read
        // once, so aliased entries (hostile, or many snapshots sharing tables) cost no more
        // reading than the tables the file holds.
        var l2References: [UInt64: (count: UInt64, name: String)] = [:]
        func walkL1(_ offset: UInt64, _ entries: UInt64, _ name: String) throws {
            guard try addRange(offset, entries * 8, "\(name) L1 table") else { return }
            try FlatTable.forEachEntry(file, start: offset, count: entries, encoding: .u64BE, what: "\(name) L1 table") { i, e in
                let t = e & l1Mask
                // Bits the spec reserves (1-8 and 56-62), as qemu-img check counts them.
                if e & 0x7F00_0000_0000_01FE != 0 {
                    report.invalidEntries += 1
                    report.note("\(name) L1 entry \(i) has reserved bits set: 0x\(String(e, radix: 16))")
                }
                guard t != 0 else { return }
                guard t % cs == 0 else {
                    report.invalidEntries += 1
                    report.note("\(name) L1 entry \(i): L2 table offset \(t) is not cluster aligned")
                    return
                }
                l2References[t, default: (0, name)].count += 1
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
            for i in stride(from: 0, to: view.count, by: step) {
                let e = view[i]
                let bitmap = h.extendedL2 ? view[i + 1] : 0
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
                    report.invalidEntries += 1
                    report.note("\(name) L2 table at \(table), entry \(i / step) has reserved bits set: 0x\(String(e, radix: 16))")
                }
                if h.extendedL2 && (bitmap & (bitmap >> 32) & 0xFFFF_FFFF != 0 || host == 0 && bitmap & 0xFFFF_FFFF != 0) {
                    report.invalidEntries += 1
                    report.note("\(name) L2 table at \(table), entry \(i / step): subcluster bitmap 0x\(String(bitmap, radix: 16)) is invalid")
                }
                guard host != 0 else { continue }
                guard host % cs == 0 else {
                    report.invalidEntries += 1
                    report.note("\(name) L2 table at \(table), entry \(i / step): data offset \(host) is not cluster aligned")
                    continue
                }
                if try addRange(host, cs, "data cluster (L2 table at \(table))") { report.dataClusters += 1 }
            }
        }

        try walkL1(h.l1Offset, UInt64(h.l1Entries), "active")
        // A damaged snapshot table is corruption to report, not a reason to stop (as qemu-img).
        do {
            let (snapshots, snapshotBytes) = try QCOW2Snapshots.readTable(from: file, header: h)
            if snapshotBytes > 0 { _ = try addRange(h.snapshotsOffset, snapshotBytes, "the snapshot table") }
            for s in snapshots { try walkL1(s.l1Offset, UInt64(s.l1Entries), "snapshot '\(s.name)'") }
        } catch let e as BlockError {
            report.invalidEntries += 1
            report.note("\(e)")
        }
        try walkL2Tables()
        do {
            try walkBitmaps(file: file, header: h, fileSize: fileSize, addRange)
        } catch let e as BlockError {
            report.invalidEntries += 1
            report.note("\(e)")
        }

        let refcounts = try QCOW2Refcounts(file: file, header: h, fileSize: fileSize, excluded: { counts.count($0) > 0 })
        let table = refcounts.tableRange
        _ = try addRange(table.offset, table.bytes, "the refcount table")
        for i in refcounts.entriesWithReservedBits {
            report.invalidEntries += 1
            report.note("refcount table entry \(i) has reserved bits set")
        }
        for b in refcounts.blockOffsets {
            guard b % cs == 0 else {
                report.invalidEntries += 1
                report.note("refcount block offset \(b) is not cluster aligned")
                continue
            }
            _ = try addRange(b, cs, "refcount block")
        }

        // Stored refcounts against the counts, where either can be nonzero: the clusters some
        // table references and those an existing refcount block covers (not every cluster of
        // the file: a tiny image truncated to 16 TiB has one block, not 2^28 clusters to visit).
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

        // COPIED on the active tables: set exactly when the refcount is 1.
        func refcountNow(_ c: UInt64) throws -> UInt64 { repair ? counts.count(c) : try refcounts.refcount(c) }
        var visited = Set<UInt64>()
        try FlatTable.forEachEntry(file, start: h.l1Offset, count: UInt64(h.l1Entries), encoding: .u64BE, what: "active L1 table") { i, e in
            let t = e & l1Mask
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
        if repair { try file.sync() }
        return report
    }

    /// The bitmap directory, each bitmap's table and (unless `tablesOnly`) the clusters it
    /// names. With autoclear bit 0 clear QEMU ignores the bitmaps (their clusters count as
    /// leaked), and so does this walk.
    static func walkBitmaps(file: ImageFile, header h: QCOW2Header, fileSize: UInt64, tablesOnly: Bool = false,
                            _ addRange: (UInt64, UInt64, String) throws -> Bool) throws {
        guard h.hasBitmaps, h.autoclear & QCOW2Header.autoclearBitmaps != 0 else { return }
        let bitmaps = try QCOW2Bitmaps.readDirectory(file, header: h, fileSize: fileSize).bitmaps
        guard try addRange(h.bitmapDirectoryOffset, h.bitmapDirectorySize, "the bitmap directory") else { return }
        for b in bitmaps where b.tableEntries > 0 {
            let entries = UInt64(b.tableEntries)
            guard try addRange(b.tableOffset, entries * 8, "the table of bitmap '\(b.name)'"), !tablesOnly else { continue }
            _ = try QCOW2Bitmaps.forEachTableEntry(b, file: file, header: h, fileSize: fileSize) { _, e in
                let c = e & QCOW2Bitmaps.tableOffsetMask
                if c != 0 { _ = try addRange(c, h.clusterSize, "a data cluster of bitmap '\(b.name)'") }
            }
        }
    }
}
