import BlockEngine

/// What `rawmount check` finds in a VDI block map (as QEMU's check: bad and duplicate
/// indices, and blocks_allocated against the mapped count).
public struct VDICheckReport: Sendable, CustomStringConvertible {
    public var mappedBlocks = 0
    public var outOfRange = 0
    public var duplicates = 0
    public var headerBlocksAllocated: UInt32 = 0
    public var corruptions: Int { outOfRange + duplicates + (UInt32(mappedBlocks) != headerBlocksAllocated ? 1 : 0) }
    public var description: String {
        var parts = ["\(mappedBlocks) blocks mapped, header says \(headerBlocksAllocated)"]
        if outOfRange > 0 { parts.append("\(outOfRange) block indices out of range") }
        if duplicates > 0 { parts.append("\(duplicates) block indices used twice") }
        if UInt32(mappedBlocks) != headerBlocksAllocated { parts.append("blocks_allocated mismatch") }
        return parts.joined(separator: "; ")
    }
}

public enum VDICheck {
    public static func run(file: ImageFile) throws -> VDICheckReport {
        let h = try VDIHeader.read(from: file)
        var report = VDICheckReport(headerBlocksAllocated: h.blocksAllocated)
        var seen = [UInt64](repeating: 0, count: (Int(h.blocksInImage) + 63) / 64)
        try VDIRepair.forEachEntry(file, h) { _, e in
            if e >= VDIHeader.blockDiscarded { return }
            guard e < h.blocksInImage else { report.outOfRange += 1; return }
            let (w, b) = (Int(e / 64), UInt64(e % 64))
            if seen[w] & (1 << b) != 0 { report.duplicates += 1; return }
            seen[w] |= 1 << b
            report.mappedBlocks += 1
        }
        return report
    }
}
