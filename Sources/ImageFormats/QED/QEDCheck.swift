import BlockEngine

/// What a QED consistency check found (and, with repair, fixed).
public struct QEDCheckReport: Sendable, CustomStringConvertible {
    public var l2Tables = 0
    public var dataClusters = 0
    public var invalidL1Entries = 0
    public var invalidL2Entries = 0
    public var duplicateReferences = 0
    public var leakedClusters = 0
    public var repaired = 0
    public var corruptions: Int { invalidL1Entries + invalidL2Entries + duplicateReferences }

    public var description: String {
        var lines = ["\(l2Tables) L2 tables, \(dataClusters) data clusters"]
        if invalidL1Entries > 0 { lines.append("\(invalidL1Entries) invalid L1 entries") }
        if invalidL2Entries > 0 { lines.append("\(invalidL2Entries) invalid L2 entries") }
        if duplicateReferences > 0 { lines.append("\(duplicateReferences) clusters referenced twice") }
        if leakedClusters > 0 { lines.append("\(leakedClusters) leaked clusters (harmless; QED never reuses space)") }
        if repaired > 0 { lines.append("\(repaired) entries repaired (dropped)") }
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
        var used = [UInt64](repeating: 0, count: Int((fileClusters + 63) / 64))
        func mark(_ off: UInt64, _ bytes: UInt64) -> Bool { // false if any cluster was used already
            var fresh = true
            var c = off / cs
            while c < (off + bytes + cs - 1) / cs {
                if c < fileClusters {
                    let (w, b) = (Int(c / 64), c % 64)
                    if used[w] & (1 << b) != 0 { fresh = false }
                    used[w] |= 1 << b
                }
                c += 1
            }
            return fresh
        }
        _ = mark(0, max(h.headerBytes, cs))
        _ = mark(h.l1TableOffset, h.tableBytes)

        let chunk = min(h.tableBytes, 64 << 10)
        let n = h.entriesPerTable
        // Walk a table chunk by chunk; `fix` returns a replacement for a bad entry.
        func walk(_ table: UInt64, _ body: (UInt64, UInt64) throws -> UInt64?) throws {
            var start: UInt64 = 0
            while start < n {
                let count = min(chunk / 8, n - start)
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
            guard mark(l2, h.tableBytes) else {
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
                guard mark(c, cs) else {
                    report.duplicateReferences += 1
                    if repair { report.repaired += 1 }
                    return 0
                }
                report.dataClusters += 1
                return nil
            }
            return nil
        }
        var leaked = 0
        for c in 0..<fileClusters where used[Int(c / 64)] & (1 << (c % 64)) == 0 { leaked += 1 }
        report.leakedClusters = leaked
        return report
    }
}
