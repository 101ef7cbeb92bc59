import XCTest
import Foundation
import Synchronization
@testable import BlockEngine
@testable import ImageFormats
import TestSupport

/// Seeded random damage to real images (made by qemu-img), opened through the same path a
/// mount uses. Every case must end in data or a typed error naming the file: no trap, no
/// hang (a watchdog fails the case), no runaway memory.
final class DamagedImageFuzzTests: XCTestCase {
    /// RAWMOUNT_FUZZ_CASES / RAWMOUNT_FUZZ_SEED run a longer or different campaign by hand.
    static let casesPerImage = Int(ProcessInfo.processInfo.environment["RAWMOUNT_FUZZ_CASES"] ?? "") ?? 300
    static let seedOffset = UInt64(ProcessInfo.processInfo.environment["RAWMOUNT_FUZZ_SEED"] ?? "") ?? 0

    var images: FuzzImages!
    var dir: String { images.dir }

    // The campaign looks for traps, hangs and unbounded work, not durability: no fdatasync
    // (a writable VHDX case alone makes a dozen, which made the sweep the suite's slowest).
    override func setUpWithError() throws {
        images = try FuzzImages()
        ImageFile.syncDisabled.store(true, ordering: .relaxed)
    }
    override func tearDown() {
        ImageFile.syncDisabled.store(false, ordering: .relaxed)
        images.remove()
    }

    @discardableResult
    func run(_ args: [String]) throws -> Int32 { try images.run(args) }
    func source() throws -> String { try images.source() }
    func image(_ name: String, _ convertArgs: [String]) throws -> [UInt8] { try images.image(name, convertArgs) }

