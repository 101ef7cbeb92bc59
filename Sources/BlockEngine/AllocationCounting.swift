/// A driver that can count its allocated guest bytes straight from its tables: one pass over
/// each table that exists, instead of one `status` call per extent (a disk of 16384
/// scattered clusters is 32768 status calls, each taking the table cache's lock per entry).
/// st_blocks, `info` and partition counts use it when the driver has it.
public protocol AllocationCounting: ImageDriver {
    /// Guest bytes in `[from, to)` that hold this image's own data: exactly the bytes
    /// `status` reports as `.data`, `.shared` or `.compressed`. nil once `budget` is spent.
    /// Entries are counted, not validated: a damaged entry is reported when it is read.
    func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64?
}

extension ImageDriver {
    /// Guest bytes of `[from, to)` in runs of like `status` mappings that are data (`.data`,
    /// `.shared`, `.compressed`): the count for drivers without a table count, and for the
    /// parts a table count does not cover. nil once `budget` is spent.
    public func countByStatus(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        var pos = from, total: UInt64 = 0
        while pos < to {
            guard budget.spend() else { return nil }
            let m = try status(pos, maxLength: to - pos)
            let n = min(max(m.length, 1), to - pos)
            switch m {
            case .data, .shared, .compressed: total += n
            case .zero, .unallocated: break
            }
            pos += n
        }
        return total
    }
}

/// Counting bytes over units (clusters, grains) that are each wholly data or not.
public enum UnitCount {
    /// Data bytes of `[from, to)` (offsets relative to unit 0), where `dataUnits(range)` says
    /// how many units of the index range hold data: partial first and last units count by
    /// their overlap, the whole ones in between in one call.
    @inlinable public static func bytes(from: UInt64, to: UInt64, unit: UInt64, _ dataUnits: (Range<Int>) -> Int) -> UInt64 {
        guard from < to else { return 0 }
        var total: UInt64 = 0
        var first = from / unit
        if from % unit != 0 {
            let end = min(to, (first + 1) * unit)
            if dataUnits(Int(first) ..< Int(first) + 1) > 0 { total += end - from }
            first += 1
            if end == to { return total }
        }
        let last = to / unit  // units [first, last) lie wholly inside
        if first < last { total += UInt64(dataUnits(Int(first) ..< Int(last))) * unit }
        if to % unit != 0, last >= first, dataUnits(Int(last) ..< Int(last) + 1) > 0 { total += to - last * unit }
        return total
    }
}
