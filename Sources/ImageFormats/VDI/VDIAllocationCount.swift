import BlockEngine

/// st_blocks and `info`'s allocation for a read-only VDI: the block map read 1 MiB at a time
/// past the cache (an 8 TiB image's is 32 MiB, 8 Mi entries, counted in a few milliseconds,
/// so the mount's first count does not compete with the first SEEK walk for seconds).
/// A writable image may hold map entries newer than the file in the cache: it is counted
/// through `status`.
extension VDIDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        guard !isWritable else { return try countByStatus(from: from, to: to, budget: &budget) }
        let limit = UInt64(header.blocksInImage), first = from / blockSize
        var total: UInt64 = 0, spent = false
        try FlatTable.forEachChunk(file, start: UInt64(header.offsetBmap) + first * 4, count: (to + blockSize - 1) / blockSize - first,
                                   encoding: .u32LE, what: "VDI block map") { at, view in
            guard budget.spend() else { spent = true; return false }
            let base = (first + at) * blockSize
            // Entries at or past blocks_in_image are free, discarded or invalid (map reports those).
            total += UnitCount.bytes(from: max(from, base) - base, to: min(to, base + UInt64(view.count) * blockSize) - base, unit: blockSize) {
                view.count(in: $0) { $0 < limit }
            }
            return true
        }
        return spent ? nil : total
    }
}
