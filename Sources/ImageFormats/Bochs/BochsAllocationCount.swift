import BlockEngine

/// st_blocks and `info`'s allocation for Bochs growing redologs: set bits of each present
/// extent's bitmap, a 32-bit word at a time; runs of absent catalog entries pass in one step.
extension BochsDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        // The catalog is read 1 MiB at a time, uncached (an 8 TiB image's is 4 MiB: through
        // the cache that is a thousand reads); an undoable redolog's absent sectors are its
        // base image's, not counted either way.
        let ext = UInt64(header.extent), first = from / ext
        var total: UInt64 = 0, spent = false
        try FlatTable.forEachChunk(file, start: catalog.start + first * 4, count: (to + ext - 1) / ext - first,
                                   encoding: .u32LE, what: "Bochs catalog") { at, entries in
            guard budget.spend() else { spent = true; return false }
            for k in 0 ..< entries.count where entries[k] != UInt64(BochsHeader.unallocated) {
                guard budget.spend() else { spent = true; return false }
                let e = first + at + UInt64(k)
                total += try countExtent(e, slot: entries[k], from: max(from, e * ext), to: min(to, (e + 1) * ext))
            }
            return true
        }
        return spent ? nil : total
    }

    /// Data bytes of `[from, to)` inside extent `e`, which lies in `slot`.
    private func countExtent(_ e: UInt64, slot: UInt64, from pos: UInt64, to end: UInt64) throws -> UInt64 {
        let ext = UInt64(header.extent)
        let base = try slotBase(e, slot)
        let first = (pos % ext) / 512, last = (end - 1) % ext / 512
        let sectors = try bitmaps.withEntries(table: base) { words -> UInt64 in
            // Bits lo...hi of word w set.
            func bits(_ w: UInt64, _ lo: UInt64, _ hi: UInt64) -> Int {
                let word = UInt32(truncatingIfNeeded: words[Int(w)])
                let mask = (hi == 31 ? UInt32.max : (UInt32(1) << (hi + 1)) - 1) & ~((UInt32(1) << lo) - 1)
                return (word & mask).nonzeroBitCount
            }
            let fw = first / 32, lw = last / 32
            if fw == lw { return UInt64(bits(fw, first % 32, last % 32)) }
            let middle = words.sum(in: Int(fw) + 1 ..< Int(lw)) { $0.nonzeroBitCount }
            return UInt64(bits(fw, first % 32, 31) + middle + bits(lw, 0, last % 32))
        }
        // Partial first and last sectors count as map counts them (by the sector's bit).
        var total = sectors * 512
        if sectors > 0 {
            let headCut = pos % 512, tailCut = (512 - end % 512) % 512
            if headCut > 0, try isPresent(pos) { total -= headCut }
            if tailCut > 0, try isPresent(end - 1) { total -= tailCut }
        }
        return total
    }

    private func isPresent(_ offset: UInt64) throws -> Bool {
        if case .data = try map(offset, maxLength: 1) { return true }
        return false
    }
}

/// The same for Bochs sparse images: present pages, with runs of absent ones passed a cached
/// chunk of the page table at a time.
extension BochsSparseDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        let size = UInt64(header.pageSize), absent = UInt64(BochsSparseHeader.notAllocated)
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let page = pos / size
            let end = min(to, (page + 1) * size)
            if try pageTable.entry(page) == absent {
                let run = try pageTable.run(of: absent, from: page, limit: (to + size - 1) / size - page)
                pos = min(to, (page + max(run, 1)) * size)
                continue
            }
            total += end - pos
            pos = end
        }
        return total
    }
}
