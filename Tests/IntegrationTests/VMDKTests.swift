import Foundation
import XCTest
import TestSupport

/// VMDK through real mounts, with qemu-img/qemu-io as the oracle.
final class VMDKTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func testEverySubformatReadsIdentical() throws {
        let s = try Scratch()
        // 2100 MiB: the two-gigabyte formats get a second extent. Compared with cmp, not in memory.
        for sf in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let img = s.path("\(sf).vmdk")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sf)", img, "2100M"])
            try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x61 0 100k", "-c", "write -P 0x62 2047M 2M",
                             "-c", "write -P 0x63 2099M 1M", img])
            try s.mount(img, options: ["-r"])
            let raw = s.mnt + "/\(sf).raw"
            let oracle = s.path("\(sf).oracle.raw")
            try Harness.run(["qemu-img", "convert", "-U", "-O", "raw", img, oracle])
            XCTAssertEqual(try Harness.run(["cmp", raw, oracle], check: false).status, 0, sf)
            try FileManager.default.removeItem(atPath: oracle)
            try s.unmount()
        }
        // zeroed-grain images (version 2): a zeroed grain reads as zeros.
        let zg = s.path("zg.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", zg, "8M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x71 0 1M", "-c", "write -z 0 128k", zg])
        try s.mount(zg, options: ["-r"])
        XCTAssertEqual(try Files.read(s.mnt + "/zg.raw"), try s.qemuRaw(zg))
        try s.unmount()
    }

    func testRandomWritesAreCleanAndMatchShadow() throws {
        let s = try Scratch()
        var rng = SeededRandom(seed: 11)
        for sf in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"] {
            let img = s.path("\(sf).vmdk")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sf)", img, "2060M"])
            try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x44 2047M 2M", img])
            let cidBefore = try Harness.run(["sh", "-c", "strings \(img) | grep -m1 '^CID='"]).out
            try s.mount(img)
            let raw = s.mnt + "/\(sf).raw"
            let fd = open(raw, O_RDWR)
            // Writes cluster near the extent boundary (2 GiB) so they span extents.
            var writes: [(UInt64, [UInt8])] = []
            for k in 0..<100 {
                let len = Int(rng.next() % 200_000) + 1
                let base: UInt64 = k % 2 == 0 ? (2048 << 20) - 1_000_000 : 0
                let off = base + rng.next() % 2_000_000
                let data = k % 9 == 0 ? [UInt8](repeating: 0, count: len) : rng.bytes(len)
                XCTAssertEqual(data.withUnsafeBytes { pwrite(fd, $0.baseAddress, len, off_t(off)) }, len)
                writes.append((off, data))
            }
            close(fd)
            try s.unmount()
            // Build the shadow from the original image plus our writes, not from our result.
            let orig = s.path("\(sf).orig.raw")
            try Harness.run(["qemu-img", "create", "-q", "-f", "raw", orig, "2060M"])
            try Harness.run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 2047M 2M", orig])
            for (off, data) in writes { try Files.pwrite(orig, data, at: off) }
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(check.status, 0, "\(sf): \(check.out)\(check.err)")
            try Harness.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, orig])
            let cidAfter = try Harness.run(["sh", "-c", "strings \(img) | grep -m1 '^CID='"]).out
            XCTAssertNotEqual(cidBefore, cidAfter, "\(sf): CID must change on the first write")
        }
    }

    func testStreamOptimizedQemuAndVMwareLayoutsReadIdentical() throws {
        let s = try Scratch()
        let src = s.path("src.raw")
        var rng = SeededRandom(seed: 3)
        var data = Data(rng.bytes(3 << 20))
        data.append(Data(count: 2 << 20))                                  // zero grains are left out
        data.append(Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 700) })) // compressible
        try data.write(to: URL(fileURLWithPath: src))
        let qemu = s.path("q.vmdk"), vmware = s.path("vw.vmdk")
        try Harness.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, qemu])
        try Harness.run(["python3", Harness.packageRoot.path + "/Tests/IntegrationTests/Fixtures/make_vmware_stream.py", src, vmware])
        try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, vmware]) // the oracle reads it too
        for img in [qemu, vmware] {
            let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), r.err)
            let name = s.mnt + "/" + (img == qemu ? "q.raw" : "vw.raw")
            XCTAssertEqual(try Files.read(name), data)
            // Random small reads inside grains (served from the inflated-grain cache).
            let fd = open(name, O_RDONLY)
            var buf = [UInt8](repeating: 0, count: 4096)
            for _ in 0..<200 {
                let off = Int(rng.next() % UInt64(data.count - 4096))
                XCTAssertEqual(pread(fd, &buf, 4096, off_t(off)), 4096)
                XCTAssertEqual(Data(buf), data.subdata(in: off..<(off + 4096)))
            }
            close(fd)
            try s.unmount()
        }
        // A damaged compressed grain reads as EIO, never garbage or a crash.
        var bytes = try Files.read(vmware)
        for i in (128 * 512 + 12)..<(128 * 512 + 60) { bytes[i] ^= 0x5A }
        try s.assertDamageIsLocal(bytes, name: "bad.vmdk", bad: 0, good: 1 << 20)
    }

    func testChildOverParentReadsAndWrites() throws {
        let s = try Scratch()
        let base = s.path("base.vmdk"), child = s.path("child.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", base, "16M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x0b 0 4M", "-c", "write -P 0x0c 9M 1M", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x0d 1M 64k", "-c", "write -P 0x0e 9M 100k", child])
        let baseSha = try Files.sha(base)
        try s.mount(child, options: ["-r"])
        XCTAssertEqual(try Files.read(s.mnt + "/child.raw"), try s.qemuRaw(child))
        try s.unmount()
        // Writes: partial grains are filled from the parent; the parent never changes.
        let shadow = s.path("shadow.raw")
        try s.qemuRaw(child).write(to: URL(fileURLWithPath: shadow))
        try s.mount(child)
        var rng = SeededRandom(seed: 21)
        for _ in 0..<60 {
            let len = Int(rng.next() % 100_000) + 1
            let off = rng.next() % UInt64((16 << 20) - len)
            let data = rng.bytes(len)
            try Files.pwrite(s.mnt + "/child.raw", data, at: off)
            try Files.pwrite(shadow, data, at: off)
        }
        try s.unmount()
        XCTAssertEqual(try Files.sha(base), baseSha, "the parent was modified")
        try Harness.run(["qemu-img", "check", child])
        try Harness.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", child, shadow])
        // A parent whose CID changed is refused by name.
        let baseBytes = try Files.read(base)
        // Replace the descriptor's CID value (QEMU does not zero-pad it) up to its newline.
        let needle = Array("\nCID=".utf8), hay = [UInt8](baseBytes)
        let cidAt = (0..<(hay.count - needle.count)).first { Array(hay[$0..<($0 + needle.count)]) == needle }! + needle.count
        let cidEnd = hay[cidAt...].firstIndex(of: 0x0A)!
        var changed = baseBytes
        changed.replaceSubrange(cidAt..<cidEnd, with: Data(String(repeating: "b", count: cidEnd - cidAt).utf8))
        try changed.write(to: URL(fileURLWithPath: base))
        let r = try Harness.run([Harness.rawmount, "mount", "-r", child, s.mnt], check: false)
        if r.status == 0 { _ = try? Harness.run([Harness.rawmount, "unmount", s.mnt], check: false) }
        let diag = (try? Harness.run(["sh", "-c", "strings \(child) | grep CID; strings \(base) | grep CID"], check: false).out) ?? ""
        XCTAssertEqual(r.status, 1, "mounted despite a changed parent CID:\n\(diag)")
        XCTAssertTrue(r.err.contains("parentCID") && r.err.contains("base.vmdk"), r.err)
        // A child that names itself as its parent is a loop: refused, no hang.
        let loop = s.path("loop.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", loop, "1M"])
        var text = try String(contentsOfFile: loop, encoding: .utf8)
        let cid = text.split(separator: "\n").first { $0.hasPrefix("CID=") }!.dropFirst(4)
        text = text.replacingOccurrences(of: "parentCID=ffffffff", with: "parentCID=\(cid)\nparentFileNameHint=\"loop.vmdk\"")
        try text.write(toFile: loop, atomically: true, encoding: .utf8)
        try s.assertMountRefused(["-r", loop], mentions: ["loops"], "parent loop")
    }

    func testCOWDBareAndThroughVmfsSparseDescriptor() throws {
        let s = try Scratch()
        let src = s.path("src.raw")
        var rng = SeededRandom(seed: 8)
        var data = Data(rng.bytes(1 << 20))
        data.append(Data(count: 3 << 20))
        data.append(Data(rng.bytes(40_000)))
        data.append(Data(count: 8192 - 40_000 % 8192))
        try data.write(to: URL(fileURLWithPath: src))
        let delta = s.path("c-delta.vmdk"), desc = s.path("c.vmdk")
        try Harness.run(["python3", Harness.packageRoot.path + "/Tests/IntegrationTests/Fixtures/make_cowd.py", src, delta, desc])
        try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, desc]) // the oracle agrees
        try s.mount(delta, options: ["-r"])    // QEMU cannot open a bare COWD file; we can
        XCTAssertEqual(try Files.read(s.mnt + "/c-delta.raw"), data)
        try s.unmount()
        // Writes through the descriptor, checked by QEMU against a shadow copy.
        let shadow = s.path("shadow.raw")
        try data.write(to: URL(fileURLWithPath: shadow))
        try s.mount(desc)
        for _ in 0..<40 {
            let len = Int(rng.next() % 50_000) + 1
            let off = rng.next() % UInt64(data.count - len)
            let bytes = rng.bytes(len)
            try Files.pwrite(s.mnt + "/c.raw", bytes, at: off)
            try Files.pwrite(shadow, bytes, at: off)
        }
        try s.unmount()
        try Harness.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", desc, shadow])
        // grainSize 0 makes QEMU 7.2 die with SIGFPE; here it is a clear error.
        var bad = try Files.read(delta)
        bad.replaceSubrange(16..<20, with: [0, 0, 0, 0])
        let p = s.path("zero-grain.vmdk")
        try bad.write(to: URL(fileURLWithPath: p))
        try s.assertMountRefused(["-r", p], mentions: ["zero-grain.vmdk", "grainSize"], "grainSize 0")
    }

    func testCreateEverySubformatAndChild() throws {
        let s = try Scratch()
        for sf in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"] {
            let img = s.path("\(sf).vmdk")
            try Harness.run([Harness.rawmount, "create", "-f", "vmdk", "--subformat", sf, img, "2050M"])
            try Harness.run(["qemu-img", "check", img])
            let info = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "--output=json", img]).out.utf8)) as! [String: Any]
            XCTAssertEqual((info["virtual-size"] as! NSNumber).intValue, 2050 << 20, sf)
            XCTAssertEqual(((info["format-specific"] as? [String: Any])?["data"] as? [String: Any])?["create-type"] as? String, sf)
            if sf != "streamOptimized" {
                try s.mount(img)
                try Files.pwrite(s.mnt + "/\(sf).raw", [UInt8](repeating: 0x3C, count: 70_000), at: (2048 << 20) - 30_000)
                try s.unmount()
                try Harness.run(["qemu-img", "check", img])
                let back = try Harness.run(["qemu-io", "-f", "vmdk", "-c", "read -P 0x3c \((2048 << 20) - 30_000) 70000", img])
                XCTAssertFalse(back.out.contains("Pattern verification failed"), back.out)
            }
        }
        let child = s.path("child.vmdk")
        try Harness.run([Harness.rawmount, "create", "-f", "vmdk", "--backing", "monolithicSparse.vmdk", child, "2050M"])
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "--output=json", child]).out.utf8)) as! [String: Any]
        XCTAssertEqual(info["backing-filename"] as? String, "monolithicSparse.vmdk")
        try Harness.run(["qemu-img", "compare", s.path("monolithicSparse.vmdk"), child])
    }

    func testBximageVMware4ImageReadsAndWrites() throws {
        try Harness.tool("bximage")
        let s = try Scratch()
        let src = s.path("src.raw")
        var rng = SeededRandom(seed: 4)
        var data = Data(rng.bytes(3 << 20))
        data.append(Data(count: 7 << 20))
        try data.write(to: URL(fileURLWithPath: src))
        let img = s.path("bx.vmdk")
        try Harness.run(["bximage", "-func=convert", "-imgmode=vmware4", "-q", src, img])
        try s.mount(img)
        XCTAssertEqual(try Files.read(s.mnt + "/bx.raw"), data)
        try Files.pwrite(s.mnt + "/bx.raw", [UInt8](repeating: 0x99, count: 100_000), at: 5_000_000)
        try Files.pwrite(src, [UInt8](repeating: 0x99, count: 100_000), at: 5_000_000)
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        try Harness.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, src])
    }

    /// QEMU refuses writes under a zero directory entry; rawmount allocates the grain table
    /// (and its redundant copy) at the end of the file.
    func testWriteUnderEmptyDirectoryEntryAllocatesGrainTables() throws {
        let s = try Scratch()
        let img = s.path("gd.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "100M"])
        var d = try Files.read(img)
        func le(_ o: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 | Int(d[o + $1]) << (8 * $1) } }
        let rgd = le(48, 8), gd = le(56, 8)
        for dir in [rgd, gd] { d.replaceSubrange((dir * 512 + 4)..<(dir * 512 + 8), with: [0, 0, 0, 0]) } // entry 1: 32..64 MiB
        try d.write(to: URL(fileURLWithPath: img))
        let sizeBefore = d.count
        try s.mount(img)
        try Files.pwrite(s.mnt + "/gd.raw", [UInt8](repeating: 0x47, count: 200_000), at: 40 << 20)
        try s.unmount()
        let after = try Files.read(img)
        XCTAssertGreaterThan(after.count, sizeBefore + 2 * 2048, "new grain tables were appended")
        let newGT = (0..<4).reduce(0) { $0 | Int(after[gd * 512 + 4 + $1]) << (8 * $1) }
        let newRGT = (0..<4).reduce(0) { $0 | Int(after[rgd * 512 + 4 + $1]) << (8 * $1) }
        XCTAssertNotEqual(newGT, 0); XCTAssertNotEqual(newRGT, 0); XCTAssertNotEqual(newGT, newRGT)
        XCTAssertEqual(after.subdata(in: (newGT * 512)..<(newGT * 512 + 2048)), after.subdata(in: (newRGT * 512)..<(newRGT * 512 + 2048)),
                       "redundant grain table mirrors the primary")
        try Harness.run(["qemu-img", "check", img])
        let r = try Harness.run(["qemu-io", "-f", "vmdk", "-c", "read -P 0x47 \(40 << 20) 200000", img])
        XCTAssertFalse(r.out.contains("Pattern verification failed"), r.out)
    }

    /// QEMU writes the CID without zero padding ("CID=5ef7b00"); the first-write CID update
    /// must keep the descriptor's layout (an 8-digit write once swallowed the newline).
    func testShortCIDIsRewrittenInPlace() throws {
        let s = try Scratch()
        for (name, sub) in [("flat.vmdk", "monolithicFlat"), ("sparse.vmdk", "monolithicSparse")] {
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sub)", img, "4M"])
            var bytes = [UInt8](try Files.read(img))
            let needle = Array("\nCID=".utf8)
            let at = (0..<(bytes.count - needle.count)).first { Array(bytes[$0..<($0 + needle.count)]) == needle }! + needle.count
            // Make it 7 digits. QEMU's own CID may have 8 or fewer digits; an embedded
            // descriptor must keep every byte after it in place, so its NUL padding absorbs
            // the difference.
            let end = bytes[at...].firstIndex(of: 0x0A)!
            let newCID = Array("5ef7b00".utf8)
            if sub == "monolithicFlat" {
                bytes.replaceSubrange(at..<end, with: newCID)
            } else {
                let nulAt = bytes[at...].firstIndex(of: 0)!
                var region = newCID + Array(bytes[end..<nulAt])
                let old = max(nulAt - at, region.count)
                XCTAssertTrue(bytes[nulAt..<(at + old)].allSatisfy { $0 == 0 }, "descriptor padding")
                region += [UInt8](repeating: 0, count: old - region.count)
                bytes.replaceSubrange(at..<(at + old), with: region)
            }
            try Data(bytes).write(to: URL(fileURLWithPath: img))
            try Harness.run(["qemu-img", "info", img])
            try s.mount(img)
            try Files.pwrite(s.mnt + "/" + name.replacingOccurrences(of: ".vmdk", with: ".raw"), [1, 2, 3], at: 4096)
            try s.unmount()
            let text = String(decoding: try Files.read(img).prefix(65536).map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            let cidLine = text.split(separator: "\n").first { $0.hasPrefix("CID=") }!
            XCTAssertEqual(cidLine.count, 4 + 7, "\(name): \(cidLine)")
            XCTAssertNotEqual(cidLine, "CID=5ef7b00", "\(name): CID must change on the first write")
            XCTAssertTrue(text.contains("\nparentCID=ffffffff\n"), name)
            try Harness.run(["qemu-img", "check", img])
        }
    }

    func testFilesystemOnVMDK() throws {
        let s = try Scratch()
        let img = s.path("fs.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "64M"])
        try s.mount(img)
        let raw = s.mnt + "/fs.raw"
        try s.partitionFormatAndCheck(raw: raw, bytes: 4 << 20, fill: 0x63)
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// A split image's extents are opened, locked and read on all cores: what it shows, the
    /// locks it holds and the error it gives must still be those of one extent after another.
    func testSplitImageOpensEveryExtentAndReportsTheFirstBadOne() throws {
        let s = try Scratch()
        let img = s.path("many.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, "60G"])
        // Data in the first and last extent, in the middle, and across the 2/3 boundary.
        let writes: [(offset: UInt64, length: Int, pattern: UInt8)] = [(0, 65536, 0x11), (4095 << 20, 2 << 20, 0x22),
                                                                       (31 << 30, 4096, 0x33), ((60 << 30) - 65536, 65536, 0x44)]
        try Harness.run(["qemu-io", "-f", "vmdk"] + writes.flatMap { ["-c", "write -P \($0.pattern) \($0.offset) \($0.length)"] } + [img])
        func part(_ n: Int) -> String { s.path(String(format: "many-s%03d.vmdk", n)) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: part(30)))
        // The same descriptor with tabs between the fields and CRLF line ends.
        let text = try String(contentsOfFile: img, encoding: .utf8)
        try text.replacingOccurrences(of: "\n", with: "\r\n").replacingOccurrences(of: "RW 4194304 SPARSE", with: "RW\t4194304\tSPARSE")
            .write(toFile: img, atomically: false, encoding: .utf8)
        let qemuMap = try Harness.run(["qemu-img", "map", "--output=json", img]).out
        try s.mount(img, options: ["-r"])
        let raw = s.mnt + "/many.raw"
        XCTAssertEqual(try Files.size(raw), 60 << 30)
        for w in writes {
            XCTAssertEqual(try Files.pread(raw, count: w.length, at: w.offset), Data(repeating: w.pattern, count: w.length), "at \(w.offset)")
        }
        XCTAssertEqual(try Files.pread(raw, count: 4096, at: 20 << 30), Data(count: 4096))
        XCTAssertEqual(try Harness.run([Harness.rawmount, "map", "--output=json", img]).out, qemuMap)
        // Every extent is locked against writers, as QEMU locks them: the first, a middle and the last.
        for n in [1, 16, 30] {
            let w = try Harness.run(["qemu-io", "-f", "raw", "-c", "write 0 512", part(n)], check: false)
            XCTAssertNotEqual(w.status, 0, "extent \(n) was writable under a read-only mount")
            XCTAssertTrue(w.err.contains("lock"), w.err)
        }
        try s.unmount()

        // A writer holding one extent: refused by name, nothing mounted.
        let other = s.path("other")
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        try s.mount(part(12), at: other, options: ["-f", "raw"])
        try s.assertMountRefused(["-r", img], mentions: ["many-s012.vmdk"], "extent 12 held by a writer")
        try s.unmount(other)
        // Several bad extents: the first one in the descriptor is named.
        try Harness.run(["mkfifo", s.path("fifo")])
        try FileManager.default.moveItem(atPath: part(25), toPath: s.path("s025.away"))
        try FileManager.default.moveItem(atPath: part(17), toPath: s.path("s017.away"))
        try s.assertMountRefused(["-r", img], mentions: ["many.vmdk", "extent 17", "many-s017.vmdk", "not found"], "two missing extents")
        try FileManager.default.moveItem(atPath: part(9), toPath: s.path("s009.away"))
        try FileManager.default.moveItem(atPath: s.path("fifo"), toPath: part(9))
        try s.assertMountRefused(["-r", img], mentions: ["many-s009.vmdk", "FIFO"], "a FIFO before the missing ones")
    }

    func testDescriptorProblemsAreClearErrors() throws {
        let s = try Scratch()
        let img = s.path("d.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", img, "10M"])
        let text = try String(contentsOfFile: img, encoding: .utf8)
        func variant(_ name: String, _ body: String) throws -> CommandResult {
            let p = s.path(name)
            try body.write(toFile: p, atomically: true, encoding: .utf8)
            return try Harness.run([Harness.rawmount, "mount", "-r", p, s.mnt], check: false)
        }
        let cases: [(String, String, String)] = [
            ("missing.vmdk", text.replacingOccurrences(of: "d-flat.vmdk", with: "renamed-flat.vmdk"), "renamed-flat.vmdk"),
            ("escape.vmdk", text.replacingOccurrences(of: "\"d-flat.vmdk\"", with: "\"../../etc/passwd\""), "leaves"),
            ("short.vmdk", text.replacingOccurrences(of: "RW 20480 FLAT", with: "RW 40960 FLAT"), "needs"),
            ("rdm.vmdk", text.replacingOccurrences(of: "RW 20480 FLAT \"d-flat.vmdk\" 0", with: "RW 20480 VMFSRDM \"d-flat.vmdk\""), "VMFSRDM"),
            ("weird.vmdk", text.replacingOccurrences(of: "RW 20480 FLAT", with: "RW 20480 MAGIC"), "MAGIC"),
            ("garbage.vmdk", text + "\nthis line means nothing\n", "line"),
            ("badnum.vmdk", text.replacingOccurrences(of: "RW 20480 FLAT", with: "RW 20x80 FLAT"), "number"),
        ]
        for (name, body, needle) in cases {
            let r = try variant(name, body)
            XCTAssertEqual(r.status, 1, "\(name): \(r.err)")
            XCTAssertTrue(r.err.contains(needle), "\(name): \(r.err)")
            XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0, name)
        }
        // More extent lines than the bound: refused before any of them is opened (the file
        // they name does not exist, so an open first would say that instead).
        let many = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n"
            + String(repeating: "RW 1 SPARSE a\n", count: 65537)
        let r0 = try variant("many.vmdk", many)
        XCTAssertEqual(r0.status, 1, r0.err)
        XCTAssertTrue(r0.err.contains("65537 extents (at most 65536)"), r0.err)
        // RDONLY extents make the whole mount read-only instead of disappearing.
        let ro = s.path("ro.vmdk")
        try text.replacingOccurrences(of: "RW 20480 FLAT", with: "RDONLY 20480 FLAT").write(toFile: ro, atomically: true, encoding: .utf8)
        let r = try Harness.run([Harness.rawmount, "mount", ro, s.mnt])
        XCTAssertTrue(r.err.contains("read-only"), r.err)
        XCTAssertEqual(open(s.mnt + "/ro.raw", O_WRONLY), -1)
        XCTAssertEqual(try Files.read(s.mnt + "/ro.raw").count, 10 << 20)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
    }

    func testDamagedSparseHeadersFailCleanly() throws {
        let s = try Scratch()
        let good = s.path("good.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", good, "100M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 1 0 64k", good])
        let bytes = try Files.read(good)
        let damages: [(String, Int, [UInt8], String)] = [
            ("grain0", 20, le(0, 8), "grainSize"),          // QEMU 7.2 divides by zero on COWD's twin of this
            ("grainodd", 20, le(100, 8), "grainSize"),
            ("grainhuge", 20, le(1 << 40, 8), "grainSize"),
            ("gte0", 44, le(0, 4), "numGTEsPerGT"),
            ("gtehuge", 44, le(1 << 20, 4), "numGTEsPerGT"),
            ("version", 4, le(9, 4), "version"),
            ("gdpast", 56, le(1 << 30, 8), "gdOffset"),
            ("overhead", 64, le(1 << 30, 8), "truncated"),
            ("capacityhuge", 12, le(1 << 50, 8), "capacity"),
            ("compressed", 8, le(0x30003, 4), "compression"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "vmdk", mountOptions: ["-r"], damages)
        // A grain directory entry pointing past the end: EIO for that range, no crash.
        let gdSector = Int(bytes[56]) | Int(bytes[57]) << 8
        var d = bytes
        d.replaceSubrange((gdSector * 512)..<(gdSector * 512 + 4), with: le(0xFFFF_FF00, 4))
        try s.assertDamageIsLocal(d, name: "gtpast.vmdk", bad: 0, good: 90 << 20)
    }
}

