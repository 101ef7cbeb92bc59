import BlockEngine
import CZlib

/// The GUID partition table: a header at LBA 1 (a backup at the disk's last sector) and an
/// array of entries, each protected by CRC32. A primary header or array that fails its
/// checks gives way to the backup, with a note; when neither is good, no partition shows.
enum GPTTable {
    /// Entry arrays beyond this are absurd (sgdisk makes 128 entries of 128 bytes).
    static let maxEntries: UInt64 = 16384
    static let maxArrayBytes: UInt64 = 4 << 20

    struct Header {
        let lba: UInt64
        let firstUsable: UInt64
        let lastUsable: UInt64
        let diskGUID: String
        let entriesLBA: UInt64
        let entryCount: UInt64
        let entrySize: UInt64
        let entriesCRC: UInt32
    }

    static func read(_ device: BlockDevice, into table: inout PartitionTable) {
        let last = device.virtualSize / PartitionTable.sector - 1
        var problems: [String] = []
        for (lba, what) in [(UInt64(1), "primary"), (last, "backup")] {
            do {
                let h = try header(device, at: lba, lastLBA: last)
                let entries = try array(device, h)
                if !problems.isEmpty { table.notes.append(problems.joined(separator: "; ") + "; the \(what) GPT header is used") }
                table.diskGUID = h.diskGUID
                for (i, e) in entries.enumerated() { if let c = candidate(e, index: i + 1) { table.candidates.append(c) } }
                return
            } catch let e as Problem {
                problems.append("\(what) GPT: \(e.text)")
            } catch {
                problems.append("\(what) GPT: \(error)")
            }
        }
        table.notes.append(problems.joined(separator: "; ") + "; no partitions are shown")
        table.scheme = .none
    }

    struct Problem: Error { let text: String }

    static func header(_ device: BlockDevice, at lba: UInt64, lastLBA: UInt64) throws -> Header {
        let s = try PartitionTable.sectors(device, at: lba, count: 1)
        guard s[0..<8].elementsEqual("EFI PART".utf8) else { throw Problem(text: "no header signature at sector \(lba)") }
        let size = Int(le32(s, 12))
        guard size >= 92, size <= 512 else { throw Problem(text: "header size \(size)") }
        var copy = Array(s[0..<size])
        copy[16..<20] = [0, 0, 0, 0]
        let crc = crc32(0, copy, UInt32(size))
        guard UInt32(crc) == le32(s, 16) else { throw Problem(text: "header CRC mismatch at sector \(lba)") }
        guard le64(s, 24) == lba else { throw Problem(text: "header at sector \(lba) says it is at \(le64(s, 24))") }
        let count = UInt64(le32(s, 80)), entrySize = UInt64(le32(s, 84))
        guard entrySize >= 128, entrySize <= 4096, entrySize % 8 == 0 else { throw Problem(text: "entry size \(entrySize)") }
        guard count <= maxEntries, count * entrySize <= maxArrayBytes else {
            throw Problem(text: "\(count) entries of \(entrySize) bytes (at most \(maxEntries) and \(maxArrayBytes) bytes)")
        }
        let entriesLBA = le64(s, 72)
        let sectors = (count * entrySize + PartitionTable.sector - 1) / PartitionTable.sector
        guard entriesLBA >= 2, entriesLBA <= lastLBA, sectors <= lastLBA - entriesLBA + 1 else {
            throw Problem(text: "entry array at sector \(entriesLBA) lies outside the disk")
        }
        return Header(lba: lba, firstUsable: le64(s, 40), lastUsable: le64(s, 48), diskGUID: guid(s, 56),
                      entriesLBA: entriesLBA, entryCount: count, entrySize: entrySize, entriesCRC: le32(s, 88))
    }

    static func array(_ device: BlockDevice, _ h: Header) throws -> [[UInt8]] {
        let bytes = Int(h.entryCount * h.entrySize)
        guard bytes > 0 else { return [] }
        let sectors = (bytes + 511) / 512
        let raw = try PartitionTable.sectors(device, at: h.entriesLBA, count: sectors)
        guard UInt32(crc32(0, raw, UInt32(bytes))) == h.entriesCRC else { throw Problem(text: "entry array CRC mismatch") }
        let size = Int(h.entrySize)
        return (0..<Int(h.entryCount)).map { Array(raw[$0 * size ..< $0 * size + 128]) }
    }

    static func candidate(_ e: [UInt8], index: Int) -> PartitionTable.Candidate? {
        guard e[0..<16].contains(where: { $0 != 0 }) else { return nil }  // unused entry
        let first = le64(e, 32), last = le64(e, 40)
        guard last >= first else { return nil }
        let type = guid(e, 0)
        var units: [UInt16] = []
        for i in stride(from: 56, to: 128, by: 2) {
            let u = UInt16(e[i]) | UInt16(e[i + 1]) << 8
            if u == 0 { break }
            units.append(u)
        }
        let name = units.isEmpty ? nil : String(decoding: units, as: UTF16.self)
        // 0...2^64-1 has 2^64 sectors: saturate (the table clips every entry to the disk).
        let (sectors, over) = (last - first).addingReportingOverflow(1)
        return .init(index: index, startLBA: first, sectors: over ? UInt64.max : sectors, type: type, typeName: typeNames[type],
                     name: name, uuid: guid(e, 16))
    }

    /// A GUID as text: the first three fields are little-endian on disk.
    static func guid(_ b: [UInt8], _ o: Int) -> String {
        func hex(_ r: [Int]) -> String { r.map { let h = String(b[o + $0], radix: 16, uppercase: true); return h.count < 2 ? "0" + h : h }.joined() }
        return [hex([3, 2, 1, 0]), hex([5, 4]), hex([7, 6]), hex([8, 9]), hex(Array(10..<16))].joined(separator: "-")
    }

    static let typeNames: [String: String] = [
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
        "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
        "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
        "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
    ]
}
