import BlockEngine

/// One partition of the guest disk, numbered as kpartx and the Linux kernel number them:
/// MBR primaries 1-4 by slot, logical partitions from 5 along the EBR chain, GPT entries by
/// their index in the entry array (from 1).
public struct Partition: Sendable, Equatable {
    public let index: Int
    /// Byte offset and length on the guest disk (after clipping to the disk).
    public let start: UInt64
    public let length: UInt64
    /// MBR: the type byte as "0x83"; GPT: the type GUID.
    public let type: String
    /// What the type is, when it is a well-known one ("Linux filesystem").
    public let typeName: String?
    /// GPT partition name (UTF-16LE in the entry); nil for MBR.
    public let name: String?
    public let uuid: String?
}

/// The guest disk's partition table as read at mount (or `info`) time. Nothing here trusts
/// the table: entries past the disk are clipped or left out, overlapping ones left out,
/// the EBR chain is bounded and loop-checked, and each such decision is a note.
public struct PartitionTable: Sendable {
    public enum Scheme: String, Sendable { case none, mbr, gpt }
    public var scheme: Scheme = .none
    public var partitions: [Partition] = []
    /// What was wrong with the table and what was done about it.
    public var notes: [String] = []
    /// The GPT disk GUID.
    public var diskGUID: String?

    static let sector: UInt64 = 512

    /// Reads the table of `device`'s guest disk. Unreadable sectors end the scan with a note.
    public static func read(_ device: BlockDevice) -> PartitionTable {
        var table = PartitionTable()
        let disk = device.virtualSize
        guard disk >= 2 * sector, let mbr = try? sectors(device, at: 0, count: 1) else { return table }
        let primaries = MBRTable.entries(mbr)
        if primaries.contains(where: { $0.type == 0xEE }) {
            // Protective (or hybrid) MBR: the GPT decides; a hybrid's MBR entries are ignored.
            table.scheme = .gpt
            GPTTable.read(device, into: &table)
        } else if mbr[510] == 0x55 && mbr[511] == 0xAA && MBRTable.plausible(primaries) {
            table.scheme = .mbr
            MBRTable.read(device, primaries: primaries, into: &table)
        }
        table.settle(disk: disk)
        return table
    }

    static func sectors(_ device: BlockDevice, at lba: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count * Int(sector))
        try bytes.withUnsafeMutableBytes { try device.read(into: $0, at: lba * sector) }
        return bytes
    }

    /// Candidate partitions in byte units, before clipping and overlap checks.
    struct Candidate {
        let index: Int
        let startLBA: UInt64
        let sectors: UInt64
        let type: String
        let typeName: String?
        let name: String?
        let uuid: String?
    }
    var candidates: [Candidate] = []

    /// Clips to the disk and leaves out empty, outside and overlapping entries (the later
    /// one of an overlapping pair goes), noting each.
    mutating func settle(disk: UInt64) {
        let diskSectors = disk / Self.sector
        var kept: [Partition] = []
        for c in candidates.sorted(by: { $0.index < $1.index }) {
            guard c.sectors > 0 else { continue }
            guard c.startLBA < diskSectors else {
                notes.append("partition \(c.index) starts at sector \(c.startLBA), past the end of the disk (\(diskSectors) sectors); left out")
                continue
            }
            var count = c.sectors
            if c.sectors > diskSectors - c.startLBA {
                count = diskSectors - c.startLBA
                notes.append("partition \(c.index) (\(c.sectors) sectors from \(c.startLBA)) runs past the end of the disk; clipped to \(count) sectors")
            }
            let p = Partition(index: c.index, start: c.startLBA * Self.sector, length: count * Self.sector,
                              type: c.type, typeName: c.typeName, name: c.name, uuid: c.uuid)
            if let other = kept.first(where: { p.start < $0.start + $0.length && $0.start < p.start + p.length }) {
                notes.append("partition \(c.index) overlaps partition \(other.index); left out")
                continue
            }
            kept.append(p)
        }
        partitions = kept
        candidates = []
    }
}