extension VMDKTests {
    /// `rawmount check` on VMDKs: clean for qemu-img's sub-formats; a grain past the end of the
    /// file (which qemu-img check also reports) and a redundant grain table that differs
    /// from its primary are errors (exit 2), each named.
    func testCheckFindsGrainsPastTheEndAndRedundantTableMismatch() throws {
        let s = try Scratch()
        for sub in ["monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized", "monolithicFlat"] {
            let img = s.path("\(sub).vmdk")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sub)", img, "8M"])
            if sub != "streamOptimized" { try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 7 0 256k", "-c", "write -P 8 5M 64k", img]) }
            let r = try Harness.run([Harness.rawmount, "check", img], check: false)
            XCTAssertEqual(r.status, 0, "\(sub): \(r.out)\(r.err)")
            XCTAssertTrue(r.out.contains("No errors were found"), r.out)
        }
        let img = s.path("monolithicSparse.vmdk")
        let bytes = try Files.read(img)
        let info = try Harness.run([Harness.rawmount, "check", img]).out
        XCTAssertTrue(info.contains("5 grains allocated"), info)  // 4 grains of 64 KiB at 0, 1 at 5 MiB
        // The primary grain directory (header offset 56, in sectors) -> grain table 0.
        func u64(_ d: Data, _ o: Int) -> Int { (0..<8).reduce(0) { $0 | Int(d[o + $1]) << (8 * $1) } }
        func u32(_ d: Data, _ o: Int) -> Int { Int(le(d, at: o, 4)) }
        let gd = u64(bytes, 56) * 512, rgd = u64(bytes, 48) * 512
        let gt = u32(bytes, gd) * 512, rgt = u32(bytes, rgd) * 512
        var past = bytes
        past.replaceSubrange(gt..<(gt + 4), with: le(UInt64(bytes.count / 512 + 100), 4))
        past.replaceSubrange(rgt..<(rgt + 4), with: le(UInt64(bytes.count / 512 + 100), 4))
        try past.write(to: URL(fileURLWithPath: s.path("past.vmdk")))
        let p = try Harness.run([Harness.rawmount, "check", s.path("past.vmdk")], check: false)
        XCTAssertEqual(p.status, 2, p.out + p.err)
        XCTAssertTrue(p.out.contains("guest offset 0 starts at sector") && p.out.contains("past the end"), p.out)
        XCTAssertNotEqual(try Harness.run(["qemu-img", "check", s.path("past.vmdk")], check: false).status, 0, "qemu-img agrees it is damaged")
        var differ = bytes
        differ.replaceSubrange(rgt..<(rgt + 4), with: le(0, 4))
        try differ.write(to: URL(fileURLWithPath: s.path("differ.vmdk")))
        let d = try Harness.run([Harness.rawmount, "check", s.path("differ.vmdk")], check: false)
        XCTAssertEqual(d.status, 2, d.out + d.err)
        XCTAssertTrue(d.out.contains("grain table 0 and its redundant copy differ"), d.out)
    }
}
