import BlockEngine

/// What `rawmount check` finds in a VMDK's sparse extents, as `qemu-img check` looks at them
/// (grains that start past the end of their file) plus what QEMU does not check: grain
/// tables past the end, and redundant grain tables that differ from the primary ones.
public struct VMDKCheckReport: Sendable, CustomStringConvertible {
    public var sparseExtents = 0
    public var grainTables = 0
    public var grains = 0
    public var problems = CheckProblems()
    public var corruptions: Int { problems.count }

    mutating func problem(_ text: String) { problems.add(text) }

    public var description: String {
        var text = "\(sparseExtents) sparse extents, \(grainTables) grain tables, \(grains) grains allocated"
        text += problems.report
        return text
    }
}

public enum VMDKCheck {
    /// Checks every sparse extent of `driver` (flat and zero extents have nothing to check).
    public static func run(_ driver: VMDKDriver) throws -> VMDKCheckReport {
        var report = VMDKCheckReport()
        for e in driver.extents {
            guard case let .sparse(s) = e.kind else { continue }
            report.sparseExtents += 1
            try check(s, into: &report)
        }
        return report
    }

    static func check(_ s: VMDKSparseExtent, into report: inout VMDKCheckReport) throws {
        let h = s.header, file = s.file, size = try file.size()
        let entries = Int(h.gdEntries)
        func directory(_ sector: UInt64) throws -> [UInt8] {
            try file.readBytes(count: entries * 4, at: sector * 512, what: "grain directory")
        }
        let gd = try directory(h.gdOffset)
        let rgd = h.hasRedundantGD ? try directory(h.rgdOffset) : nil
        for i in 0..<entries {
            let gt = UInt64(le32(gd, i * 4))
            let rgt = rgd.map { UInt64(le32($0, i * 4)) }
            if let rgt, (gt == 0) != (rgt == 0) {
                report.problem("\(file.path): grain directory entry \(i) is \(gt) but its redundant copy is \(rgt)")
            }
            guard gt != 0 else { continue }
            guard gt * 512 + UInt64(h.gtBytes) <= size else {
                report.problem("\(file.path): grain table \(i) at sector \(gt) runs past the end of the \(size)-byte file")
                continue
            }
            report.grainTables += 1
            let table = try file.readBytes(count: h.gtBytes, at: gt * 512, what: "grain table")
            if let rgt, rgt != 0, rgt * 512 + UInt64(h.gtBytes) <= size,
               try file.readBytes(count: h.gtBytes, at: rgt * 512, what: "redundant grain table") != table {
                report.problem("\(file.path): grain table \(i) and its redundant copy differ")
            }
            for k in 0..<Int(h.numGTEsPerGT) {
                let grain = UInt64(le32(table, k * 4))
                if grain == 0 || (grain == 1 && h.zeroedGrains) { continue }
                report.grains += 1
                let guest = (UInt64(i) * UInt64(h.numGTEsPerGT) + UInt64(k)) * h.grainBytes
                if grain * 512 >= size {
                    report.problem("\(file.path): the grain for guest offset \(guest) starts at sector \(grain), past the end of the file")
                } else if let m = s.metadata.overlap(grain * 512, h.isCompressed ? 512 : h.grainBytes) {
                    report.problem("\(file.path): the grain for guest offset \(guest) at sector \(grain) lies in \(m.what) (at sector \(m.start / 512))")
                }
            }
        }
    }
}
