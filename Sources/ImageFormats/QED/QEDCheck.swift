import BlockEngine

/// What a QED consistency check found (and, with repair, fixed).
public struct QEDCheckReport: Sendable, CustomStringConvertible {
    public var l2Tables = 0
    public var dataClusters = 0
    public var invalidL1Entries = 0
    public var invalidL2Entries = 0
    public var duplicateReferences = 0
    public var leakedClusters = 0
    /// Unreferenced clusters at the end of the file given back (repair only).
    public var releasedClusters = 0
    public var repaired = 0
    public var corruptions: Int { invalidL1Entries + invalidL2Entries + duplicateReferences }

    public var description: String {
        var lines = ["\(l2Tables) L2 tables, \(dataClusters) data clusters"]
        if invalidL1Entries > 0 { lines.append("\(invalidL1Entries) invalid L1 entries") }
        if invalidL2Entries > 0 { lines.append("\(invalidL2Entries) invalid L2 entries") }
        if duplicateReferences > 0 { lines.append("\(duplicateReferences) clusters referenced twice") }
        if leakedClusters > 0 { lines.append("\(leakedClusters) leaked clusters (harmless; QED never reuses space)") }
        if repaired > 0 { lines.append("\(repaired) entries repaired (dropped)") }
        if releasedClusters > 0 { lines.append("\(releasedClusters) unreferenced clusters at the end of the file released") }
        return lines.joined(separator: "; ")
    }
}

/// The QED consistency check (as QEMU's): every table inside the file and aligned, no
/// cluster referenced twice, no offset past the end. Repair drops the bad entries.
public enum QEDCheck {
    public static func run(file: ImageFile, header h: QEDHeader, repair: Bool) throws -> QEDCheckReport {
        var report = QEDCheckReport()
        let cs = UInt64(h.clusterSize)
        let fileSize = try file.size()
        let fileClusters = (fileSize + cs - 1) / cs
        // Clusters referenced so far (memory follows the references, not the file size); the
        // header area is a range, so a huge header_size costs nothing.
        var used = SparseBitmap(file: file.path)
        var usedInFile: UInt64 = 0
        var highest: UInt64 = 0  // last cluster anything references, + 1
        func mark(_ off: UInt64, _ bytes: UInt64) throws -> Bool { // false if any cluster was used already
            var fresh = true
            var c = off / cs
            while c < (off + bytes + cs - 1) / cs {
                if try used.insert(c) { if c < fileClusters { usedInFile += 1 } } else { fresh = false }
                highest = max(highest, c + 1)
                c += 1
            }
            return fresh
        }
        let headerEnd = max(h.headerBytes, cs)
        let headerClusters = min(headerEnd.alignedUp(cs) / cs, fileClusters)
        _ = try mark(h.l1TableOffset, h.tableBytes)

        let chunk = min(h.tableBytes, 64 << 10)
        let n = h.entriesPerTable
        // Walk a table chunk by chunk; `fix` returns a replacement for a bad entry.
        func walk(_ table: UInt64, _ body: (UInt64, UInt64) throws -> UInt64?) throws {
            var start: UInt64 = 0
            while start < n {
                let count = min(chunk / 8, n - start)
                // A stretch of table that is a hole in the host file holds only zero entries
                // (nothing to check): passed in one step, so work follows the tables' data, not
                // their size (a thousand 16 MiB tables that are holes).
                if let hole = file.hole(around: table + start * 8, length: count * 8) {
                    let skip = (min(hole.end, table + n * 8) - (table + start * 8)) / 8 / (chunk / 8) * (chunk / 8)
                    if skip > 0 { start += skip; continue }
                }
                var bytes = try file.readBytes(count: Int(count * 8), at: table + start * 8, what: "QED table")
                var changed = false
                for i in 0..<Int(count) {
                    let e = le64(bytes, i * 8)
                    if let replacement = try body(start + UInt64(i), e) {
                        put64(&bytes, i * 8, replacement)
                        changed = true
                    }
                }
                if changed && repair { try file.write(bytes, at: table + start * 8) }
                start += count
            }
        }
        let end = fileSize.alignedUp(cs)
        try walk(h.l1TableOffset) { _, l2 in
            guard l2 != 0 else { return nil }
            let (tableEnd, o) = l2.addingReportingOverflow(h.tableBytes)
            guard l2 % cs == 0, l2 >= h.headerBytes, !o, tableEnd <= end else {
                report.invalidL1Entries += 1
                if repair { report.repaired += 1 }
                return 0
            }
            guard try mark(l2, h.tableBytes) else {
                report.duplicateReferences += 1
                if repair { report.repaired += 1 }
                return 0
            }
            report.l2Tables += 1
            try walk(l2) { _, c in
                guard c > 1 else { return nil }
                guard c % cs == 0, c >= h.headerBytes, c < fileSize else {
                    report.invalidL2Entries += 1
                    if repair { report.repaired += 1 }
                    return 0
                }
                guard try mark(c, cs) else {
                    report.duplicateReferences += 1
                    if repair { report.repaired += 1 }
                    return 0
                }
                report.dataClusters += 1
                return nil
            }
            return nil
        }
        report.leakedClusters = Int(fileClusters - min(fileClusters, headerClusters + usedInFile))
        // A crash leaves clusters appended but never linked at the end of the file (QED only
        // appends): a repair cuts them off, as nothing can reach them.
        let keep = max(highest, headerClusters)
        if repair && keep < fileClusters {
            try file.truncate(to: keep * cs)
            report.releasedClusters = Int(fileClusters - keep)
            report.leakedClusters -= report.releasedClusters
        }
        return report
    }
}
