import Synchronization

/// Which granules of a disk changed: one bit per granule (bit `k` for guest bytes
/// `[k*granularity, (k+1)*granularity)`), kept in pages of 32768 bits that exist only where
/// a bit is set, so memory follows what is dirty and never exceeds the full bit array; a page
/// whose bits are all set is one shared array, so an all-ones bitmap (a hostile image's, or a
/// disk rewritten whole) costs a dictionary entry per page, not 4 KiB.
/// Words are little-endian bit order (bit `k` is bit `k % 64` of word `k / 64`), which
/// serializes to the LSB-first byte stream qcow2 stores.
public final class DirtyBitmap: Sendable {
    public let granularity: UInt64
    public let diskSize: UInt64
    /// Granules covering the disk (the last may be partial).
    public let granules: UInt64
    static let pageWords = 512
    static let pageBits = UInt64(pageWords * 64)
    private let pages = Mutex<[UInt64: [UInt64]]>([:])
    /// The one array every full page shares (copied on write when a bit is cleared).
    static let fullPage = [UInt64](repeating: ~0, count: pageWords)

    /// A page that just had bits set: shared if it is now full.
    private static func share(_ pages: inout [UInt64: [UInt64]], _ p: UInt64) {
        guard let w = pages[p], w[0] == ~0, w[pageWords - 1] == ~0, w.allSatisfy({ $0 == ~0 }) else { return }
        pages[p] = fullPage
    }

    /// Pages that hold their own array (not the shared full page): what the bitmap costs.
    var ownPages: Int {
        Self.fullPage.withUnsafeBufferPointer { full in
            pages.withLock { $0.values.filter { $0.withUnsafeBufferPointer { $0.baseAddress } != full.baseAddress }.count }
        }
    }

    public init(granularity: UInt64, diskSize: UInt64) {
        precondition(granularity > 0 && granularity & (granularity - 1) == 0)
        self.granularity = granularity
        self.diskSize = diskSize
        granules = (diskSize + granularity - 1) / granularity
    }

    /// Marks every granule that `[offset, offset+length)` touches (clipped to the disk).
    public func mark(_ offset: UInt64, length: UInt64) {
        guard length > 0, offset < diskSize else { return }
        let end = min(offset + length, diskSize)
        setGranules(offset / granularity, (end + granularity - 1) / granularity, to: true)
    }

    /// Sets or clears granules `[first, end)`.
    public func setGranules(_ first: UInt64, _ end: UInt64, to value: Bool) {
        let end = min(end, granules)
        guard first < end else { return }
        pages.withLock { pages in
            var g = first
            while g < end {
                let p = g / Self.pageBits
                let pageEnd = min(end, (p + 1) * Self.pageBits)
                let (lo, hi) = (g - p * Self.pageBits, pageEnd - p * Self.pageBits)
                if value {
                    // In place: the page is not copied out of the dictionary.
                    if lo == 0 && hi == Self.pageBits { pages[p] = Self.fullPage; g = pageEnd; continue }
                    Self.set(&pages[p, default: [UInt64](repeating: 0, count: Self.pageWords)], lo, hi, true)
                    Self.share(&pages, p)
                } else if pages[p] != nil {
                    Self.set(&pages[p]!, lo, hi, false)
                    if pages[p]!.allSatisfy({ $0 == 0 }) { pages[p] = nil }
                }
                g = pageEnd
            }
        }
    }

    private static func set(_ words: inout [UInt64], _ from: UInt64, _ to: UInt64, _ value: Bool) {
        var bit = from
        while bit < to {
            let w = Int(bit / 64), b = bit % 64
            let n = min(64 - b, to - bit)
            let mask: UInt64 = n == 64 ? ~0 : ((1 << n) - 1) << b
            if value { words[w] |= mask } else { words[w] &= ~mask }
            bit += n
        }
    }

    public func clearAll() { pages.withLock { $0 = [:] } }

    /// Dirty granules times the granularity, clipped to the disk's end.
    public var dirtyBytes: UInt64 {
        let (count, last) = pages.withLock { pages -> (UInt64, Bool) in
            let n = pages.values.reduce(UInt64(0)) { $0 + $1.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }
            return (n, granules > 0 && Self.bit(pages, granules - 1))
        }
        guard count > 0 else { return 0 }
        let tail = granules * granularity - diskSize  // the partial last granule's missing bytes
        return count * granularity - (last ? tail : 0)
    }

