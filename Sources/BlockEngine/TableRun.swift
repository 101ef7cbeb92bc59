/// Where a scan of table entries left its run (`TableCache.mapRun`).
public struct RunScan: Sendable {
    /// Guest offset the run now reaches.
    public var position: UInt64
    /// The run ended before `end`: at an entry that does not continue it (or fails to map),
    /// or after the most pieces one call may take.
    public var ended: Bool
}

extension TableCache {
    /// Every format's map loop. From guest offset `start` toward `end`, each table entry covers
    /// the guest bytes up to the next multiple of `unit`; `locate(pos)` names the cached table
    /// and entry word for `pos` (`stride` words per entry: 2 for qcow2 extended L2).
    /// `piece(view, word, pos, maxLength)` maps from `pos` at most to that entry's end; a
    /// shorter answer (a run of subclusters) asks the same entry again for the rest. Pieces
    /// merge into `run` while they form one run (`Mapping.merged`), with one lookup per
    /// table and the pieces mapped on its snapshot, outside the cache's lock. The walk stops at `end`, after `maxPieces`, or at a piece that does not merge
    /// or fails to map; that piece is left for the next call, which reports its error. Only
    /// a failure of the run's first piece is thrown.
    public func mapRun(into run: inout Mapping?, from start: UInt64, to end: UInt64, unit: UInt64, stride: Int = 1,
                       maxPieces: Int = .max, locate: (UInt64) throws -> (table: UInt64, word: Int),
                       _ piece: (_ view: TableView, _ word: Int, _ pos: UInt64, _ maxLength: UInt64) throws -> Mapping) throws -> RunScan {
        var pos = start, pieces = 0
        while pos < end {
            guard pieces < maxPieces else { return RunScan(position: pos, ended: true) }
            let (table, first) = try locate(pos)
            // Pieces are mapped outside the cache's lock, on a snapshot of the table.
            let view = try self.view(table: table)
            let stopped = try { () throws -> Bool in
                var word = first
                while word < view.count && pos < end && pieces < maxPieces {
                    let unitEnd = min(end, pos - pos % unit + unit)
                    let next: Mapping
                    if run == nil {
                        next = try piece(view, word, pos, unitEnd - pos)
                    } else {
                        guard let m = try? piece(view, word, pos, unitEnd - pos) else { return true }
                        next = m
                    }
                    // (A piece is never empty and never runs past its entry: a driver bug
                    // otherwise, which ends the run rather than loop or skip bytes.)
                    guard next.length > 0, next.length <= unitEnd - pos else { return true }
                    if let current = run {
                        guard let merged = current.merged(with: next) else { return true }
                        run = merged
                    } else {
                        run = next
                    }
                    pos += next.length
                    pieces += 1
                    if pos == unitEnd { word += stride }
                }
                return word == first && pos < end && pieces < maxPieces  // (no progress: a bad locate)
            }()
            if stopped { return RunScan(position: pos, ended: true) }
        }
        return RunScan(position: pos, ended: false)
    }

    /// `mapRun` from `start`, as one mapping (at least the first piece).
    public func mapRun(from start: UInt64, to end: UInt64, unit: UInt64, stride: Int = 1, maxPieces: Int = .max,
                       locate: (UInt64) throws -> (table: UInt64, word: Int),
                       _ piece: (_ view: TableView, _ word: Int, _ pos: UInt64, _ maxLength: UInt64) throws -> Mapping) throws -> Mapping {
        var run: Mapping? = nil
        _ = try mapRun(into: &run, from: start, to: end, unit: unit, stride: stride, maxPieces: maxPieces, locate: locate, piece)
        return run ?? .unallocated(length: end - start)
    }
}

extension FlatTable {
    /// `TableCache.mapRun` over a flat array whose entry k covers guest bytes
    /// `[k*unit, (k+1)*unit)` (the Bochs page table), a cached chunk at a time;
    /// `piece(entry, index, pos, maxLength)`. With `skip`, unit k's entry is k + skip: VHDX
    /// puts a sector-bitmap entry after every group of payload entries, so it maps one group
    /// per call, skipping the bitmap entries before that group.
    public func mapRun(from start: UInt64, to end: UInt64, unit: UInt64, maxPieces: Int, skip: UInt64 = 0,
                       _ piece: (_ entry: UInt64, _ index: UInt64, _ pos: UInt64, _ maxLength: UInt64) throws -> Mapping) throws -> Mapping {
        let width = UInt64(cache.encoding.width)
        let last = min(end, entries > skip ? (entries - skip) * unit : 0)  // (entries past the array are never asked for)
        guard start < last else { return .unallocated(length: end - start) }
        return try cache.mapRun(from: start, to: last, unit: unit, maxPieces: maxPieces, locate: { pos in
            let i = pos / unit + skip
            return (self.start + i / perChunk * perChunk * width, Int(i % perChunk))
        }) { view, word, pos, n in
            try piece(view[word], pos / unit, pos, n)
        }
    }
}

/// The two-level link a write makes (QED L1 and L2, VMDK grain directory and grain table):
/// entries of the child table first, then, for a child table created for them, the parent
/// entry naming it. Changed in this order, the table cache writes the child back before the
/// parent entry that makes it reachable.
public enum TwoLevelLink {
    /// Sets `count` entries from `first` of `child` to `value(k)`, then links a new child.
    public static func link(child: UInt64, isNew: Bool, first: UInt64, count: UInt64, _ value: (UInt64) -> UInt64,
                            setEntry: (_ table: UInt64, _ index: UInt64, _ value: UInt64) throws -> Void,
                            linkParent: (_ child: UInt64) throws -> Void) throws {
        for k in 0 ..< count { try setEntry(child, first + k, value(k)) }
        if isNew { try linkParent(child) }
    }
}
