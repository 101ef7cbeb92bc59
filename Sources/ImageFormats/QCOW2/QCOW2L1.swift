import BlockEngine
import Glibc

/// The L1 table a qcow2 mount uses. Read-only mounts read it in chunks on demand; writable
/// ones hold it in memory (QEMU's limit is 32 MiB) as the last layer of the driver's
/// write-back chain, so changed entries reach the file only after the L2 tables they point
/// at are durable.
final class QCOW2L1: MetadataLayer {
    private let reader: (table: FlatTable, offset: UInt64, entries: UInt64)?
    /// The writable table (nil read-only).
    let held: HeldTable?

    init(file: ImageFile, offset: UInt64, entries: UInt64, fileSize: UInt64, writable: Bool) throws {
        if writable {
            var table = [UInt64](repeating: 0, count: Int(entries))
            try FlatTable.forEachEntry(file, start: offset, count: entries, encoding: .u64BE, what: "qcow2 L1 table") { i, e in table[Int(i)] = e }
            reader = nil
            held = HeldTable(file: file, offset: offset, entries: table)
        } else {
            reader = (FlatTable(file: file, start: offset, entries: entries, encoding: .u64BE, fileSize: fileSize), offset, entries)
            held = nil
        }
    }

    /// Where the table is and how many entries it has (a writable table can move: `relocate`).
    var offset: UInt64 { held?.offset ?? reader!.offset }
    var entries: UInt64 { held.map { UInt64($0.count) } ?? reader!.entries }

    func entry(_ i: UInt64) throws -> UInt64 {
        if let held { return held.entry(Int(i)) }
        return try reader!.table.entry(i)
    }

    func set(_ i: UInt64, _ value: UInt64) { held!.set(Int(i), value) }

    /// The table now lives at `offset` with `entries` entries (the new ones empty), already
    /// written there in full.
    func relocate(to offset: UInt64, entries: UInt64) { held!.move(to: offset, paddedTo: Int(entries)) }

    /// Every entry (writable tables).
    var all: [UInt64] { held?.all ?? [] }

    var isDirty: Bool { held?.isDirty ?? false }

    /// The changed entries, once the L2 tables they name are durable (the chain's barrier
    /// ran just before; a crash test pauses here, between the two).
    func writeChanges() throws {
        if QCOW2Driver.testPause > 0 { usleep(QCOW2Driver.testPause) }
        try held?.writeChanges()
    }
}
