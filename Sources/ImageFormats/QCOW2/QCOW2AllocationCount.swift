import BlockEngine

/// st_blocks and `info`'s allocation for qcow2: each L2 slice that exists is scanned once
/// under one lock, instead of one table-cache lookup per cluster through `map`.
extension QCOW2Driver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        let cs = header.clusterSize
        let clustersPerSlice = l2SliceBytes / header.l2EntryBytes
        let sliceCover = clustersPerSlice * cs
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let l1Index = pos / header.l1Coverage
            guard l1Index < l1.entries else { break }  // past the L1: nothing allocated
            let l1End = min(to, (l1Index + 1) * header.l1Coverage)
            let table = try l2Table(l1Index)
            if table == 0 { pos = l1End; continue }
            while pos < l1End {
                guard budget.spend() else { return nil }
                let sliceEnd = min(l1End, pos - pos % sliceCover + sliceCover)
                let slice = table + ((pos / cs) % header.l2Entries / clustersPerSlice) * l2SliceBytes
                total += try l2.withEntries(table: slice) { countSlice($0, from: pos, to: sliceEnd) }
                pos = sliceEnd
            }
        }
        return total
    }

    /// Data bytes of `[from, to)`, which lies in the guest range of one L2 slice.
    private func countSlice(_ view: TableView, from: UInt64, to: UInt64) -> UInt64 {
        let cs = header.clusterSize
        let clustersPerSlice = l2SliceBytes / header.l2EntryBytes
        let words = header.l2EntryBytes / 8
        if !header.extendedL2 {
            let sliceStart = from - from % (clustersPerSlice * cs)
            return UnitCount.bytes(from: from - sliceStart, to: to - sliceStart, unit: cs) {
                view.count(in: $0) { e in e & Self.compressedFlag != 0 || e & Self.zeroFlag == 0 && e & Self.offsetMask != 0 }
            }
        }
        var n: UInt64 = 0, pos = from
        while pos < to {
            let start = pos - pos % cs, end = min(to, start + cs)
            let w = Int((pos / cs) % clustersPerSlice * words)
            let e = view[w]
            let host = e & Self.offsetMask
            if e & Self.compressedFlag != 0 {
                n += end - pos
            } else if host != 0 {
                // Subcluster sc holds data when its allocation bit is set and its zero bit is not.
                let bitmap = view[w + 1], sub = cs / 32
                var sc = (pos - start) / sub
                while start + sc * sub < end {
                    if bitmap >> sc & 1 != 0 && bitmap >> (32 + sc) & 1 == 0 {
                        n += min(end, start + (sc + 1) * sub) - max(pos, start + sc * sub)
                    }
                    sc += 1
                }
            }
            pos = end
        }
        return n
    }
}
