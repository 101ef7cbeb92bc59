#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Where an image keeps its own metadata in its file (header, descriptor, L1 / grain
/// directory, every L2 / grain table), so that no data mapping may point into it: a hostile
/// table entry naming the embedded descriptor or an L2 table would otherwise let a guest
/// write rewrite the image's own structure. Drivers build it at open from the tables they
/// already validate, add tables they allocate, and ask `overlap` for every data run.
public final class MetadataRanges: Sendable {
    public struct Range: Sendable {
        public var start: UInt64
        public var end: UInt64
        public var what: StaticString
        public init(start: UInt64, length: UInt64, what: StaticString) {
            self.start = start
            self.end = start &+ length < start ? UInt64.max : start + length
            self.what = what
        }
    }

    /// Bound on tables recorded (memory stays under ~50 MiB); images with more are refused.
    public static let maxRanges = 1 << 21

    /// Sorted by start; ranges may overlap (aliased or damaged tables), so `maxEnd[i]` is the
    /// largest end among the first i+1 ranges, which keeps the search logarithmic.
    private let state: Mutex<(ranges: [Range], maxEnd: [UInt64])>
    /// A set that never changes after open (VHD, VHDX: their structures stay where they are)
    /// is searched without the lock, which every data mapping would otherwise take.
    private let fixed: (ranges: [Range], maxEnd: [UInt64])?

    /// Drivers call this as they collect ranges, so the list never grows past the bound.
    public static func checkCount(_ n: Int, file: String) throws {
        guard n <= maxRanges else {
            throw BlockError.invalid(file: file, field: "metadata tables", detail: "more than \(maxRanges) tables")
        }
    }

    /// `fixed`: the set never changes (`insert` and `remove` must not be called on it).
    public init(_ ranges: [Range], file: String, fixed isFixed: Bool = false) throws {
        try Self.checkCount(ranges.count, file: file)
        var sorted = ranges.filter { $0.end > $0.start }.sorted { ($0.start, $0.end) < ($1.start, $1.end) }
        // Aliased tables (many entries naming one) are recorded once.
        var unique: [Range] = []
        unique.reserveCapacity(sorted.count)
        for r in sorted where unique.last.map({ $0.start != r.start || $0.end != r.end }) ?? true { unique.append(r) }
        sorted = unique
        state = Mutex((sorted, Self.prefixMax(sorted)))
        fixed = isFixed ? (sorted, Self.prefixMax(sorted)) : nil
    }

    private static func prefixMax(_ ranges: [Range]) -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(ranges.count)
        var m: UInt64 = 0
        for r in ranges { m = max(m, r.end); out.append(m) }
        return out
    }

    /// Records a table allocated while the image is open.
    public func insert(_ r: Range) {
        precondition(fixed == nil, "a fixed set of metadata ranges does not change")
        state.withLock { s in
            let i = s.ranges.partitionIndex { ($0.start, $0.end) >= (r.start, r.end) }
            if i == s.ranges.count {
                // New tables go at the end of the file: the common case appends.
                s.ranges.append(r)
                s.maxEnd.append(max(s.maxEnd.last ?? 0, r.end))
            } else {
                s.ranges.insert(r, at: i)
                s.maxEnd = Self.prefixMax(s.ranges)
            }
        }
    }

    /// Records many tables at once (one sort, not one shifted insert each: a writable qcow2
    /// open adds up to a million refcount blocks and 65536 snapshot L1 tables).
    public func insert(contentsOf more: [Range], file: String) throws {
        guard !more.isEmpty else { return }
        precondition(fixed == nil, "a fixed set of metadata ranges does not change")
        try state.withLock { s in
            try Self.checkCount(s.ranges.count + more.count, file: file)
            s.ranges = (s.ranges + more.filter { $0.end > $0.start }).sorted { ($0.start, $0.end) < ($1.start, $1.end) }
            s.maxEnd = Self.prefixMax(s.ranges)
        }
    }

    /// Forgets the table recorded at `start` (freed by a writer that reuses space: qcow2).
    public func remove(start: UInt64) {
        precondition(fixed == nil, "a fixed set of metadata ranges does not change")
        state.withLock { s in
            let i = s.ranges.partitionIndex { $0.start >= start }
            guard i < s.ranges.count, s.ranges[i].start == start else { return }
            s.ranges.remove(at: i)
            s.maxEnd = Self.prefixMax(s.ranges)
        }
    }

    /// A metadata range that `[start, start+length)` overlaps, if any; `except`: ranges of
    /// that kind do not count (an L2 table may alias another L2 table, not the L1).
    public func overlap(_ start: UInt64, _ length: UInt64, except: StaticString? = nil) -> Range? {
        let end = start &+ length < start ? UInt64.max : start + length
        if let f = fixed { return Self.find(f.ranges, f.maxEnd, start, end, except) }
        return state.withLock { s in Self.find(s.ranges, s.maxEnd, start, end, except) }
    }

    /// The last range starting before `end`; walk back while some earlier one may still reach `start`.
    private static func find(_ ranges: [Range], _ maxEnd: [UInt64], _ start: UInt64, _ end: UInt64, _ except: StaticString?) -> Range? {
        var i = ranges.partitionIndex { $0.start >= end } - 1
        while i >= 0 && maxEnd[i] > start {
            if ranges[i].end > start && !(except.map { same($0, ranges[i].what) } ?? false) { return ranges[i] }
            i -= 1
        }
        return nil
    }

    private static func same(_ a: StaticString, _ b: StaticString) -> Bool {
        a.utf8CodeUnitCount == b.utf8CodeUnitCount && memcmp(a.utf8Start, b.utf8Start, a.utf8CodeUnitCount) == 0
    }

    public var count: Int { state.withLock { $0.ranges.count } }

    /// Throws `.metadataOverlap` if `[start, start+length)`, about to be written as `what`,
    /// overlaps recorded metadata (a refcount or a table entry lied about free space).
    public func guardWrite(_ start: UInt64, _ length: UInt64, as what: String, file: String) throws {
        if let m = overlap(start, length) {
            throw BlockError.metadataOverlap(file: file, detail: "\(what) at \(start) (\(length) bytes) would overwrite \(m.what) at \(m.start)")
        }
    }
}

extension Array {
    /// The first index whose element satisfies `belongs` (which must be false then true
    /// along the array); `count` if none does.
    public func partitionIndex(_ belongs: (Element) -> Bool) -> Int {
        var lo = 0, hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if belongs(self[mid]) { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}
