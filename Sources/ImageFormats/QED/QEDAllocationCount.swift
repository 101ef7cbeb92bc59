import BlockEngine

/// st_blocks and `info`'s allocation for QED: each cached L2 chunk that exists is counted
/// under one lock (entries 0 and 1 are unallocated and zero; anything else is a cluster).
extension QEDDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        let chunkCover = UInt64(tables.entriesPerChunk) << clusterBits
        let entryMask = header.entriesPerTable - 1
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let spanEnd = min(to, ((pos >> l1Shift) + 1) << l1Shift)
            let l2 = try l2Table(for: pos)
            if l2 == 0 { pos = spanEnd; continue }
            while pos < spanEnd {
                guard budget.spend() else { return nil }
                let chunkStart = pos - pos % chunkCover, end = min(spanEnd, chunkStart + chunkCover)
                let s = tables.slot(l2, (pos >> clusterBits) & entryMask)
                total += try tables.cache.withEntries(table: s.chunk) { view in
                    UnitCount.bytes(from: pos - chunkStart, to: end - chunkStart, unit: 1 << clusterBits) {
                        view.count(in: $0) { $0 > 1 }
                    }
                }
                pos = end
            }
        }
        return total
    }
}