    /// Damage: bytes anywhere in the metadata-heavy start, huge or zero integers, or a cut.
    func damage(_ original: [UInt8], _ rng: inout SeededRandom) -> [UInt8] {
        var b = original
        for _ in 0..<(1 + Int(rng.next() % 4)) {
            let region = rng.next() % 10  // headers, then tables, then anywhere
            let span = region < 4 ? min(b.count, 1024) : region < 7 ? min(b.count, 1 << 16) : b.count
            guard span > 8 else { break }
            let at = Int(rng.next() % UInt64(span - 8))
            switch rng.next() % 7 {
            case 6:
                // An extreme integer, 4 or 8 bytes wide, little- or big-endian, at an aligned
                // spot: sizes, counts and offsets at the edges of what they can hold.
                let extremes: [UInt64] = [0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 62,
                                          UInt64(Int64.max), 1 << 63, UInt64.max - 511, UInt64.max]
                let v = extremes[Int(rng.next() % UInt64(extremes.count))]
                let width = rng.next() % 2 == 0 ? 4 : 8
                let spot = at & ~(width - 1)
                let bigEndian = rng.next() % 2 == 0
                for i in 0..<width {
                    let shift = UInt64(bigEndian ? width - 1 - i : i) * 8
                    b[spot + i] = UInt8(truncatingIfNeeded: v >> shift)
                }
            case 0: b[at] = UInt8(truncatingIfNeeded: rng.next())
            case 1: for i in 0..<4 { b[at + i] = 0xFF }
            case 2: for i in 0..<8 { b[at + i] = 0 }
            case 3: b[at] ^= UInt8(1) << (rng.next() % 8)
            case 4: for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: rng.next()) }
            default: b.removeSubrange(Int(rng.next() % UInt64(b.count))...)
            }
            if b.isEmpty { break }
        }
        return b
    }

    /// What a mount does with an image: open, getattr's allocated-bytes scan, reads at the
    /// start and at random places, SEEK_DATA/SEEK_HOLE, and (writable) a write and a close.
    enum Outcome: Sendable { case opened, refused, problem(String) }

    static func exercise(_ path: String, writable: Bool, format: ImageFormat, seed: UInt64) -> Outcome {
        var rng = SeededRandom(seed: seed)
        let device: BlockDevice
        do {
            device = try ImageOpener.open(path: path, options: .init(writable: writable, format: format, lock: false))
        } catch {
            let text = "\(error)"
            return text.contains(path) || text.contains(PathName.baseName(path)) ? .refused : .problem("error does not name the file: \(text)")
        }
        let size = device.virtualSize
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 18, alignment: 4096)
        defer { buf.deallocate() }
        _ = try? device.allocatedBytes()
        var pos: UInt64 = 0
        while pos < min(size, 6 << 20) {
            _ = try? device.read(into: buf, at: pos)
            pos += UInt64(buf.count)
        }
        for _ in 0..<8 where size > 0 {
            _ = try? device.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<65536]), at: rng.next() % size)
        }
        var at: UInt64 = 0
        for k in 0..<64 {
            guard let next = try? device.seek(from: at, data: k % 2 == 0) else { break }
            at = next
        }
        if writable && size > 65536 {
            let off = (rng.next() % (size - 65536)) & ~511
            _ = try? device.write(UnsafeRawBufferPointer(rebasing: buf[0..<65536]), at: off)
            _ = try? device.zero(at: off, length: 4096, deallocate: true)
        }
        // VMDK, VHD and qcow2: `rawmount check` walks every table.
        if let v = device.driver as? VMDKDriver { _ = try? VMDKCheck.run(v) }
        if let v = device.driver as? VHDDriver { _ = try? VHDCheck.run(v) }
        if let q = device.driver as? QCOW2Driver { _ = try? QCOW2Check.run(file: q.file, header: q.header, repair: false) }
        // Bitmaps as the `.dirty-` views and `bitmap dump` read them.
        for b in device.driver.dirtyBitmaps { _ = b.bits.dirtyBytes; _ = b.bits.run(from: 0, maxLength: size) }
        // qcow2: the snapshot table, and each snapshot's tables, read as `mount --snapshot` does.
        if let q = device.driver as? QCOW2Driver {
            for snap in (try? q.snapshots()) ?? [] {
                guard let view = try? QCOW2Driver(file: q.file, snapshot: snap.id) else { continue }
                let d = BlockDevice(driver: view)
                _ = try? d.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<65536]), at: 0)
                _ = try? d.allocatedBytes()
            }
        }
        _ = try? device.close()
        // What the writes left must open again (or be refused by name) and read: a repair on
        // the writable open (QED NEED_CHECK, VDI allocation) meets the damage too.
        if writable, let again = try? ImageOpener.open(path: path, options: .init(writable: true, format: format, lock: false)) {
            _ = try? again.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<65536]), at: 0)
            _ = try? again.allocatedBytes()
            _ = try? again.close()
        }
        return .opened
    }

    /// `fix`: applied to every other damaged copy (checksums made right again, so the damage
    /// reaches what the checksums guard).
    func fuzz(_ name: String, _ original: [UInt8], format: ImageFormat, writable: Bool, seed: UInt64,
              fix: ((inout [UInt8]) -> Void)? = nil) throws {
        var rng = SeededRandom(seed: seed &+ Self.seedOffset &* 1000)
        let path = dir + "/case-" + name
        var opened = 0
        for n in 0..<Self.casesPerImage {
            var damaged = damage(original, &rng)
            if let fix, n % 2 == 0 { fix(&damaged) }
            FuzzImages.write(path, damaged)
            let seed = rng.next()
            let writes = writable && n % 2 == 1
            guard let outcome = FuzzImages.watched({ Self.exercise(path, writable: writes, format: format, seed: seed) }) else {
                try? FileManager.default.copyItem(atPath: path, toPath: "/tmp/rawmount-fuzz-hang-\(name)")
                XCTFail("\(name) case \(n): still running after \(FuzzImages.hangSeconds) s (saved as /tmp/rawmount-fuzz-hang-\(name))")
                return
            }
            switch outcome {
            case .opened: opened += 1
            case let .problem(text): XCTFail("\(name) case \(n): \(text)")
            case .refused: break
            }
        }
        // Most damage lands in data or spare bytes; if nothing opens, the fuzz tests nothing.
        XCTAssertGreaterThan(opened, Self.casesPerImage / 4, "\(name): only \(opened) damaged copies opened")
        print("\(name): \(opened) of \(Self.casesPerImage) damaged copies opened and were read, sought\(writable ? ", written" : "")")
        XCTAssertLessThan(residentHighWater(), 3 << 30, "memory stayed bounded")
    }

    func residentHighWater() -> UInt64 {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let kb = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { UInt64($0) }
            return (kb ?? 0) * 1024
        }
        return 0
    }

    func testDamagedQED() throws {
        try fuzz("qed", try image("a.qed", ["-O", "qed", "-o", "cluster_size=4096,table_size=2"]), format: .qed, writable: true, seed: 11)
        try fuzz("qed64k", try image("b.qed", ["-O", "qed"]), format: .qed, writable: true, seed: 12)
    }

    func testDamagedVDI() throws {
        try fuzz("vdi", try image("a.vdi", ["-O", "vdi"]), format: .vdi, writable: true, seed: 21)
    }

    func testDamagedBochs() throws {
        let out = dir + "/a.img"
        XCTAssertEqual(try run(["bximage", "-func=convert", "-imgmode=growing", "-q", try source(), out]), 0, "bximage convert")
        try fuzz("bochs", [UInt8](try Data(contentsOf: URL(fileURLWithPath: out))), format: .bochs, writable: false, seed: 41)
        let sparse = dir + "/b.img"
        XCTAssertEqual(try run(["bximage", "-func=convert", "-imgmode=sparse", "-q", try source(), sparse]), 0, "bximage convert")
        try fuzz("bochs-sparse", [UInt8](try Data(contentsOf: URL(fileURLWithPath: sparse))), format: .bochs, writable: false, seed: 42)
    }

    func testDamagedQCOW2() throws {
        try fuzz("qcow2", try image("a.qcow2", ["-O", "qcow2", "-o", "cluster_size=4096"]), format: .qcow2, writable: true, seed: 51)
        try fuzz("qcow2-compressed", try image("b.qcow2", ["-c", "-O", "qcow2", "-o", "cluster_size=4096"]), format: .qcow2, writable: true, seed: 52)
        try fuzz("qcow2-zstd", try image("d.qcow2", ["-c", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd"]), format: .qcow2, writable: true, seed: 54)
        let snap = dir + "/e.qcow2"
        _ = try image("e.qcow2", ["-O", "qcow2", "-o", "cluster_size=4096"])
        XCTAssertEqual(try run(["qemu-img", "snapshot", "-c", "first", snap]), 0)
        XCTAssertEqual(try run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 64k 256k", snap]), 0)
        XCTAssertEqual(try run(["qemu-img", "snapshot", "-c", "second", snap]), 0)
        try fuzz("qcow2-snapshots", [UInt8](try Data(contentsOf: URL(fileURLWithPath: snap))), format: .qcow2, writable: true, seed: 55)
        try fuzz("qcow2-subclusters", try image("c.qcow2", ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=16k"]), format: .qcow2, writable: true, seed: 53)
        // Persistent dirty bitmaps: the directory, the tables and their data clusters.
        let bm = dir + "/f.qcow2"
        _ = try image("f.qcow2", ["-O", "qcow2", "-o", "cluster_size=4096"])
        XCTAssertEqual(try run(["qemu-img", "bitmap", "--add", "-g", "4k", bm, "b0"]), 0)
        XCTAssertEqual(try run(["qemu-img", "bitmap", "--add", "--disable", bm, "b1"]), 0)
        XCTAssertEqual(try run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 64k 256k", "-c", "write 1M 4k", bm]), 0)
        try fuzz("qcow2-bitmaps", [UInt8](try Data(contentsOf: URL(fileURLWithPath: bm))), format: .qcow2, writable: true, seed: 56)
    }

    func testDamagedVHD() throws {
        try fuzz("vhd", try image("a.vhd", ["-O", "vpc"]), format: .vpc, writable: true, seed: 61)
        try fuzz("vhd-fixed", try image("b.vhd", ["-O", "vpc", "-o", "subformat=fixed"]), format: .vpc, writable: true, seed: 62)
        // A differencing child (the fixture's layout) over "a.vhd", which its locators name.
        try fuzz("vhd-differencing", try differencingChild(over: "a.vhd", qemuFormat: "vpc", fixture: "make_vhd_child.py", mode: "w2ru"),
                 format: .vpc, writable: false, seed: 63)
    }

    func testDamagedVHDX() throws {
        try fuzz("vhdx", try image("a.vhdx", ["-O", "vhdx", "-o", "block_size=1M"]), format: .vhdx, writable: true, seed: 71)
        try fuzz("vhdx-fixed", try image("b.vhdx", ["-O", "vhdx", "-o", "subformat=fixed"]), format: .vhdx, writable: true, seed: 72)
        // A differencing child (the fixture's layout) over "a.vhdx", which its locator names.
        try fuzz("vhdx-differencing", try differencingChild(over: "a.vhdx", qemuFormat: "vhdx", fixture: "make_vhdx_child.py", mode: "relative"),
                 format: .vhdx, writable: false, seed: 73)
    }

    /// A differencing child written by an IntegrationTests fixture over `parent` (in the
    /// scratch folder, where the child's locators find it), as bytes.
    func differencingChild(over parent: String, qemuFormat: String, fixture: String, mode: String) throws -> [UInt8] {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("IntegrationTests/Fixtures/" + fixture).path
        let p = dir + "/" + parent, child = dir + "/child-of-" + parent
        XCTAssertEqual(try run(["qemu-img", "convert", "-f", qemuFormat, "-O", "raw", p, p + ".raw"]), 0)
        XCTAssertEqual(try run(["python3", script, p, p + ".raw", child, child + ".expected", mode]), 0)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: child)))
    }

    /// EWF as ewfacquire writes it: EnCase 6 (sectors, table, table2, digest), stored chunks
    /// and compressed ones, and the original layout (chunks in the table section).
    func testDamagedEWF() throws {
        for (name, options, seed) in [("ewf6.E01", ["-f", "encase6", "-c", "fast", "-d", "sha1"], UInt64(81)),
                                      ("ewf-stored.E01", ["-f", "encase6", "-c", "none", "-b", "16"], 82),
                                      ("ewf-smart.s01", ["-f", "smart", "-c", "best"], 83)] {
            let bytes = try images.ewfImage(name, options)
            try fuzz(name, bytes, format: .ewf, writable: false, seed: seed, fix: FuzzImages.ewfChecksumFixer(bytes))
        }
    }

    /// Split raw: the first piece damaged (cut, grown, changed) beside intact later pieces.
    func testDamagedSplitRaw() throws {
        let src = [UInt8](try Data(contentsOf: URL(fileURLWithPath: try source())))
        let piece = 1 << 20
        for k in 1 ..< src.count / piece {
            FuzzImages.write(dir + "/case-split.\(String(format: "%03d", k + 1))", Array(src[(k * piece)..<((k + 1) * piece)]))
        }
        try fuzz("split.001", Array(src[0..<piece]), format: .splitraw, writable: true, seed: 91)
    }

    func testDamagedVMDK() throws {
        try fuzz("vmdk", try image("a.vmdk", ["-O", "vmdk"]), format: .vmdk, writable: true, seed: 31)
        try fuzz("vmdk-stream", try image("b.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]), format: .vmdk, writable: false, seed: 32)
        // Standalone descriptors: the damage is to the text; extents keep their names.
        try fuzz("vmdk-flat-descriptor", try image("c.vmdk", ["-O", "vmdk", "-o", "subformat=monolithicFlat"]), format: .vmdk, writable: true, seed: 33)
        try fuzz("vmdk-split-descriptor", try image("d.vmdk", ["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"]), format: .vmdk, writable: true, seed: 34)
    }
}
