import XCTest
import Foundation
import Synchronization
@testable import BlockEngine
@testable import ImageFormats

/// Every integer field of every structure at the edges of what it can hold: each aligned 4-
/// and 8-byte spot of the headers and the first entries of each table (qcow2 snapshot table
/// and bitmap directory, L1 and refcount table; VDI, QED, VMDK and Bochs headers and maps;
/// MBR, EBR and GPT, their CRCs made valid again) gets each extreme value in the format's byte
/// order, and the copy is opened, read, sought, partly written and its partition table read
/// as a mount would. No case may trap or hang. RAWMOUNT_SWEEP_SPAN=N sweeps N bytes of each
/// region instead of the default (a million cases and more by hand).
final class ExtremeFieldSweepTests: XCTestCase {
    static let extremes: [UInt64] = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 62,
                                     UInt64(Int64.max), 1 << 63, UInt64.max - 511, UInt64.max]
    static let span = Int(ProcessInfo.processInfo.environment["RAWMOUNT_SWEEP_SPAN"] ?? "") ?? 0

    var fuzz: FuzzImages!
    // The campaign looks for traps, hangs and unbounded work, not durability: no fdatasync
    // (a writable VHDX case alone makes a dozen, which made the sweep the suite's slowest).
    override func setUpWithError() throws {
        fuzz = try FuzzImages()
        ImageFile.syncDisabled.store(true, ordering: .relaxed)
    }
    override func tearDown() {
        ImageFile.syncDisabled.store(false, ordering: .relaxed)
        fuzz.remove()
    }

    /// Sweeps `regions` (byte ranges of `original`); `fix` repairs checksums after each change.
    /// `partitionsOnly`: the copy is only opened and its partition table read (a raw disk's
    /// data says nothing more).
    func sweep(_ name: String, _ original: [UInt8], format: ImageFormat, regions: [Range<Int>], bigEndian: Bool,
               partitionsOnly: Bool = false, fixedRange: Range<Int> = 512..<604, alsoFixed: [Range<Int>] = [],
               fix: ((inout [UInt8]) -> Void)? = nil) throws {
        let path = fuzz.dir + "/sweep-" + name
        var cases = 0, opened = 0
        // The file is written whole once; each case changes only its bytes (and the
        // checksums `fix` touches: the GPT header) and puts them back, unless it wrote.
        FuzzImages.write(path, original)
        let fixed = fix == nil ? 0..<0 : fixedRange
        func patch(_ bytes: [UInt8], _ ranges: [Range<Int>]) throws {
            let f = try ImageFile(path: path, writable: true)
            for r in ranges where !r.isEmpty { try f.write(Array(bytes[r]), at: UInt64(r.lowerBound)) }
        }
        // One working copy, changed and put back case by case (a copy and a compare of the
        // whole image per case made large images the slowest sweeps).
        var b = original
        for region in regions {
            let r = region.clamped(to: 0..<original.count)
            let end = Self.span > 0 ? min(original.count, r.lowerBound + Self.span) : r.upperBound
            for width in [4, 8] {
                for spot in stride(from: r.lowerBound & ~(width - 1), to: end - width + 1, by: width) {
                    for v in Self.extremes where width == 8 || v <= UInt64(UInt32.max) {
                        let value = (0..<width).map { i in UInt8(truncatingIfNeeded: v >> (UInt64(bigEndian ? width - 1 - i : i) * 8)) }
                        if Array(original[spot ..< spot + width]) == value { continue }
                        let touched = [spot ..< spot + width, fixed] + (fix == nil ? [] : alsoFixed)
                        b.replaceSubrange(spot ..< spot + width, with: value)
                        fix?(&b)
                        defer { for t in touched where !t.isEmpty { b.replaceSubrange(t, with: original[t]) } }
                        cases += 1
                        let writes = cases % 4 == 0 && format.supportsWriting && !partitionsOnly
                        try patch(b, touched)
                        defer { if writes { FuzzImages.write(path, original) } else { try? patch(original, touched) } }
                        let seed = UInt64(cases)
                        let result = FuzzImages.watched { () -> DamagedImageFuzzTests.Outcome in
                            let o: DamagedImageFuzzTests.Outcome = partitionsOnly ? .opened
                                : DamagedImageFuzzTests.exercise(path, writable: writes, format: format, seed: seed)
                            if let device = try? ImageOpener.open(path: path, options: .init(writable: false, format: format, lock: false)) {
                                _ = PartitionTable.read(device)
                                try? device.close()
                            }
                            return o
                        }
                        guard let outcome = result else {
                            try? FileManager.default.copyItem(atPath: path, toPath: "/tmp/rawmount-sweep-hang-\(name)")
                            XCTFail("\(name): \(v) at byte \(spot) (\(width) bytes): still running after \(FuzzImages.hangSeconds) s")
                            return
                        }
                        switch outcome {
                        case .opened: opened += 1
                        case let .problem(text): XCTFail("\(name): \(v) at byte \(spot): \(text)")
                        case .refused: break
                        }
                    }
                }
            }
        }
        XCTAssertGreaterThan(opened, 0, "\(name): no case opened, so nothing past the open was swept")
        print("\(name): \(cases) extreme values swept, \(opened) opened and were read")
    }

    func testQCOW2Fields() throws {
        let img = fuzz.dir + "/s.qcow2"
        _ = try fuzz.image("s.qcow2", ["-O", "qcow2", "-o", "cluster_size=4096"])
        XCTAssertEqual(try fuzz.run(["qemu-img", "snapshot", "-c", "first", img]), 0)
        XCTAssertEqual(try fuzz.run(["qemu-img", "bitmap", "--add", "-g", "4k", img, "b0"]), 0)
        XCTAssertEqual(try fuzz.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 64k 256k", img]), 0)
        let h = try QCOW2Header.read(from: try ImageFile(path: img, writable: false))
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        func at(_ o: UInt64, _ n: Int) -> Range<Int> { Int(o) ..< Int(o) + n }
        try sweep("qcow2", bytes, format: .qcow2, regions: [0..<200, at(h.snapshotsOffset, 64), at(h.bitmapDirectoryOffset, 32),
                                                             at(h.l1Offset, 16), at(h.refcountTableOffset, 16)], bigEndian: true)
    }

    func testQEDVDIVMDKAndBochsFields() throws {
        let qed = try fuzz.image("s.qed", ["-O", "qed", "-o", "cluster_size=4096,table_size=2"])
        let qh = try QEDHeader.read(from: try ImageFile(path: fuzz.dir + "/s.qed", writable: false))
        try sweep("qed", qed, format: .qed, regions: [0..<72, Int(qh.l1TableOffset) ..< Int(qh.l1TableOffset) + 16], bigEndian: false)
        let vdi = try fuzz.image("s.vdi", ["-O", "vdi"])
        let mapAt = Int(vdi[0x154]) | Int(vdi[0x155]) << 8
        try sweep("vdi", vdi, format: .vdi, regions: [0x40..<0x1B8, mapAt ..< mapAt + 16], bigEndian: false)
        let vmdk = try fuzz.image("s.vmdk", ["-O", "vmdk"])
        try sweep("vmdk", vmdk, format: .vmdk, regions: [0..<80], bigEndian: false)
        let bochs = fuzz.dir + "/s.img"
        XCTAssertEqual(try fuzz.run(["bximage", "-func=convert", "-imgmode=growing", "-q", try fuzz.source(), bochs]), 0)
        try sweep("bochs", [UInt8](try Data(contentsOf: URL(fileURLWithPath: bochs))), format: .bochs, regions: [0..<0x80, 512..<528], bigEndian: false)
    }

    /// VHD: the footer (its checksum made valid again after each change, so the parser meets
    /// the values), the dynamic header and the first block table entries; and a fixed
    /// image's footer at its end.
    /// EWF: the descriptors and data of the first sections (header2, header, volume), the
    /// table and table2 headers and first entries, the data, digest and hash sections, every
    /// checksum made right after each change.
    func testEWFFields() throws {
        let img = try fuzz.ewfImage("s.E01", ["-f", "encase6", "-c", "fast", "-d", "sha1"])
        let (fix, sums) = FuzzImages.ewfChecksums(img)
        var regions: [Range<Int>] = [], at = 13
        while at + 76 <= img.count && regions.count < 64 {
            let type = String(decoding: img[at..<(at + 16)].prefix { $0 != 0 }, as: UTF8.self)
            let next = Int(le64(img, at + 16))
            regions.append(at + 16 ..< at + 32)  // next offset and size
            switch type {
            case "volume", "data": regions.append(at + 76 ..< at + 76 + 80)
            case "table", "table2": regions.append(at + 76 ..< at + 76 + 24 + 16)
            default: break
            }
            if next <= at { break }
            at = next
        }
        try sweep("ewf", img, format: .ewf, regions: regions, bigEndian: false, fixedRange: 0..<0, alsoFixed: sums, fix: fix)
    }

    func testVHDFields() throws {
        func fixFooter(at o: Int) -> (inout [UInt8]) -> Void {
            { b in
                for i in 64 ..< 68 { b[o + i] = 0 }
                var sum: UInt32 = 0
                for i in o ..< o + 512 { sum &+= UInt32(b[i]) }
                for i in 0 ..< 4 { b[o + 64 + i] = UInt8(truncatingIfNeeded: ~sum >> (24 - 8 * UInt32(i))) }
            }
        }
        let dynamic = try fuzz.image("s.vhd", ["-O", "vpc"])
        try sweep("vhd", dynamic, format: .vpc, regions: [0..<96, 512..<560, 1536..<1552], bigEndian: true,
                  fixedRange: 64..<68, fix: fixFooter(at: 0))
        let fixed = try fuzz.image("f.vhd", ["-O", "vpc", "-o", "subformat=fixed"])
        let end = fixed.count - 512
        try sweep("vhd-fixed", fixed, format: .vpc, regions: [end ..< end + 96], bigEndian: true,
                  fixedRange: end + 64 ..< end + 68, fix: fixFooter(at: end))
    }

    /// VHDX: each header and the first region table (their CRC-32C made valid again after
    /// each change), the metadata table and its items, and the first table entries.
    func testVHDXFields() throws {
        let img = try fuzz.image("s.vhdx", ["-O", "vhdx", "-o", "block_size=1M"])
        let h = try VHDXHeader.read(from: try ImageFile(path: fuzz.dir + "/s.vhdx", writable: false))
        func fixCRC(at base: Int, length: Int) -> (inout [UInt8]) -> Void {
            { b in
                for i in base + 4 ..< base + 8 { b[i] = 0 }
                let c = crc32c(Array(b[base ..< base + length]))
                for i in 0 ..< 4 { b[base + 4 + i] = UInt8(truncatingIfNeeded: c >> (8 * UInt32(i))) }
            }
        }
        for (name, base, length) in [("vhdx-header1", 64 << 10, 4096), ("vhdx-header2", 128 << 10, 4096), ("vhdx-regions", 192 << 10, 64 << 10)] {
            try sweep(name, img, format: .vhdx, regions: [base ..< base + 96], bigEndian: false,
                      fixedRange: base + 4 ..< base + 8, fix: fixCRC(at: base, length: length))
        }
        let m = Int(h.metadataOffset), bat = Int(h.batOffset)
        try sweep("vhdx-metadata", img, format: .vhdx, regions: [m ..< m + 224, m + (64 << 10) ..< m + (64 << 10) + 48, bat ..< bat + 32],
                  bigEndian: false)
        // A log to replay (one entry rewriting the table's first sector, the headers naming
        // its GUID): every field of the entry header, its descriptor and data sector, the
        // entry's CRC-32C made valid again, so a writable open replays what the sweep wrote.
        var dirty = img
        let guid = VHDXGUID(bytes: (0..<16).map { UInt8($0 &* 13 &+ 5) })
        var sector = Array(img[bat ..< bat + 4096])
        sector[0] = 6; sector[2] = 0x50  // block 0: fully present at 5 MiB
        let entry = VHDXLog.encode([(UInt64(bat), sector)], sequence: 1, logGUID: guid, fileSize: UInt64(img.count))
        let log = Int(h.logOffset)
        dirty.replaceSubrange(log ..< log + entry.count, with: entry)
        for base in [64 << 10, 128 << 10] {
            dirty.replaceSubrange(base + 48 ..< base + 64, with: guid.bytes)
            fixCRC(at: base, length: 4096)(&dirty)
        }
        try sweep("vhdx-log", dirty, format: .vhdx, regions: [log ..< log + 96, log + 4096 ..< log + 4104],
                  bigEndian: false, fixedRange: log + 4 ..< log + 8, fix: fixCRC(at: log, length: entry.count))
    }

    /// MBR with an EBR chain, and GPT with its CRCs recomputed after every change (so the
    /// parser meets the values, not only the checksum).
    func testPartitionTableFields() throws {
        for (name, script) in [("dos", "label: dos\nstart=2048, size=2048\nstart=6144, type=5\nstart=6208, size=1024\nstart=8192, size=1024\n"),
                               ("gpt", "label: gpt\nstart=2048, size=4096\nstart=8192, size=2048\n")] {
            let disk = fuzz.dir + "/\(name).raw"
            XCTAssertEqual(try fuzz.run(["truncate", "-s", "8M", disk]), 0)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["sfdisk", "-q", disk]
            let pipe = Pipe()
            p.standardInput = pipe
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            pipe.fileHandleForWriting.write(Data(script.utf8))
            try pipe.fileHandleForWriting.close()
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, 0, "sfdisk \(name)")
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: disk)))
            if name == "dos" {
                try sweep("mbr", bytes, format: .raw, regions: [446..<512, 6144 * 512 + 446 ..< 6144 * 512 + 478], bigEndian: false,
                          partitionsOnly: true)
            } else {
                try sweep("gpt", bytes, format: .raw, regions: [446..<462, 512..<604, 1024..<1152], bigEndian: false,
                          partitionsOnly: true, fix: Self.fixGPTChecksums)
            }
        }
    }

    /// Makes the primary GPT header's and entry array's CRC-32 match their (changed) bytes,
    /// as far as the header's own sizes allow.
    static func fixGPTChecksums(_ b: inout [UInt8]) {
        func le(_ o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(UInt64(0)) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }
        func put32(_ o: Int, _ v: UInt32) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        let h = 512
        let entries = le(h + 72, 8), count = le(h + 80, 4), size = le(h + 84, 4)
        if entries < UInt64(b.count) / 512, count * size <= 1 << 20, entries * 512 + count * size <= UInt64(b.count) {
            let start = Int(entries) * 512
            put32(h + 88, crc32(b[start ..< start + Int(count * size)]))
        }
        let headerSize = le(h + 12, 4)
        if headerSize >= 92 && headerSize <= 512 {
            put32(h + 16, 0)
            put32(h + 16, crc32(b[h ..< h + Int(headerSize)]))
        }
    }

    static let crcTable: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    static func crc32(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for x in bytes { c = crcTable[Int((c ^ UInt32(x)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}
