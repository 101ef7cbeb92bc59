import Foundation
import XCTest

/// Bochs growing images made by bximage, read through a read-only mount; qemu-img and the
/// source file are the oracles, sleuthkit the forensic user.
final class BochsTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("bximage")
        try Harness.tool("qemu-img")
    }

    /// A 10 MiB ext2 image with a known file, converted by bximage to a growing redolog
    /// (or to `mode`, e.g. sparse).
    func makeImage(_ s: Scratch, mode: String = "growing", name: String = "disk.img") throws -> (image: String, source: String) {
        let src = s.path("src.raw")
        try Harness.run(["truncate", "-s", "10M", src])
        try Harness.run(["mkfs.ext2", "-q", "-F", src])
        let payload = s.path("evidence.txt")
        try Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 % 251) }).write(to: URL(fileURLWithPath: payload))
        try Harness.run(["debugfs", "-w", "-R", "write \(payload) evidence.txt", src])
        let img = s.path(name)
        try Harness.run(["bximage", "-func=convert", "-imgmode=\(mode)", "-q", src, img])
        return (img, src)
    }

    func testReadsIdenticalReadOnlyAndUntouched() throws {
        let s = try Scratch()
        let (img, src) = try makeImage(s)
        let sha = try Files.sha(img)
        let mtime = try Harness.run(["stat", "-c", "%Y %X", img]).out
        // Without --read-only it still mounts read-only, and says so.
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("read-only"), r.err)
        let raw = s.mnt + "/disk.raw"
        XCTAssertEqual(open(raw, O_WRONLY), -1)
        XCTAssertEqual(errno, EROFS)
        let view = try Files.read(raw)
        XCTAssertEqual(view, try Files.read(src).prefix(view.count))
        let q = s.path("q.raw")
        try Harness.run(["qemu-img", "convert", "-U", "-f", "bochs", "-O", "raw", img, q])
        XCTAssertEqual(view, try Files.read(q))
        // sleuthkit lists and extracts the file through the raw view.
        try Harness.tool("fls")
        let listing = try Harness.run(["fls", raw]).out
        XCTAssertTrue(listing.contains("evidence.txt"), listing)
        let inode = listing.split(separator: "\n").first { $0.contains("evidence.txt") }!
            .split(separator: ":")[0].split(separator: " ").last!
        let extracted = s.path("extracted")
        try Harness.run(["sh", "-c", "icat \(raw) \(inode) > \(extracted)"])
        XCTAssertEqual(try Files.read(extracted), try Files.read(s.path("evidence.txt")))
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try Files.sha(img), sha)
        XCTAssertEqual(try Harness.run(["stat", "-c", "%Y %X", img]).out, mtime, "mtime/atime changed")
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("extent size: 16384") && info.contains("catalog entries: 1024") && info.contains("allocated extents"), info)
    }

    /// Runs of unallocated extents and of like bitmap words are passed whole; what they
    /// report must still be exact: data where the pieces are, nothing else (and QEMU's bytes).
    func testAllocationOfAGrowingImageIsExactAcrossRunsAndWords() throws {
        let s = try Scratch()
        let img = s.path("runs.img")
        // 64 MiB: extents 0, 2 and 7 hold pieces (one crossing a 32-sector bitmap word), the rest are holes.
        let pieces = [(0, 4096), (2 * 8 << 20 | 12288, 65536), (7 * 8 << 20 | 8 << 19, 512)]
        let list = pieces.map { "(\($0.0), b'\\x5a' * \($0.1))" }.joined(separator: ", ")
        try Harness.run(["python3", "-c", "import sys; sys.path.insert(0, '\(Harness.packageRoot.path)/scripts'); import scale; "
                         + "scale.bochs_growing('\(img)', 64 << 20, [\(list)])"])
        XCTAssertTrue(try Files.read(img).count > 0)
        let rows = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "map", "--output=json", img]).out.utf8)) as? [[String: Any]] ?? []
        let data = rows.filter { $0["data"] as? Bool == true }.map { [$0["start"] as! Int, $0["length"] as! Int] }
        XCTAssertEqual(data, pieces.map { [$0.0, $0.1] })
        XCTAssertEqual(rows.reduce(0) { $0 + ($1["length"] as! Int) }, 64 << 20)
        let converted = s.path("runs.raw")
        try Harness.run([Harness.rawmount, "convert", img, converted])
        XCTAssertTrue(try Files.read(converted) == (try s.qemuRaw(img)), "differs from qemu-img convert -f bochs")
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("allocated extents: 3"), info)
    }

    /// The same for a sparse image: runs of absent pages are passed whole, the pages that are
    /// there are exactly the data, and the bytes are the pieces written.
    func testAllocationOfASparseImageIsExactAcrossRunsOfAbsentPages() throws {
        let s = try Scratch()
        let img = s.path("runs-sparse.img")
        let pieces = [(0, 4096), (5 << 20 | 4096, 8192), (63 << 20, 512)]  // pages 0, 5 and 63 of 1 MiB
        let list = pieces.map { "(\($0.0), b'\\x6b' * \($0.1))" }.joined(separator: ", ")
        try Harness.run(["python3", "-c", "import sys; sys.path.insert(0, '\(Harness.packageRoot.path)/scripts'); import scale; "
                         + "scale.bochs_sparse('\(img)', 64 << 20, [\(list)])"])
        let rows = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "map", "--output=json", img]).out.utf8)) as? [[String: Any]] ?? []
        let data = rows.filter { $0["data"] as? Bool == true }.map { [$0["start"] as! Int, $0["length"] as! Int] }
        XCTAssertEqual(data, [[0, 1 << 20], [5 << 20, 1 << 20], [63 << 20, 1 << 20]])
        XCTAssertEqual(rows.reduce(0) { $0 + ($1["length"] as! Int) }, 64 << 20)
        let converted = s.path("runs-sparse.raw")
        try Harness.run([Harness.rawmount, "convert", img, converted])
        var expected = Data(count: 64 << 20)
        for (offset, length) in pieces { expected.replaceSubrange(offset..<offset + length, with: Data(repeating: 0x6b, count: length)) }
        XCTAssertTrue(try Files.read(converted) == expected, "the sparse image does not read as the pieces written")
    }

    func testBitmapDecidesWhatIsDataAndVersion1Reads() throws {
        let s = try Scratch()
        let (img, _) = try makeImage(s)
        var d = try Files.read(img)
        // Catalog entry 0 -> slot; clear the bit of sector 3 in that extent's bitmap.
        let slot = Int(d[512]) | Int(d[513]) << 8 | Int(d[514]) << 16 | Int(d[515]) << 24
        let slotBase = 512 + 1024 * 4 + 512 * slot * (1 + 32)
        d[slotBase] &= ~UInt8(1 << 3)
        let edited = s.path("edited.img")
        try d.write(to: URL(fileURLWithPath: edited))
        // Version 1: same data, size at offset 84.
        var v1 = d
        v1.replaceSubrange(64..<68, with: [0, 0, 1, 0])
        v1.replaceSubrange(84..<92, with: d[88..<96])
        let v1path = s.path("v1.img")
        try v1.write(to: URL(fileURLWithPath: v1path))
        let oracle = s.path("oracle.raw")
        try Harness.run(["qemu-img", "convert", "-f", "bochs", "-O", "raw", edited, oracle])
        for (p, name) in [(edited, "edited.raw"), (v1path, "v1.raw")] {
            try s.mount(p, options: ["-r"])
            let raw = s.mnt + "/" + name
            XCTAssertEqual(try Files.read(raw), try Files.read(oracle), name)
            let fd = open(raw, O_RDONLY)
            // Sector 2 holds the ext2 superblock; its neighbour 3 is now a hole inside the extent
            // (bximage also leaves all-zero sectors out, so sector 0 is a hole already).
            XCTAssertEqual(lseek(fd, 2 * 512, 4 /* SEEK_HOLE */), 3 * 512, name)
            XCTAssertGreaterThan(lseek(fd, 3 * 512, 3 /* SEEK_DATA */), 3 * 512, name)
            close(fd)
            try s.unmount()
        }
        // An empty growing image is all holes.
        let empty = s.path("empty.img")
        try Harness.run(["bximage", "-func=create", "-hd=10M", "-imgmode=growing", "-q", empty])
        try s.mount(empty, options: ["-r"])
        let fd = open(s.mnt + "/empty.raw", O_RDONLY)
        XCTAssertEqual(lseek(fd, 0, 3), -1)
        XCTAssertEqual(errno, ENXIO)
        close(fd)
        try s.unmount()
    }

    /// An undoable redolog (Bochs' <base>.redolog) reads through its base where it holds no
    /// sector, exactly as `bximage -func=commit` merges the two; base and log stay untouched.
    func testUndoableRedologReadsOverItsBase() throws {
        let s = try Scratch()
        let (growing, _) = try makeImage(s, name: "growing.img")
        let base = s.path("disk.img")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(base)", "bs=1M", "count=10", "status=none"])
        var log = try Files.read(growing)
        log.replaceSubrange(48..<64, with: Array("Undoable".utf8) + [UInt8](repeating: 0, count: 8))
        let redolog = s.path("disk.img.redolog")
        try log.write(to: URL(fileURLWithPath: redolog))
        // The oracle: bximage merges a copy (commit consumes the redolog it is given). It
        // insists that the base's mtime is the redolog's timestamp (FAT local time).
        let info = try Harness.run(["env", "TZ=UTC", Harness.rawmount, "info", redolog]).out
        let stamp = try XCTUnwrap(info.split(separator: "\n").first { $0.hasPrefix("timestamp: ") }?.dropFirst(11), info)
        let merged = s.path("merged/disk.img")
        try FileManager.default.createDirectory(atPath: s.path("merged"), withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: base, toPath: merged)
        try FileManager.default.copyItem(atPath: base, toPath: s.path("base-copy"))
        try FileManager.default.copyItem(atPath: redolog, toPath: merged + ".redolog")
        try Harness.run(["env", "TZ=UTC", "touch", "-d", String(stamp), merged])
        try Harness.run(["env", "TZ=UTC", "bximage", "-func=commit", "-q", merged, merged + ".redolog"])
        let sha = try Files.sha(redolog)
        // A base whose mtime is not the redolog's timestamp: Bochs would refuse the pair;
        // rawmount reads it and says so. With the times agreeing, it says nothing.
        try Harness.run(["touch", "-d", "2001-01-01", base])
        let m = try Harness.run(["env", "TZ=UTC", Harness.rawmount, "mount", redolog, s.mnt])
        XCTAssertTrue(m.err.contains("was modified after the redolog was made"), m.err)
        XCTAssertTrue(try Files.read(s.mnt + "/disk.img.raw") == (try Files.read(merged)), "redolog over base differs from bximage's commit")
        try s.unmount()
        try Harness.run(["env", "TZ=UTC", "touch", "-d", String(stamp), base])
        let quiet = try Harness.run(["env", "TZ=UTC", Harness.rawmount, "mount", redolog, s.mnt])
        XCTAssertFalse(quiet.err.contains("modified after"), quiet.err)
        try s.unmount()
        XCTAssertEqual(try Files.sha(base), try Files.sha(s.path("base-copy")), "the base changed")
        XCTAssertEqual(try Files.sha(redolog), sha, "the redolog changed")
        // Bochs finds the base by name: without it, or under another name, the mount says so.
        try FileManager.default.copyItem(atPath: redolog, toPath: s.path("renamed.log"))
        try s.assertMountRefused([s.path("renamed.log")], mentions: ["renamed.log", "<base>.redolog"], "not named .redolog")
        try FileManager.default.removeItem(atPath: base)
        try s.assertMountRefused([redolog], mentions: ["disk.img.redolog", "disk.img' not found"], "base missing")
    }

    func testDamagedImagesFailCleanly() throws {
        let s = try Scratch()
        let (img, _) = try makeImage(s)
        let bytes = try Files.read(img)
        let damages: [(String, Int, [UInt8], String)] = [
            ("magic", 0, Array("Bochs Virtual HD Imagf".utf8), "magic"),
            ("volatile", 48, Array("Volatile\0".utf8), "Volatile"),
            ("version", 64, le(0x30000, 4), "version"),
            ("header", 68, le(1024, 4), "header"),
            ("cataloghuge", 72, le(0x200000, 4), "catalog"),
            ("catalogsmall", 72, le(16, 4), "catalog"),
            ("bitmap0", 76, le(0, 4), "bitmap"),
            ("extent3", 80, le(3000, 4), "extent"),
            ("extenthuge", 80, le(16 << 20, 4), "extent"),
            ("extent0", 80, le(0, 4), "extent"),
            ("diskodd", 88, le(10_000_001, 8), "disk size"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "img", mountOptions: ["-r", "--format", "bochs"], damages)
        let cut = s.path("cut.img")
        try bytes.prefix(2000).write(to: URL(fileURLWithPath: cut))
        let r = try Harness.run([Harness.rawmount, "info", "--format", "bochs", cut], check: false)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("cut.img") && r.err.contains("truncated"), r.err)
        // A catalog entry pointing past the file: that extent fails with EIO, others read.
        var d = bytes
        d.replaceSubrange(512..<516, with: le(1000, 4))
        try s.assertDamageIsLocal(d, name: "past.img", bad: 0, good: 1 << 20)
    }

    /// A Bochs sparse image: 256-byte header, page table, then the `present` pages (each
    /// filled with its byte) in order from the first page boundary past the table.
    func sparseImage(pageSize: Int, pages: Int, disk: UInt64?, present: [(page: Int, fill: UInt8)]) -> Data {
        var d = Data(le(0x0246_8ACE, 4) + le(disk == nil ? 1 : 2, 4) + le(UInt64(pageSize), 4) + le(UInt64(pages), 4))
        d += Data(le(disk ?? 0, 8))
        d += Data(count: 256 - d.count)
        var table = [UInt8](repeating: 0xFF, count: pages * 4)
        for (k, p) in present.enumerated() { table.replaceSubrange(p.page * 4 ..< p.page * 4 + 4, with: le(UInt64(k), 4)) }
        d += Data(table)
        d += Data(count: (pageSize - d.count % pageSize) % pageSize)
        for p in present { d += Data(repeating: p.fill, count: pageSize) }
        return d
    }

    /// bximage's sparse mode (which QEMU cannot read: it probes as raw) reads as its source,
    /// read-only, with unallocated pages as holes and the image untouched.
    func testSparseImagesReadLikeTheirSource() throws {
        let s = try Scratch()
        let (img, src) = try makeImage(s, mode: "sparse")
        let sha = try Files.sha(img)
        let times = try Harness.run(["stat", "-c", "%Y %X", img]).out
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("read-only"), r.err)
        let raw = s.mnt + "/disk.raw"
        // The first stat (answered from the file's length while the count reads the page
        // table) is the present pages: the table's entries other than 0xFFFFFFFF.
        let bytes = try Files.read(img)
        let pages = Int(le(bytes, at: 12, 4))
        let present = (0 ..< pages).filter { le(bytes, at: 256 + 4 * $0, 4) != 0xFFFF_FFFF }.count
        var st = stat()
        XCTAssertEqual(stat(raw, &st), 0)
        XCTAssertGreaterThan(present, 0)
        XCTAssertEqual(UInt64(st.st_blocks) * 512, UInt64(present) * 32768, "first st_blocks")
        XCTAssertEqual(open(raw, O_WRONLY), -1)
        XCTAssertEqual(errno, EROFS)
        let source = try Files.read(src)
        XCTAssertTrue(try Files.read(raw) == source, "the sparse image does not read as its source")
        // The first all-zero page of the source is a hole in the image and in the raw view.
        let page = 32768
        let firstZero = try XCTUnwrap(stride(from: 0, to: source.count, by: page).first { o in
            source[o ..< o + page].allSatisfy { $0 == 0 } })
        let fd = open(raw, O_RDONLY)
        XCTAssertEqual(lseek(fd, 0, 4 /* SEEK_HOLE */), off_t(firstZero))
        close(fd)
        let listing = try Harness.run(["fls", raw]).out
        XCTAssertTrue(listing.contains("evidence.txt"), listing)
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha)
        XCTAssertEqual(try Harness.run(["stat", "-c", "%Y %X", img]).out, times, "mtime/atime changed")
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("format: bochs") && info.contains("type: sparse") && info.contains("page size: 32768"), info)
        // An empty image straight from bximage: its header size, all zeros.
        let empty = s.path("empty.img")
        try Harness.run(["bximage", "-func=create", "-hd=10M", "-imgmode=sparse", "-q", empty])
        try s.mount(empty, options: ["-r"])
        let view = try Files.read(s.mnt + "/empty.raw")
        XCTAssertEqual(view.count, 10_321_920)
        XCTAssertTrue(view.allSatisfy { $0 == 0 })
        try s.unmount()
    }

    /// Bochs stacks sparse images by name: layer1 reads through to layer0 where it has no
    /// page. Layers that do not match are refused, naming the parent.
    func testSparseLayersStackByName() throws {
        let s = try Scratch()
        let (base, src) = try makeImage(s, mode: "sparse", name: "layer0")
        let b = try Files.read(base)
        let pageSize = Int(b[8]) | Int(b[9]) << 8 | Int(b[10]) << 16 | Int(b[11]) << 24
        let pages = Int(b[12]) | Int(b[13]) << 8 | Int(b[14]) << 16 | Int(b[15]) << 24
        let disk = UInt64(b[16]) | UInt64(b[17]) << 8 | UInt64(b[18]) << 16 | UInt64(b[19]) << 24
        try sparseImage(pageSize: pageSize, pages: pages, disk: disk, present: [(1, 0xA1), (5, 0xA5), (200, 0xC8)])
            .write(to: URL(fileURLWithPath: s.path("layer1")))
        var expected = try Files.read(src)
        for (p, fill) in [(1, UInt8(0xA1)), (5, 0xA5), (200, 0xC8)] {
            expected.replaceSubrange(p * pageSize ..< (p + 1) * pageSize, with: Data(repeating: fill, count: pageSize))
        }
        try s.mount(s.path("layer1"), options: ["-r"])
        XCTAssertTrue(try Files.read(s.mnt + "/layer1.raw") == expected, "layer1 over layer0 reads wrong")
        try s.unmount()
        let info = try Harness.run([Harness.rawmount, "info", s.path("layer1")]).out
        XCTAssertTrue(info.contains("backing file 1: \(base)"), info)
        // A layer whose parent has another page count is refused, naming the parent.
        try sparseImage(pageSize: pageSize, pages: pages + 1, disk: disk, present: [])
            .write(to: URL(fileURLWithPath: s.path("other0")))
        try sparseImage(pageSize: pageSize, pages: pages, disk: disk, present: [(0, 1)])
            .write(to: URL(fileURLWithPath: s.path("other1")))
        try s.assertMountRefused(["-r", s.path("other1")], mentions: ["other1", "other0", "page count"], "mismatched layers")
    }

    func testDamagedSparseImagesFailCleanly() throws {
        let s = try Scratch()
        let bytes = sparseImage(pageSize: 4096, pages: 64, disk: 64 * 4096, present: [(0, 0x11), (9, 0x99)])
        let damages: [(String, Int, [UInt8], String)] = [
            ("version", 4, le(3, 4), "version"),
            ("pagesize1000", 8, le(1000, 4), "page size"),
            ("pagesize256", 8, le(256, 4), "page size"),
            ("pages0", 12, le(0, 4), "page count"),
            ("pageshuge", 12, le(0x7FFF_FFFF, 4), "truncated"),
            ("diskbig", 16, le(65 * 4096, 8), "disk size"),
            ("diskodd", 16, le(4097, 8), "disk size"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "img", mountOptions: ["-r", "--format", "bochs"], damages)
        // A page table entry past the file: that page fails with EIO, others read.
        var d = bytes
        d.replaceSubrange(256..<260, with: le(1000, 4))
        try s.assertDamageIsLocal(d, name: "past.img", bad: 0, good: 9 * 4096)
    }
}
