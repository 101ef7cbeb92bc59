import BlockEngine

/// The DOS/MBR partition table: four primary slots in sector 0, and for an extended
/// partition a chain of EBRs, each holding one logical partition and a link to the next.
enum MBRTable {
    struct Entry {
        let slot: Int
        let boot: UInt8
        let type: UInt8
        let startLBA: UInt64
        let sectors: UInt64
        var isExtended: Bool { type == 0x05 || type == 0x0F || type == 0x85 }
        var isEmpty: Bool { type == 0 || sectors == 0 }
    }
    /// Linux reads at most this many logical partitions; a longer chain is cut there.
    static let maxLogical = 256

    static func entries(_ sector: [UInt8], at base: Int = 446) -> [Entry] {
        (0..<4).map { i in
            let e = base + 16 * i
            return Entry(slot: i + 1, boot: sector[e], type: sector[e + 4], startLBA: UInt64(le32(sector, e + 8)), sectors: UInt64(le32(sector, e + 12)))
        }
    }

    /// Boot flags only 0x00/0x80: a FAT or NTFS boot sector (no table, same 55AA signature)
    /// fails this, as it does for the kernel's msdos parser.
    static func plausible(_ entries: [Entry]) -> Bool { entries.allSatisfy { $0.boot & 0x7F == 0 } }

    static func read(_ device: BlockDevice, primaries: [Entry], into table: inout PartitionTable) {
        var extended: [Entry] = []
        for e in primaries where !e.isEmpty {
            if e.isExtended { extended.append(e); continue }
            table.candidates.append(candidate(e, index: e.slot, startLBA: e.startLBA))
        }
        if extended.count > 1 { table.notes.append("\(extended.count) extended partitions; only the first is followed") }
        if let ext = extended.first { logical(device, extended: ext, into: &table) }
    }

    static func candidate(_ e: Entry, index: Int, startLBA: UInt64) -> PartitionTable.Candidate {
        .init(index: index, startLBA: startLBA, sectors: e.sectors, type: String(format2: e.type),
              typeName: typeNames[e.type], name: nil, uuid: nil)
    }

    /// Follows the EBR chain: each link is relative to the extended partition's start, each
    /// logical partition to its own EBR. A link seen before (a loop) or one outside the
    /// extended partition ends the chain with a note.
    private static func logical(_ device: BlockDevice, extended ext: Entry, into table: inout PartitionTable) {
        var ebr = ext.startLBA
        var seen = Set<UInt64>()
        var index = 5
        // Bounded in EBRs read, not only in partitions found: a chain of empty EBRs counts.
        while seen.count < maxLogical && index < 5 + maxLogical {
            guard seen.insert(ebr).inserted else {
                table.notes.append("the EBR chain loops back to sector \(ebr); logical partitions after \(index - 1) are left out")
                return
            }
            guard ebr >= ext.startLBA, ebr - ext.startLBA < ext.sectors else {
                table.notes.append("an EBR link points to sector \(ebr), outside the extended partition; the chain ends there")
                return
            }
            guard let s = try? PartitionTable.sectors(device, at: ebr, count: 1) else {
                table.notes.append("the EBR at sector \(ebr) cannot be read; the chain ends there")
                return
            }
            guard s[510] == 0x55 && s[511] == 0xAA else {
                table.notes.append("the EBR at sector \(ebr) has no 55AA signature; the chain ends there")
                return
            }
            // As the kernel reads an EBR: every data entry is a logical partition, the first
            // extended entry links to the next EBR.
            var next: UInt64?
            for e in entries(s) where !e.isEmpty {
                if e.isExtended {
                    if next == nil { next = e.startLBA }
                } else if index < 5 + maxLogical {
                    table.candidates.append(candidate(e, index: index, startLBA: ebr + e.startLBA))
                    index += 1
                }
            }
            guard let link = next else { return }
            ebr = ext.startLBA + link
        }
        table.notes.append("the EBR chain is longer than \(maxLogical) links; the rest is left out")
    }

    static let typeNames: [UInt8: String] = [
        0x01: "FAT12", 0x04: "FAT16 <32M", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT", 0x0B: "W95 FAT32",
        0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x82: "Linux swap", 0x83: "Linux",
        0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xA6: "OpenBSD", 0xAF: "HFS / HFS+", 0xEF: "EFI (FAT-12/16/32)",
        0xFD: "Linux raid autodetect",
    ]
}

extension String {
    /// A byte as "0x83".
    init(format2 byte: UInt8) {
        let hex = String(byte, radix: 16)
        self = "0x" + (hex.count < 2 ? "0" + hex : hex)
    }
}
