import BlockEngine
import Synchronization

/// The L1 table a qcow2 mount uses. Read-only mounts read it in chunks on demand; writable
/// ones hold it in memory (QEMU's limit is 32 MiB) and write changed entries back only
/// after the L2 tables they point at are durable (`QCOW2Driver.flush`).
final class QCOW2L1: Sendable {
    /// Where the table is and how many entries it has (a writable table can move: `relocate`).
    private let place: Atomic<UInt64>
    private let count: Atomic<UInt64>
    var offset: UInt64 { place.load(ordering: .acquiring) }
    var entries: UInt64 { count.load(ordering: .acquiring) }
    private let reader: FlatTable?
    private let state: Mutex<(table: [UInt64], dirty: Set<Int>)>

    init(file: ImageFile, offset: UInt64, entries: UInt64, fileSize: UInt64, writable: Bool) throws {
        place = Atomic(offset)
        count = Atomic(entries)
        if writable {
            var table = [UInt64](repeating: 0, count: Int(entries))
            try FlatTable.forEachEntry(file, start: offset, count: entries, encoding: .u64BE, what: "qcow2 L1 table") { i, e in table[Int(i)] = e }
            reader = nil
            state = Mutex((table, []))
        } else {
            reader = FlatTable(file: file, start: offset, entries: entries, encoding: .u64BE, fileSize: fileSize)
            state = Mutex(([], []))
        }
    }

    func entry(_ i: UInt64) throws -> UInt64 {
        if let reader { return try reader.entry(i) }
        return state.withLock { $0.table[Int(i)] }
    }

    func set(_ i: UInt64, _ value: UInt64) {
        state.withLock { s in
            s.table[Int(i)] = value
            s.dirty.insert(Int(i))
        }
    }

    /// The table now lives at `offset` with `entries` entries (the new ones empty), already
    /// written there in full.
    func relocate(to offset: UInt64, entries: UInt64) {
        state.withLock { s in
            s.table += [UInt64](repeating: 0, count: Int(entries) - s.table.count)
            s.dirty = []
            place.store(offset, ordering: .releasing)
            count.store(entries, ordering: .releasing)
        }
    }

    /// Every entry (writable tables).
    var all: [UInt64] { state.withLock { $0.table } }

    var isDirty: Bool { state.withLock { !$0.dirty.isEmpty } }

    /// Writes the 512-byte pieces holding changed entries (not durable by itself).
    func writeDirty(_ file: ImageFile) throws {
        let pieces: [(UInt64, [UInt8])] = state.withLock { s in
            defer { s.dirty = [] }
            return Set(s.dirty.map { $0 / 64 }).sorted().map { p in
                let first = p * 64, n = min(64, s.table.count - first)
                var bytes = [UInt8](repeating: 0, count: n * 8)
                for i in 0..<n { put64be(&bytes, i * 8, s.table[first + i]) }
                return (place.load(ordering: .relaxed) + UInt64(p) * 512, bytes)
            }
        }
        for (at, bytes) in pieces { try file.write(bytes, at: at) }
    }
}
