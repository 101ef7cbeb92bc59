import Foundation
import XCTest

/// Partitions as files (`<stem>-p<N>.raw`): tables made by sfdisk, offsets and sizes checked
/// against `sfdisk --json` and `mmls`, contents against `qemu-img convert`, file systems made
/// on a partition file checked by e2fsck and sleuthkit on QEMU's view of the disk.
final class PartitionTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
        try Harness.tool("sfdisk")
    }

    /// A 64 MiB raw disk with `script` (sfdisk input) applied, each partition's first MiB
    /// filled with its own byte so a wrong offset cannot read right.
    func disk(_ s: Scratch, _ name: String, _ script: String) throws -> String {
        let raw = s.path(name)
        try Harness.run(["truncate", "-s", "64M", raw])
        try Harness.run(["sfdisk", "-q", raw], input: Data(script.utf8))
        return raw
    }

    /// (index, start sector, sectors) of every data partition, as sfdisk reads the table.
    func sfdiskPartitions(_ raw: String) throws -> [(Int, UInt64, UInt64)] {
        let json = try Harness.run(["sfdisk", "--json", raw]).out
        let table = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        let parts = (table["partitiontable"] as! [String: Any])["partitions"] as! [[String: Any]]
        return parts.compactMap { p in
            let type = "\(p["type"]!)"
            if ["5", "f", "85"].contains(type) { return nil }  // the extended container is not a file
            let node = p["node"] as! String
            let index = Int(node.reversed().prefix { $0.isNumber }.reversed().map(String.init).joined())!
            return (index, (p["start"] as! NSNumber).uint64Value, (p["size"] as! NSNumber).uint64Value)
        }
    }

    func fill(_ raw: String, _ parts: [(Int, UInt64, UInt64)]) throws {
        for (i, start, _) in parts {
            try Files.pwrite(raw, [UInt8](repeating: UInt8(0x40 + i), count: 1 << 20), at: start * 512)
        }
    }

    func testMBRAndLogicalPartitionsShowAsFilesAtSfdisksOffsets() throws {
        let s = try Scratch()
        let raw = try disk(s, "d.raw", """
            label: dos
            start=2048, size=20480, type=83
            start=22528, size=20480, type=c
            start=43008, size=80000, type=5
            start=45056, size=10240, type=83
            start=57344, size=10240, type=82

            """)
        let expected = try sfdiskPartitions(raw)
        XCTAssertEqual(expected.map(\.0), [1, 2, 5, 6])
        try fill(raw, expected)
        let img = s.path("d.qcow2")
        try Harness.run(["qemu-img", "convert", "-O", "qcow2", raw, img])
        let oracle = try s.qemuRaw(img)
        try s.mount(img, options: ["-r"])
        let names = try FileManager.default.contentsOfDirectory(atPath: s.mnt).sorted()
        XCTAssertEqual(names, ["d-p1.raw", "d-p2.raw", "d-p5.raw", "d-p6.raw", "d.raw"])
        for (i, start, count) in expected {
            let file = s.mnt + "/d-p\(i).raw"
            let bytes = try Files.read(file)
            XCTAssertEqual(UInt64(bytes.count), count * 512, "partition \(i) size")
            XCTAssertTrue(bytes == oracle[Int(start * 512) ..< Int((start + count) * 512)], "partition \(i) differs from QEMU's bytes at its offset")
            XCTAssertEqual(open(file, O_WRONLY), -1, "a read-only mount's partition opened for writing")
        }
        // mmls (sleuthkit) agrees on where partition 5 starts.
        try Harness.tool("mmls")
        let mmls = try Harness.run(["mmls", raw]).out
        XCTAssertTrue(mmls.contains("0000045056   0000055295   0000010240"), mmls)
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("partition table: mbr") && info.contains("partition 5: start 23068672 (sector 45056), size 5242880"), info)
        try s.unmount()
        // --no-partitions, and a file mountpoint, show only the disk.
        try s.mount(img, options: ["-r", "--no-partitions"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["d.raw"])
        try s.unmount()
        let target = s.path("target.raw")
        FileManager.default.createFile(atPath: target, contents: nil)
        try s.mount(img, at: target, options: ["-r"])
        XCTAssertEqual(try Files.read(target).count, 64 << 20)
        try s.unmount(target)
    }

    /// GPT wins over its protective MBR; names, types and GUIDs match sfdisk; a primary
    /// header with a bad CRC gives way to the backup, with a note in `info`.
    func testGPTPartitionsAndABadPrimaryHeader() throws {
        let s = try Scratch()
        let raw = try disk(s, "g.raw", """
            label: gpt
            start=2048, size=20480, type=linux, name="root fs"
            start=30720, size=8192, type=uefi, name="ESP"

            """)
        let expected = try sfdiskPartitions(raw)
        try fill(raw, expected)
        let json = try Harness.run([Harness.rawmount, "info", "--json", raw]).out
        let info = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        let table = info["partition-table"] as! [String: Any]
        XCTAssertEqual(table["scheme"] as? String, "gpt")
        let parts = table["partitions"] as! [[String: Any]]
        XCTAssertEqual(parts.map { $0["index"] as! Int }, expected.map(\.0))
        XCTAssertEqual(parts.map { ($0["start"] as! NSNumber).uint64Value }, expected.map { $0.1 * 512 })
        XCTAssertEqual(parts.map { $0["name"] as? String }, ["root fs", "ESP"])
        XCTAssertEqual(parts.first?["type-name"] as? String, "Linux filesystem")
        let sfjson = try Harness.run(["sfdisk", "--json", raw]).out
        XCTAssertTrue(sfjson.contains("\"uuid\": \"\(parts[0]["uuid"] as! String)\""), "partition GUID differs from sfdisk's")

        // Damage the primary header's CRC: the backup header (last sector) still has the table.
        try Files.pwrite(raw, [0xDE, 0xAD, 0xBE, 0xEF], at: 512 + 16)
        let text = try Harness.run([Harness.rawmount, "info", raw]).out
        XCTAssertTrue(text.contains("header CRC mismatch") && text.contains("backup GPT header is used"), text)
        try s.mount(raw, options: ["-r"])
        XCTAssertEqual(try Files.read(s.mnt + "/g-p2.raw").count, 8192 * 512)
        XCTAssertEqual(try Files.read(s.mnt + "/g-p2.raw").prefix(4), Data([0x42, 0x42, 0x42, 0x42]))
        try s.unmount()
    }

    /// The admin's job: mkfs.ext4 on `disk-p2.raw` of a writable VDI; QEMU sees the file
    /// system at the partition's offset, and the image checks clean. Writes past the
    /// partition's end fail like a disk's; seeks and st_blocks stay inside it.
    func testMkfsOnAPartitionFileOfAWritableVDI() throws {
        try Harness.tool("mkfs.ext4")
        let s = try Scratch()
        let raw = try disk(s, "src.raw", "label: dos\nstart=2048, size=40960, type=83\nstart=43008, size=65536, type=83\n")
        let img = s.path("disk.vdi")
        try Harness.run(["qemu-img", "convert", "-O", "vdi", raw, img])
        try s.mount(img)
        let p2 = s.mnt + "/disk-p2.raw"
        try Harness.run(["mkfs.ext4", "-q", "-F", p2])
        try Harness.run(["e2fsck", "-fn", p2])
        // The partition's own end: a write there is refused, one across it cut short.
        let fd = open(p2, O_RDWR)
        XCTAssertGreaterThan(fd, 0)
        var buf = [UInt8](repeating: 7, count: 8192)
        XCTAssertEqual(pwrite(fd, &buf, 8192, off_t(65536 * 512)), -1)
        XCTAssertEqual(errno, ENOSPC)
        XCTAssertEqual(pwrite(fd, &buf, 8192, off_t(65536 * 512 - 4096)), 4096)
        // Data on the disk right after the partition: the partition's SEEK_HOLE still ends at
        // its own end, and SEEK_DATA from its last bytes finds nothing of its own.
        let dfd = open(s.mnt + "/disk.raw", O_RDWR)
        XCTAssertEqual(pwrite(dfd, &buf, 8192, off_t((43008 + 65536) * 512)), 8192)
        close(dfd)
        XCTAssertEqual(lseek(fd, off_t(65536 * 512 - 8192), 4 /* SEEK_HOLE */), off_t(65536 * 512))
        close(fd)
        // Partition 1 was never written: SEEK_DATA in it finds none, though partition 2 has data.
        let p1 = open(s.mnt + "/disk-p1.raw", O_RDONLY)
        XCTAssertEqual(lseek(p1, 0, 3 /* SEEK_DATA */), -1, "SEEK_DATA found the next partition's data")
        XCTAssertEqual(errno, ENXIO)
        XCTAssertEqual(lseek(p1, 0, 4 /* SEEK_HOLE */), 0)
        close(p1)
        // st_blocks: what mkfs wrote, never more than the partition (counted again within a second or so).
        var blocks = 0
        for _ in 0..<40 {
            var st = stat()
            XCTAssertEqual(stat(p2, &st), 0)
            blocks = Int(st.st_blocks)
            if blocks > 0 { break }
            usleep(100_000)
        }
        XCTAssertGreaterThan(blocks, 0)
        XCTAssertLessThanOrEqual(blocks * 512, 65536 * 512, "st_blocks counts beyond the partition")
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        let out = s.path("out.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", img, out])
        let slice = s.path("p2.img")
        try Harness.run(["dd", "if=\(out)", "of=\(slice)", "bs=512", "skip=43008", "count=65536", "status=none"])
        try Harness.run(["e2fsck", "-fn", slice])
        try Harness.tool("fls")
        let listing = try Harness.run(["fls", "-o", "43008", out]).out
        XCTAssertTrue(listing.contains("lost+found"), listing)
        // Partition 1 was never touched: still sfdisk's zeros.
        XCTAssertTrue(try Files.read(out)[2048 * 512 ..< 43008 * 512].allSatisfy { $0 == 0 })
    }

    /// The disk file and a partition file show the same bytes whichever was written, even
    /// with the disk file's page cache warm (the partition write must drop those pages).
    func testDiskAndPartitionFilesStayCoherent() throws {
        let s = try Scratch()
        let raw = try disk(s, "c.raw", "label: dos\nstart=2048, size=8192, type=83\n")
        let img = s.path("c.qcow2")
        try Harness.run(["qemu-img", "convert", "-O", "qcow2", raw, img])
        try s.mount(img)
        let diskFile = s.mnt + "/c.raw", part = s.mnt + "/c-p1.raw"
        let dfd = open(diskFile, O_RDWR), pfd = open(part, O_RDWR)
        var page = [UInt8](repeating: 0, count: 4096)
        for round in 0..<3 {
            // Warm the disk file's cache, then write through the partition.
            XCTAssertEqual(pread(dfd, &page, 4096, 2048 * 512 + 8192), 4096)
            var data = [UInt8](repeating: UInt8(0xA0 + round), count: 4096)
            XCTAssertEqual(pwrite(pfd, &data, 4096, 8192), 4096)
            XCTAssertEqual(pread(dfd, &page, 4096, 2048 * 512 + 8192), 4096)
            XCTAssertTrue(page == data, "round \(round): the disk file shows stale bytes after a write through the partition")
            // And the other way: write through the disk file, read through the partition.
            var back = [UInt8](repeating: UInt8(0xB0 + round), count: 4096)
            XCTAssertEqual(pwrite(dfd, &back, 4096, 2048 * 512 + 12288), 4096)
            XCTAssertEqual(pread(pfd, &page, 4096, 12288), 4096)
            XCTAssertTrue(page == back, "round \(round): the partition shows stale bytes after a write through the disk")
        }
        // Zeroing through the partition drops the cached bytes too.
        XCTAssertEqual(pread(dfd, &page, 4096, 2048 * 512 + 8192), 4096)
        XCTAssertEqual(fallocate(pfd, 0x02 | 0x01 /* PUNCH_HOLE | KEEP_SIZE */, 8192, 4096), 0)
        XCTAssertEqual(pread(dfd, &page, 4096, 2048 * 512 + 8192), 4096)
        XCTAssertTrue(page.allSatisfy { $0 == 0 }, "the disk file shows punched bytes")
        close(dfd); close(pfd)
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// A read-only mount asks the kernel for reads of at most 128 KiB, lets O_DIRECT reads
    /// take the kernel's own direct I/O path (a large read's parts sent at once) and caches
    /// its partitions: every way of reading still gives QEMU's bytes, up to a disk and a
    /// partition that end inside a page, from aligned and unaligned buffers.
    func testReadOnlyMountReadsEveryWay() throws {
        let s = try Scratch()
        let raw = s.path("r.raw")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(raw)", "bs=512", "count=\((12 << 11) + 3)", "status=none"])
        try Harness.run(["sfdisk", "-q", raw], input: Data("label: dos\nstart=2048, size=16383, type=83\n".utf8))
        let img = s.path("r.qcow2")
        try Harness.run(["qemu-img", "convert", "-O", "qcow2", raw, img])
        let oracle = try s.qemuRaw(img)
        try s.mount(img, options: ["-r"])
        let mountinfo = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
        let line = mountinfo.split(separator: "\n").first { $0.contains(" \(s.mnt) ") } ?? ""
        XCTAssertTrue(line.contains("max_read=131072"), "read-only mount without max_read=131072: \(line)")
        let files = [("r.raw", oracle), ("r-p1.raw", oracle[(2048 * 512) ..< ((2048 + 16383) * 512)])]
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 3 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        for (name, expected) in files {
            let size = expected.count
            // Whole reads, buffered (read-ahead in 128 KiB requests) and cached: equal.
            XCTAssertTrue(try Files.read(s.mnt + "/" + name) == expected, "\(name): buffered read differs")
            XCTAssertTrue(try Files.read(s.mnt + "/" + name) == expected, "\(name): cached read differs")
            let fd = open(s.mnt + "/" + name, O_RDONLY | 0o40000 /* O_DIRECT */)
            XCTAssertGreaterThanOrEqual(fd, 0, "\(name): O_DIRECT open")
            // 2 MiB + 4 KiB reads (17 parts), from an aligned and an unaligned buffer, in the
            // middle and across the end (a short read).
            for (at, misalign) in [(4096, 0), (1 << 20, 1), (size - (1 << 20) - 512, 0), (size - 4096, 3)] {
                let want = min((2 << 20) + 4096, size - at)
                let n = pread(fd, buffer + misalign, (2 << 20) + 4096, off_t(at))
                XCTAssertEqual(n, want, "\(name): O_DIRECT read at \(at)")
                guard n == want else { continue }
                let got = Data(bytes: buffer + misalign, count: n)
                XCTAssertTrue(got == expected[(expected.startIndex + at) ..< (expected.startIndex + at + n)],
                              "\(name): O_DIRECT read at \(at) (buffer +\(misalign)) differs from QEMU's bytes")
            }
            XCTAssertEqual(pread(fd, buffer, 1 << 20, off_t(size)), 0, "\(name): O_DIRECT read at the end")
            close(fd)
        }
        try s.unmount()
        // A writable mount keeps 1 MiB requests (and its partitions past the page cache).
        try s.mount(img)
        let rw = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8).split(separator: "\n").first { $0.contains(" \(s.mnt) ") } ?? ""
        XCTAssertFalse(rw.contains("max_read=131072"), "writable mount with 128 KiB reads: \(rw)")
        XCTAssertTrue(try Files.read(s.mnt + "/r-p1.raw") == files[1].1, "writable mount: partition differs")
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// Tables no tool would write: an EBR chain that loops, partitions past the disk's end
    /// and overlapping ones, an absurd GPT entry count. Nothing hangs or crashes; bad entries
    /// are clipped or left out, and `info` and the mount say so.
    func testHostilePartitionTablesAreClippedOrLeftOut() throws {
        let s = try Scratch()
        // MBR: p1 normal, an extended partition (slot 2) whose second EBR links back to the
        // first, p3 overlapping p1, p4 running past the 64 MiB disk.
        let raw = try disk(s, "h.raw", "label: dos\nstart=2048, size=8192, type=83\nstart=40960, size=40960, type=5\nstart=43008, size=2048, type=83\nstart=47104, size=2048, type=83\n")
        var mbr = [UInt8](try Files.read(raw).prefix(512))
        func entry(_ slot: Int, type: UInt8, start: UInt32, sectors: UInt32) {
            let e = 446 + 16 * slot
            mbr[e + 4] = type
            for k in 0..<4 { mbr[e + 8 + k] = UInt8(truncatingIfNeeded: start >> (8 * UInt32(k))); mbr[e + 12 + k] = UInt8(truncatingIfNeeded: sectors >> (8 * UInt32(k))) }
        }
        entry(2, type: 0x83, start: 4096, sectors: 4096)         // overlaps p1
        entry(3, type: 0x83, start: 120_000, sectors: 100_000)   // past the end (131072 sectors)
        try Files.pwrite(raw, mbr, at: 0)
        // The second EBR: found through the first, then linked back to the first.
        let ebr1 = [UInt8](try Files.read(raw)[40960 * 512 ..< 40961 * 512])
        let link = UInt64(ebr1[446 + 16 + 8]) | UInt64(ebr1[446 + 16 + 9]) << 8 | UInt64(ebr1[446 + 16 + 10]) << 16
        XCTAssertGreaterThan(link, 0, "sfdisk made no second EBR")
        // Its link entry: extended, 0 sectors from the extended start (the first EBR), 2048 long.
        try Files.pwrite(raw, [0, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x08, 0, 0], at: (40960 + link) * 512 + 446 + 16)
        let text = try Harness.run([Harness.rawmount, "info", raw]).out
        XCTAssertTrue(text.contains("partition 3 overlaps partition 1; left out"), text)
        XCTAssertTrue(text.contains("partition 4 (100000 sectors from 120000) runs past the end of the disk; clipped to 11072 sectors"), text)
        XCTAssertTrue(text.contains("EBR chain loops back"), text)
        let mounted = try Harness.run([Harness.rawmount, "mount", "-r", raw, s.mnt])
        defer { _ = try? Harness.run([Harness.rawmount, "unmount", s.mnt], check: false) }
        XCTAssertTrue(mounted.err.contains("partition table:"), "the mount says nothing about the bad table: \(mounted.err)")
        let names = try FileManager.default.contentsOfDirectory(atPath: s.mnt).sorted()
        XCTAssertEqual(names, ["h-p1.raw", "h-p4.raw", "h-p5.raw", "h-p6.raw", "h.raw"])
        XCTAssertEqual(try Files.read(s.mnt + "/h-p4.raw").count, 11072 * 512)
        _ = try Harness.run([Harness.rawmount, "unmount", s.mnt])

        // GPT claiming 2^32-1 entries (CRC fixed up, so only the count is wrong).
        let g = try disk(s, "big.raw", "label: gpt\nstart=2048, size=2048, type=linux\n")
        try Harness.run(["python3", "-c", """
            import struct, sys, zlib
            f = open(sys.argv[1], 'r+b')
            for lba in (1, 131071):
                f.seek(lba * 512); h = bytearray(f.read(92))
                h[80:84] = struct.pack('<I', 0xFFFFFFFF); h[16:20] = b'\\0\\0\\0\\0'
                h[16:20] = struct.pack('<I', zlib.crc32(bytes(h)) & 0xFFFFFFFF)
                f.seek(lba * 512); f.write(h)
            """, g])
        let big = try Harness.run([Harness.rawmount, "info", g]).out
        XCTAssertTrue(big.contains("4294967295 entries") && big.contains("no partitions are shown"), big)
    }
}