    private static func bit(_ pages: [UInt64: [UInt64]], _ g: UInt64) -> Bool {
        guard let words = pages[g / pageBits] else { return false }
        let i = g % pageBits
        return words[Int(i / 64)] >> (i % 64) & 1 != 0
    }

    /// From guest byte `offset`: whether it is dirty and how many bytes (at most `maxLength`,
    /// never past the disk) share that state. Clean pages are skipped whole, words at a time.
    public func run(from offset: UInt64, maxLength: UInt64) -> (dirty: Bool, length: UInt64) {
        let limit = min(diskSize, offset + maxLength)
        guard offset < limit else { return (false, 0) }
        let first = offset / granularity
        let endGranule = (limit + granularity - 1) / granularity
        let (dirty, stop) = pages.withLock { pages -> (Bool, UInt64) in
            let state = Self.bit(pages, first)
            var g = first + 1
            while g < endGranule {
                let p = g / Self.pageBits
                guard let words = pages[p] else {
                    if state { return (state, g) }
                    g = (p + 1) * Self.pageBits
                    continue
                }
                let i = g % Self.pageBits
                let w = words[Int(i / 64)] >> (i % 64)
                let same = state ? (~w).trailingZeroBitCount : w.trailingZeroBitCount  // like bits from g
                let inWord = 64 - i % 64
                if UInt64(same) < inWord { return (state, g + UInt64(same)) }
                g += inWord
            }
            return (state, endGranule)
        }
        return (dirty, min(limit, stop * granularity) - offset)
    }

    /// `count` bits (a multiple of 64) from granule `start` (a multiple of 64), as words;
    /// nil when none is set.
    public func words(from start: UInt64, count: UInt64) -> [UInt64]? {
        pages.withLock { pages in
            var out: [UInt64]? = nil
            var g = start
            while g < start + count {
                let p = g / Self.pageBits
                let n = min(start + count, (p + 1) * Self.pageBits) - g
                if let words = pages[p] {
                    let i = Int((g % Self.pageBits) / 64)
                    let slice = words[i ..< i + Int(n / 64)]
                    if slice.contains(where: { $0 != 0 }) {
                        if out == nil { out = [UInt64](repeating: 0, count: Int(count / 64)) }
                        let at = Int((g - start) / 64)
                        out!.replaceSubrange(at ..< at + slice.count, with: slice)
                    }
                }
                g += n
            }
            return out
        }
    }

    /// ORs `words` in from granule `start` (a multiple of 64); bits past the disk are dropped.
    public func merge(words: [UInt64], from start: UInt64) {
        precondition(start % 64 == 0)
        pages.withLock { pages in
            for (k, w) in words.enumerated() where w != 0 {
                let g = start + UInt64(k) * 64
                guard g < granules else { break }
                let keep: UInt64 = granules - g >= 64 ? ~0 : (1 << (granules - g)) - 1
                let p = g / Self.pageBits
                if pages[p] == nil { pages[p] = [UInt64](repeating: 0, count: Self.pageWords) }
                pages[p]![Int((g % Self.pageBits) / 64)] |= w & keep
                if (g / 64 + 1) % UInt64(Self.pageWords) == 0 || k + 1 == words.count { Self.share(&pages, p) }
            }
        }
    }

    /// The dirty byte ranges in order, merged, as `(offset, length)`.
    public func forEachDirtyExtent(_ body: (UInt64, UInt64) throws -> Void) rethrows {
        var pos: UInt64 = 0
        while pos < diskSize {
            let r = run(from: pos, maxLength: diskSize - pos)
            if r.dirty { try body(pos, r.length) }
            pos += max(r.length, 1)
        }
    }

    /// ORs every dirty granule of `other` into this bitmap (granularities may differ: the
    /// union is rounded out to this bitmap's granules).
    public func merge(_ other: DirtyBitmap) {
        other.forEachDirtyExtent { mark($0, length: $1) }
    }
}
