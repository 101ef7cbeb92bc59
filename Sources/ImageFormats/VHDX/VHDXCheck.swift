import BlockEngine

/// What `rawmount check` finds in a VHDX, as `qemu-img check` looks at it (present blocks
/// past the end of the file or on the header section, table, metadata or log) plus blocks
/// that share host space; a log waiting to be replayed is reported (`--repair` replays it
/// by opening the image for writing, as `qemu-img check -r all` does).
public struct VHDXCheckReport: Sendable, CustomStringConvertible {
    public var blocks: UInt64 = 0
    public var problems = CheckProblems()
    /// Entries of a log that a writable open would replay.
    public var pendingLogEntries = 0
    public var corruptions: Int { problems.count }
    public init(pendingLogEntries: Int = 0) { self.pendingLogEntries = pendingLogEntries }

    public var description: String {
        var text = "\(blocks) blocks present" + problems.report
        if pendingLogEntries > 0 {
            text += "\n  a log of \(pendingLogEntries) \(pendingLogEntries == 1 ? "entry" : "entries") waits to be replayed (a crash while the image was written); --repair replays it"
        }
        return text
    }
}

public enum VHDXCheck {
    /// Log entries a writable open would replay (the image may not open read-only then).
    public static func pendingLog(_ file: ImageFile) throws -> Int {
        try VHDXLog.activeSequence(file, header: try VHDXHeader.read(from: file)).count
    }

    public static func run(_ d: VHDXDriver) throws -> VHDXCheckReport {
        var r = VHDXCheckReport()
        let m = d.metadata, h = d.header, size = try d.file.size()
        let group = m.chunkRatio + 1
        // Block offsets in MiB of the blocks that lie inside the file (no more memory than
        // the table itself; a bad entry is reported once, not again as an overlap).
        var starts: [UInt64] = []
        try FlatTable.forEachEntry(d.file, start: h.batOffset, count: m.tableEntries, encoding: .u64LE, what: "VHDX block allocation table") { i, e in
            guard i % group != m.chunkRatio, e & 7 == VHDXDriver.State.fullyPresent.rawValue else { return }
            r.blocks += 1
            let block = i - i / group, offset = (e >> 20) << 20
            let needed = block * m.blockSize < m.virtualSize ? min(m.blockSize, m.virtualSize - block * m.blockSize) : m.blockSize
            if offset < 1 << 20 {
                r.problems.add("block \(block) at \(offset) lies in the header section")
            } else if let o = d.structures.overlap(offset, m.blockSize) {
                r.problems.add("block \(block) at \(offset) lies on \(o.what) at \(o.start)")
            } else if offset > size || needed > size - offset {
                r.problems.add("block \(block) at \(offset) runs past the end of the \(size)-byte file")
            } else {
                starts.append(e >> 20)
            }
        }
        starts.sort()
        r.problems.overlapping(starts, unit: 1 << 20, span: m.blockSize)
        return r
    }
}
