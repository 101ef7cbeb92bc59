import BlockEngine

/// What a writable open found and fixed in a VDI's allocation (after a crash).
public struct VDIRepairReport: Sendable, CustomStringConvertible {
    public var headerCount: UInt32
    public var mappedCount: UInt32
    public var movedBlocks = 0
    public var releasedBytes: UInt64 = 0
    public var changed: Bool { headerCount != mappedCount || movedBlocks > 0 || releasedBytes > 0 }
    public var description: String {
        var parts = ["blocks_allocated \(headerCount) -> \(mappedCount)"]
        if movedBlocks > 0 { parts.append("\(movedBlocks) blocks moved down into orphaned slots") }
        if releasedBytes > 0 { parts.append("\(releasedBytes >> 20) MiB of orphaned blocks released") }
        return parts.joined(separator: ", ")
    }
}

/// Makes a dynamic VDI's allocation dense again on a writable open, as QEMU's allocation
/// rule needs: QEMU puts a new block at index blocks_allocated, so the mapped indices must
/// be exactly 0..<blocks_allocated. A crash can leave blocks written but never mapped
/// (orphans, in the middle or at the end) or a header count that disagrees with the map.
/// Mapped blocks above the count are moved down into orphaned slots (data copied and made
/// durable before the map entry moves), the count is set to what the map holds, and the
/// file is cut after the last block. Duplicate or out-of-range entries are corruption:
/// left alone for `check` to report.
public enum VDIRepair {
    public static func run(file: ImageFile, header h: VDIHeader) throws -> VDIRepairReport {
        var report = VDIRepairReport(headerCount: h.blocksAllocated, mappedCount: h.blocksAllocated)
        guard h.imageType == 1 else { return report }  // static images are dense by construction
        // Pass 1: which indices are mapped (a bitmap: blocks_in_image bits, at most 64 MiB).
        var used = [UInt64](repeating: 0, count: (Int(h.blocksInImage) + 63) / 64)
        var mapped: UInt32 = 0, highest: UInt64 = 0
        var corrupt = false
        try forEachEntry(file, h) { _, e in
            guard e < VDIHeader.blockDiscarded else { return }
            guard e < h.blocksInImage, used[Int(e / 64)] & (1 << UInt64(e % 64)) == 0 else { corrupt = true; return }
            used[Int(e / 64)] |= 1 << UInt64(e % 64)
            mapped += 1
            highest = max(highest, UInt64(e) + 1)
        }
        guard !corrupt else { return report }  // bad or duplicate entries: check's business
        report.mappedCount = mapped
        func blockAt(_ index: UInt64) -> UInt64 { UInt64(h.offsetData) + index * h.blockStride }
        func writeCount(_ count: UInt32) throws {
            var header = h
            header.blocksAllocated = count
            try file.write(Array(header.raw[0..<512]), at: 0)
            try file.sync()
        }
        // While blocks move, QEMU's next block must land above every one in use.
        if UInt64(h.blocksAllocated) < highest { try writeCount(UInt32(highest)) }
        // Pass 2: the guest blocks whose index lies at or above the mapped count move down
        // into the unused indices below it. A crash leaves at most what one write-back
        // window held; more than `maxMoves` is not a crash, and is left (count above every
        // block, so QEMU still allocates safely) for `check` to report.
        // Unused indices below the count: as many as mapped indices above it (the map holds
        // `mapped` distinct indices), collected only up to the bound.
        var holes: [UInt32] = []
        if highest > UInt64(mapped) {
            for i in 0..<mapped where used[Int(i / 64)] & (1 << UInt64(i % 64)) == 0 {
                holes.append(i)
                if holes.count > Self.maxMoves { break }
            }
        }
        guard holes.count <= Self.maxMoves else {
            report.mappedCount = UInt32(highest)
            return report
        }
        var movers: [(guest: UInt32, index: UInt32)] = []
        if !holes.isEmpty {
            try forEachEntry(file, h) { guest, e in
                if e < VDIHeader.blockDiscarded && e >= mapped { movers.append((guest, e)) }
            }
        }
        guard holes.count == movers.count else { return report }  // cannot happen with distinct indices
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(h.blockStride), alignment: 4096)
        defer { buffer.deallocate() }
        for (hole, mover) in zip(holes, movers.sorted { $0.index > $1.index }) {
            try file.read(into: buffer, at: blockAt(UInt64(mover.index)), what: "VDI block \(mover.index)")
            try file.write(UnsafeRawBufferPointer(buffer), at: blockAt(UInt64(hole)))
            try file.sync()
            var entry = [UInt8](repeating: 0, count: 4)
            put32(&entry, 0, hole)
            try file.write(entry, at: UInt64(h.offsetBmap) + UInt64(mover.guest) * 4)
            try file.sync()
            report.movedBlocks += 1
        }
        if h.blocksAllocated != mapped { try writeCount(mapped) }
        let end = blockAt(UInt64(mapped))
        let size = try file.size()
        if size > end {
            try file.truncate(to: end)
            try file.sync()
            report.releasedBytes = size - end
        }
        return report
    }

    /// Most blocks one open moves (1 MiB each).
    static let maxMoves = 4096

    /// Calls `body(guest block, entry)` for every block-map entry, reading 1 MiB at a time
    /// (the map can be 2 GiB); `check` and the repair both walk the map through this.
    static func forEachEntry(_ file: ImageFile, _ h: VDIHeader, _ body: (UInt32, UInt32) throws -> Void) throws {
        try FlatTable.forEachEntry(file, start: UInt64(h.offsetBmap), count: UInt64(h.blocksInImage), encoding: .u32LE,
                                   what: "VDI block map") { i, e in try body(UInt32(i), UInt32(e)) }
    }
}
