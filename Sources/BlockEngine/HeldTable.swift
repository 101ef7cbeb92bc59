import Synchronization

/// A table of big-endian 64-bit entries held whole in memory (qcow2's L1 and refcount
/// table): lookups need no I/O, a change marks its entry, and as a write-back layer it
/// writes the 512-byte pieces holding changed entries. It can move: a grown table is
/// written in full elsewhere, made durable, named by the header, then `move`d to.
public final class HeldTable: MetadataLayer {
    public static let pieceBytes = 512
    private static let perPiece = pieceBytes / 8

    private let file: ImageFile
    private let state: Mutex<(entries: [UInt64], dirty: Set<Int>)>
    /// Where the table is and how many entries it has, for lock-free readers of either.
    private let place: Atomic<UInt64>
    private let size: Atomic<Int>

    public init(file: ImageFile, offset: UInt64, entries: [UInt64]) {
        self.file = file
        state = Mutex((entries, []))
        place = Atomic(offset)
        size = Atomic(entries.count)
    }

    public var offset: UInt64 { place.load(ordering: .acquiring) }
    public var count: Int { size.load(ordering: .acquiring) }

    /// Entry `i` (the caller keeps `i` below `count`).
    public func entry(_ i: Int) -> UInt64 { state.withLock { $0.entries[i] } }

    /// Every entry, as it is now.
    public var all: [UInt64] { state.withLock { $0.entries } }

    public func set(_ i: Int, _ value: UInt64) {
        state.withLock { s in
            s.entries[i] = value
            s.dirty.insert(i)
        }
    }

    /// The table now lives at `offset` with `entries`, already durable there in full.
    public func move(to offset: UInt64, entries: [UInt64]) {
        state.withLock { s in
            s.entries = entries
            moved(&s, to: offset)
        }
    }

    /// The table now lives at `offset` with its entries and then empty ones up to `count`,
    /// already durable there in full.
    public func move(to offset: UInt64, paddedTo count: Int) {
        state.withLock { s in
            s.entries += [UInt64](repeating: 0, count: max(0, count - s.entries.count))
            moved(&s, to: offset)
        }
    }

    private func moved(_ s: inout (entries: [UInt64], dirty: Set<Int>), to offset: UInt64) {
        s.dirty = []
        place.store(offset, ordering: .releasing)
        size.store(s.entries.count, ordering: .releasing)
    }

    public var isDirty: Bool { state.withLock { !$0.dirty.isEmpty } }

    /// Writes the pieces holding changed entries (not durable by itself; the last piece is
    /// cut at the table's end). A failed write leaves them marked changed.
    public func writeChanges() throws {
        var taken = Set<Int>()
        let pieces: [(offset: UInt64, bytes: [UInt8])] = state.withLock { s in
            taken = s.dirty
            defer { s.dirty = [] }
            let at = place.load(ordering: .relaxed)
            return Set(s.dirty.map { $0 / Self.perPiece }).sorted().map { p in
                let first = p * Self.perPiece, n = min(Self.perPiece, s.entries.count - first)
                var bytes = [UInt8](repeating: 0, count: n * 8)
                for i in 0..<n {
                    let v = s.entries[first + i]
                    for k in 0..<8 { bytes[i * 8 + k] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(k))) }
                }
                return (at + UInt64(p * Self.pieceBytes), bytes)
            }
        }
        do {
            for p in pieces { try file.write(p.bytes, at: p.offset) }
        } catch {
            state.withLock { s in s.dirty.formUnion(taken.filter { $0 < s.entries.count }) }
            throw error
        }
    }
}
