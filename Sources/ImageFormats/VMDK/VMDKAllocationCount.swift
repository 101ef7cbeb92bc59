import BlockEngine

/// st_blocks and `info`'s allocation for VMDK (sparse, split, streamOptimized, COWD): each
/// grain table that exists is scanned once under one lock; runs of absent or never-written
/// tables pass in one step, as `map` passes them.
extension VMDKDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let e = extents[extentIndex(pos)]
            let end = min(to, e.start + e.length)
            switch e.kind {
            case let .sparse(s):
                guard let n = try s.countAllocated(from: pos - e.start, to: end - e.start, budget: &budget) else { return nil }
                total += n
            case .flat: total += end - pos
            case .zero: break
            }
            pos = end
        }
        return total
    }
}

extension VMDKSparseExtent {
    /// Data bytes of `[from, to)`, relative to the extent.
    func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        let cover = header.gtCoverage, grain = header.grainBytes
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let spanEnd = min(to, (pos / cover + 1) * cover)
            let gt = try grainTable(pos / cover)
            if gt == 0 || neverWritten(gt) {
                pos += max(1, try map(pos, maxLength: to - pos).length)  // the whole empty run
                continue
            }
            let tableStart = pos - pos % cover, zeroed = header.zeroedGrains
            total += try tables.withEntries(table: gt) { view in
                UnitCount.bytes(from: pos - tableStart, to: spanEnd - tableStart, unit: grain) {
                    view.count(in: $0) { g in g != 0 && !(g == 1 && zeroed) }
                }
            }
            pos = spanEnd
        }
        return total
    }
}
