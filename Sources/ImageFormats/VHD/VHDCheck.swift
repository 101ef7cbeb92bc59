import BlockEngine

/// What `rawmount check` finds in a VHD (qemu-img has no check for `vpc`): table entries
/// whose block lies on the image's own structures or on another block (corruptions), and
/// a footer that is not where the file ends, or bytes after it that no block owns (what a
/// crash between a block's data and its footer leaves; QEMU reads a dynamic image by the
/// footer's copy at the start, Windows by the one at the end). `--repair` puts the footer
/// back at the end and drops the unowned bytes; it changes no table entry.
public struct VHDCheckReport: Sendable, CustomStringConvertible {
    public var blocks: UInt64 = 0
    public var problems = CheckProblems()
    /// The footer at the end is missing or stale, or unowned bytes follow the last block.
    public var footerMisplaced = false
    /// Where the footer belongs: after every block and structure.
    public var imageEnd: UInt64 = 0
    public var corruptions: Int { problems.count }
    public var leaks: Int { footerMisplaced ? 1 : 0 }

    mutating func problem(_ text: String) { problems.add(text) }

    public var description: String {
        var text = "\(blocks) blocks allocated"
        text += problems.report
        if footerMisplaced { text += "\n  the file does not end with the footer at \(imageEnd) (a crash while a block was added?); --repair moves it there" }
        return text
    }
}

public enum VHDCheck {
    public static func run(_ d: VHDDriver) throws -> VHDCheckReport {
        var r = VHDCheckReport()
        let size = try d.file.size()
        guard let h = d.dynamic else {
            r.imageEnd = size - UInt64(VHDFooter.size)
            return r  // a fixed disk was found by its footer at the end: nothing else to check
        }
        r.imageEnd = d.frontier.withLock { $0.free }
        // Block starts (sector numbers, 4 bytes each: no more memory than the table itself).
        var starts: [UInt32] = []
        try FlatTable.forEachEntry(d.file, start: h.tableOffset, count: h.maxTableEntries, encoding: .u32BE, what: "VHD block allocation table") { i, e in
            guard e != VHDDriver.notPresent else { return }
            r.blocks += 1
            if let m = d.metadata.overlap(e * 512, h.bitmapBytes + h.blockSize) {
                r.problem("block \(i) at \(e * 512) lies on \(m.what) at \(m.start)")
            }
            starts.append(UInt32(e))
        }
        starts.sort()
        r.problems.overlapping(starts, unit: 512, span: h.bitmapBytes + h.blockSize)
        let tail = size >= r.imageEnd + UInt64(VHDFooter.size)
            ? try d.file.readBytes(count: VHDFooter.size, at: r.imageEnd, what: "VHD footer") : []
        r.footerMisplaced = size != r.imageEnd + UInt64(VHDFooter.size) || tail != d.footer.raw
        return r
    }

    /// Puts the footer at the end, after the last block, and cuts what follows (the driver
    /// open for writing).
    public static func repairFooter(_ d: VHDDriver) throws {
        guard d.isWritable, d.dynamic != nil else { return }
        let end = d.frontier.withLock { $0.free }
        try d.file.write(d.footer.raw, at: end)
        try d.file.truncate(to: end + UInt64(VHDFooter.size))
        try d.file.sync()
    }
}
