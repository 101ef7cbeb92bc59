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
enum VDIRepair {
    static func run(file: ImageFile, header h: VDIHeader) throws -> VDIRepairReport {
        var report = VDIRepairReport(headerCount: h.blocksAllocated, mappedCount: h.blocksAllocated)
        guard h.imageType == 1 else { return report }  // static images are dense by construction
        // guest block of each mapped index (memory follows the mapped blocks)
        var owner: [UInt32: UInt32] = [:]
        let perChunk = 1 << 18
        var first = 0
        while first < Int(h.blocksInImage) {
            let n = min(perChunk, Int(h.blocksInImage) - first)
            let map = try file.readBytes(count: n * 4, at: UInt64(h.offsetBmap) + UInt64(first) * 4, what: "VDI block map")
            for i in 0..<n {
                let e = le32(map, i * 4)
                guard e < VDIHeader.blockDiscarded else { continue }
                guard e < h.blocksInImage, owner[e] == nil else { return report }  // corrupt: check's business
                owner[e] = UInt32(first + i)
            }
            first += n
        }
        let mapped = UInt32(owner.count)
        report.mappedCount = mapped
        let highest = owner.keys.max().map { UInt64($0) + 1 } ?? 0
        func blockAt(_ index: UInt64) -> UInt64 { UInt64(h.offsetData) + index * h.blockStride }
        func writeCount(_ count: UInt32) throws {
            var header = h
            header.blocksAllocated = count
            try file.write(Array(header.raw[0..<512]), at: 0)
            try file.sync()
        }
        // While blocks move, QEMU's next block must land above every one in use.
        if UInt64(h.blocksAllocated) < highest { try writeCount(UInt32(highest)) }
        let holes = (0..<mapped).filter { owner[$0] == nil }
        let movers = owner.keys.filter { $0 >= mapped }.sorted(by: >)
        precondition(holes.count == movers.count)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(h.blockStride), alignment: 4096)
        defer { buffer.deallocate() }
        for (hole, mover) in zip(holes, movers) {
            try file.read(into: buffer, at: blockAt(UInt64(mover)), what: "VDI block \(mover)")
            try file.write(UnsafeRawBufferPointer(buffer), at: blockAt(UInt64(hole)))
            try file.sync()
            let guest = owner[mover]!
            try file.write(Self.le(UInt64(hole), 4), at: UInt64(h.offsetBmap) + UInt64(guest) * 4)
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

    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
}
