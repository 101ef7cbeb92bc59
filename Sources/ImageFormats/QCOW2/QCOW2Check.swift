import BlockEngine
import Synchronization

/// What a qcow2 refcount walk found (as `qemu-img check` counts it) and, with repair, fixed.
public struct QCOW2CheckReport: Sendable, CustomStringConvertible {
    public var l2Tables = 0
    public var dataClusters = 0
    public var compressedClusters = 0
    /// Over the active tables, as qemu-img check counts them.
    public var allocatedClusters = 0
    public var fragmentedClusters = 0
    public var activeCompressedClusters = 0
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
        try QCOW2CheckWalk(file: file, header: h, repair: repair, progress: progress).run()
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
