import Foundation
import TestSupport
import XCTest

/// qcow2 persistent dirty bitmaps kept through real mounts, with QEMU as the oracle:
/// `qemu-img bitmap` makes and changes them, `qemu-img info` reads their flags, and
/// `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME` reads their dirty extents,
/// which must equal the granularity-rounded union of what the test wrote.
final class QCOW2BitmapTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
        try Harness.tool("qemu-nbd")
        try Harness.tool("nbdinfo")
    }

    struct Extent: Equatable, CustomStringConvertible {
        var offset: UInt64, length: UInt64
        var description: String { "\(offset)+\(length)" }
    }

    /// A new qcow2 from qemu-img with bitmaps added by `qemu-img bitmap --add ARGS...` (each
    /// element: its arguments before the image, then the name).
    func makeImage(_ img: String, _ size: String, bitmaps: [[String]]) throws {
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, size])
        for b in bitmaps { try Harness.run(["qemu-img", "bitmap", "--add"] + b.dropLast() + [img, b.last!]) }
    }

    /// QEMU's reading of a bitmap: the dirty extents nbdinfo lists through qemu-nbd -B.
    func qemuDirty(_ img: String, _ bitmap: String, file: StaticString = #filePath, line: UInt = #line) throws -> [Extent] {
        let r = try Harness.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:\(bitmap)", "--",
                                 "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, img, "]"], file: file, line: line)
        return try dirtyExtents(json: r.out)
    }

    func dirtyExtents(json: String) throws -> [Extent] {
        let items = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        return items.compactMap { e in
            guard (e["type"] as? Int) == 1, let o = e["offset"] as? Int, let l = e["length"] as? Int else { return nil }
            return Extent(offset: UInt64(o), length: UInt64(l))
        }
    }

    /// The extents a set of byte ranges dirties at `granularity` (merged, clipped to `size`).
    func expected(_ ranges: [(UInt64, UInt64)], granularity g: UInt64, size: UInt64) -> [Extent] {
        var marks = ranges.filter { $0.1 > 0 }.map { ($0.0 / g * g, min(size, ($0.0 + $0.1 + g - 1) / g * g)) }.sorted { $0.0 < $1.0 }
        var out: [Extent] = []
        while !marks.isEmpty {
            var (a, b) = marks.removeFirst()
            while let next = marks.first, next.0 <= b { b = max(b, next.1); marks.removeFirst() }
            out.append(Extent(offset: a, length: b - a))
        }
        return out
    }

    /// qemu-img info's bitmaps: name -> (granularity, flags).
    func qemuBitmaps(_ img: String) throws -> [String: (UInt64, [String])] {
        let r = try Harness.run(["qemu-img", "info", "--output=json", img])
        let root = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        let data = (root?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        var out: [String: (UInt64, [String])] = [:]
        for b in data?["bitmaps"] as? [[String: Any]] ?? [] {
            out[b["name"] as! String] = (UInt64(b["granularity"] as! Int), (b["flags"] as? [String] ?? []).sorted())
        }
        return out
    }

    func writeRanges(_ raw: String, _ shadow: String, _ ranges: [(UInt64, UInt64)], zero: [(UInt64, UInt64, Int32)] = [],
                     file: StaticString = #filePath, line: UInt = #line) {
        let f = open(raw, O_RDWR), g = open(shadow, O_RDWR)
        defer { close(f); close(g) }
        var rng = SeededRandom(seed: 7)
        for (off, n) in ranges {
            let bytes = rng.bytes(Int(n))
            XCTAssertEqual(pwrite(f, bytes, Int(n), off_t(off)), Int(n), "write \(n) at \(off): \(errno)", file: file, line: line)
            XCTAssertEqual(pwrite(g, bytes, Int(n), off_t(off)), Int(n), file: file, line: line)
        }
        for (off, n, mode) in zero {
            XCTAssertEqual(fallocate(f, mode, off_t(off), off_t(n)), 0, "fallocate \(mode) \(n) at \(off): \(errno)", file: file, line: line)
            XCTAssertEqual(fallocate(g, mode, off_t(off), off_t(n)), 0, file: file, line: line)
        }
        XCTAssertEqual(fsync(f), 0, file: file, line: line)
    }

    func assertClean(_ img: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertEqual(check.status, 0, "\(what): qemu-img check: \(check.out)\(check.err)", file: file, line: line)
    }

    /// The SEEK_DATA/SEEK_HOLE extents of a file.
    func dataExtents(_ path: String) -> [Extent] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        var out: [Extent] = []
        var pos: off_t = 0
        while pos < size {
            let d = lseek(fd, pos, 3 /* SEEK_DATA */)
            if d < 0 { break }
            let h = lseek(fd, d, 4 /* SEEK_HOLE */)
            out.append(Extent(offset: UInt64(d), length: UInt64(h - d)))
            pos = h
        }
        return out
    }

    /// Granularities 4 KiB to 2 MiB at once, one bitmap disabled and one dirty before the
    /// mount (its bits survive, new ones add): after unaligned writes across granule and
    /// cluster edges, a zero range and a punched hole, QEMU reads exactly the rounded union
    /// in each enabled bitmap and the old contents in the disabled one; the image is clean and
    /// matches a shadow; flags are back to auto (no in-use).
    func testWritesZeroesAndDiscardsAreRecordedAsQEMUReadsThem() throws {
        let s = try Scratch()
        let size: UInt64 = 32 << 20
        for cluster in ["64k", "4k"] {
            let img = s.path("d.qcow2"), shadow = s.path("d.shadow")
            try? FileManager.default.removeItem(atPath: img)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cluster)", img, "\(size)"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 3M 100k", img])
            try Harness.run(["qemu-img", "bitmap", "--add", "-g", "64k", img, "before"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x12 7M 1k", img])  // QEMU records it into "before"
            let grans: [(String, UInt64)] = [("g4k", 4096), ("g64k", 65536), ("g2m", 2 << 20)]
            for (name, g) in grans { try Harness.run(["qemu-img", "bitmap", "--add", "-g", "\(g)", img, name]) }
            try Harness.run(["qemu-img", "bitmap", "--add", "--disable", "-g", "4k", img, "off"])
            try Harness.run(["qemu-img", "bitmap", "--add", "-g", "64k", img, "frozen"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x13 20M 5k", img])  // recorded into all enabled ones
            try Harness.run(["qemu-img", "bitmap", "--disable", img, "frozen"])
            let frozenBefore = try qemuDirty(img, "frozen")
            XCTAssertEqual(frozenBefore, expected([(20 << 20, 5 << 10)], granularity: 65536, size: size))
            try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))

            try s.mount(img)
            let writes: [(UInt64, UInt64)] = [(1, 1), (4095, 2), (65535, 3), (100_000, 70_000), ((2 << 20) - 1, 2), (5 << 20, 1 << 20),
                                              ((9 << 20) + 12345, 300_000), (size - 1, 1)]
            let zeroes: [(UInt64, UInt64, Int32)] = [((12 << 20) + 512, 200_000, 0x10), ((15 << 20) + 4096, 1 << 20, 0x03)]
            writeRanges(s.mnt + "/d.raw", shadow, writes, zero: zeroes)
            try s.unmount()
            try assertClean(img, cluster)
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, shadow], check: false)
            XCTAssertEqual(cmp.status, 0, "\(cluster): \(cmp.out)\(cmp.err)")

            let mine = writes + zeroes.map { ($0.0, $0.1) }
            let qemuWrites: [(UInt64, UInt64)] = [(20 << 20, 5 << 10)]
            for (name, g) in grans {
                XCTAssertEqual(try qemuDirty(img, name), expected(mine + qemuWrites, granularity: g, size: size), "\(cluster) \(name)")
            }
            XCTAssertEqual(try qemuDirty(img, "before"), expected(mine + qemuWrites + [(7 << 20, 1024)], granularity: 65536, size: size), "\(cluster) before")
            XCTAssertEqual(try qemuDirty(img, "off"), [], "\(cluster): a disabled bitmap recorded writes")
            XCTAssertEqual(try qemuDirty(img, "frozen"), frozenBefore, "\(cluster): a disabled bitmap lost its contents")
            let flags = try qemuBitmaps(img)
            XCTAssertEqual(flags["g4k"]?.1, ["auto"])
            XCTAssertEqual(flags["off"]?.1, [])
            XCTAssertEqual(flags["frozen"]?.1, [])
            XCTAssertEqual(flags.count, 6)
        }
    }

    /// The `.dirty-` files: dirty granules read the disk's bytes, clean ones read zeros and are
    /// holes, SEEK_DATA lists exactly the dump's extents and st_blocks counts the dirty bytes,
    /// on a writable mount (live, after more writes) and a read-only one (the image's sha
    /// unchanged). `rawmount bitmap dump --json` prints what nbdinfo prints.
    func testDirtyViewsShowTheChangedGranulesOnly() throws {
        let s = try Scratch()
        let size: UInt64 = 16 << 20
        let img = s.path("d.qcow2"), shadow = s.path("d.shadow")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "\(size)"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", img])
        try Harness.run(["qemu-img", "bitmap", "--add", "-g", "64k", img, "b0"])
        try Harness.run(["qemu-img", "bitmap", "--add", "-g", "512", img, "a/b%c#"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 70000", "-c", "write -z 3M 64k", img])
        try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))
        try s.mount(img)
        let names = try FileManager.default.contentsOfDirectory(atPath: s.mnt).sorted()
        XCTAssertEqual(names, ["d.dirty-a%2Fb%25c%23.raw", "d.dirty-b0.raw", "d.raw"])
        writeRanges(s.mnt + "/d.raw", shadow, [(10 << 20 + 100, 5000)])
        func checkView(_ view: String, _ want: [Extent], _ what: String) throws {
            XCTAssertEqual(dataExtents(view), want, "\(what): SEEK_DATA extents")
            let bytes = try Files.read(view), disk = try Files.read(shadow)
            XCTAssertEqual(UInt64(bytes.count), size)
            var expectBytes = Data(count: Int(size))
            for e in want { expectBytes.replaceSubrange(Int(e.offset) ..< Int(e.offset + e.length), with: disk[Int(e.offset) ..< Int(e.offset + e.length)]) }
            XCTAssertTrue(bytes == expectBytes, "\(what): view bytes differ from the disk's dirty granules")
            var st = stat()
            XCTAssertEqual(stat(view, &st), 0)
            XCTAssertEqual(UInt64(st.st_blocks) * 512, want.reduce(0) { $0 + $1.length }, "\(what): st_blocks")
        }
        let b0 = expected([(1 << 20, 70000), (3 << 20, 65536), (10 << 20 + 100, 5000)], granularity: 65536, size: size)
        let fine = expected([(1 << 20, 70000), (3 << 20, 65536), (10 << 20 + 100, 5000)], granularity: 512, size: size)
        usleep(1_100_000)  // attribute cache
        try checkView(s.mnt + "/d.dirty-b0.raw", b0, "writable b0")
        try checkView(s.mnt + "/d.dirty-a%2Fb%25c%23.raw", fine, "writable fine")
        // cp --sparse=always copies only the dirty granules.
        let copy = s.path("incr.raw")
        try Harness.run(["cp", "--sparse=always", s.mnt + "/d.dirty-b0.raw", copy])
        XCTAssertEqual(dataExtents(copy).reduce(0) { $0 + $1.length } <= b0.reduce(0) { $0 + $1.length }, true)
        try s.unmount()
        try assertClean(img, "after views")
        XCTAssertEqual(try qemuDirty(img, "b0"), b0)
        XCTAssertEqual(try qemuDirty(img, "a/b%c#"), fine)
        let dump = try Harness.run([Harness.rawmount, "bitmap", "dump", "--json", img, "b0"])
        let nbd = try Harness.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", img, "]"])
        XCTAssertEqual(dump.out.trimmingCharacters(in: .whitespacesAndNewlines), nbd.out.trimmingCharacters(in: .whitespacesAndNewlines))

        let sha = try Files.sha(img)
        try s.mount(img, options: ["--read-only"])
        try checkView(s.mnt + "/d.dirty-b0.raw", b0, "read-only b0")
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha, "a read-only mount changed the image")
        XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto"])
    }

    /// kill -9 while mounted leaves every bitmap in use (QEMU then refuses to trust it) and
    /// the image not corrupt. The next mount says which bitmaps are inconsistent, shows no
    /// view for them, never records into them or clears their flag; only `bitmap remove`
    /// works on them, and frees their clusters.
    func testKilledMountLeavesBitmapsInUseAndTheyStayInconsistent() throws {
        let s = try Scratch()
        let img = s.path("d.qcow2")
        try makeImage(img, "16M", bitmaps: [["b0"], ["--disable", "b1"]])
        try s.mount(img)
        FileManager.default.createFile(atPath: s.path("shadow"), contents: Data(count: 16 << 20))
        writeRanges(s.mnt + "/d.raw", s.path("shadow"), [(1 << 20, 4096)])
        guard let pid = try s.serverPid() else { XCTFail("no pid"); return }
        try s.killServer(pid)
        XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto", "in-use"])
        XCTAssertEqual(try qemuBitmaps(img)["b1"]?.1, ["in-use"])
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertTrue(check.status == 0 || check.status == 3, "killed mount left corruption: \(check.out)")

        let mount = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(mount.err.contains("'b0'") && mount.err.contains("inconsistent"), mount.err)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["d.raw"])
        writeRanges(s.mnt + "/d.raw", s.path("shadow"), [(2 << 20, 4096)])
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto", "in-use"])
        for verb in ["clear", "enable", "disable"] {
            let r = try Harness.run([Harness.rawmount, "bitmap", verb, img, "b0"], check: false)
            XCTAssertEqual(r.status, 1, verb)
            XCTAssertTrue(r.err.contains("inconsistent"), "\(verb): \(r.err)")
        }
        try Harness.run([Harness.rawmount, "bitmap", "remove", img, "b0"])
        try Harness.run([Harness.rawmount, "bitmap", "remove", img, "b1"])
        XCTAssertEqual(try qemuBitmaps(img).count, 0)
        let after = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertTrue(after.status == 0 || after.status == 3, after.out)
        let info = try Harness.run(["qemu-img", "info", img])
        XCTAssertFalse(info.out.contains("bitmaps:"), info.out)
    }

    /// Autoclear bit 0 cleared by hand (as a writer without bitmap support leaves it): a
    /// read-only mount changes nothing and shows no view; a writable open drops the extension
    /// with a note, and the bitmap clusters come back (qemu-img check: no leaks).
    func testStaleExtensionIsDroppedAndItsClustersFreed() throws {
        let s = try Scratch()
        let img = s.path("d.qcow2")
        try makeImage(img, "16M", bitmaps: [["b0"]])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", img])
        var header = [UInt8](try Files.read(img).prefix(96))
        header[95] &= ~1
        try Files.pwrite(img, [header[95]], at: 95)
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 3, "QEMU sees the stale bitmap clusters as leaks")
        let sha = try Files.sha(img)
        try s.mount(img, options: ["--read-only"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["d.raw"])
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha)
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("stale"), r.err)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        try assertClean(img, "after dropping the stale extension")
        XCTAssertEqual(try qemuBitmaps(img).count, 0)
    }

    /// Every verb, read back by QEMU: add (granularity, --disabled), enable, disable, clear,
    /// merge across granularities, remove; list --json agrees with qemu-img info; changing
    /// verbs are refused while a writer holds the image, and on a version 2 image.
    func testBitmapVerbsAgreeWithQEMU() throws {
        let s = try Scratch()
        let size: UInt64 = 8 << 20
        let img = s.path("d.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "\(size)"])
        func rm(_ args: String...) throws { try Harness.run([Harness.rawmount, "bitmap"] + args) }
        try rm("add", "--granularity", "4k", img, "fine")
        try rm("add", "--disabled", img, "coarse")
        try rm("add", "--granularity", "2M", img, "huge")
        var flags = try qemuBitmaps(img)
        XCTAssertEqual(flags["fine"]?.0, 4096); XCTAssertEqual(flags["fine"]?.1, ["auto"])
        XCTAssertEqual(flags["coarse"]?.0, 65536); XCTAssertEqual(flags["coarse"]?.1, [])
        XCTAssertEqual(flags["huge"]?.0, 2 << 20)
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write 100k 10k", img])  // QEMU records into the enabled ones
        try rm("enable", img, "coarse")
        try rm("disable", img, "huge")
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write 5M 1", img])
        XCTAssertEqual(try qemuDirty(img, "fine"), expected([(100 << 10, 10 << 10), (5 << 20, 1)], granularity: 4096, size: size))
        XCTAssertEqual(try qemuDirty(img, "coarse"), expected([(5 << 20, 1)], granularity: 65536, size: size))
        XCTAssertEqual(try qemuDirty(img, "huge"), expected([(100 << 10, 10 << 10)], granularity: 2 << 20, size: size))
        try rm("merge", img, "fine", "coarse")
        XCTAssertEqual(try qemuDirty(img, "coarse"), expected([(100 << 10, 10 << 10), (5 << 20, 1)], granularity: 65536, size: size))
        let list = try Harness.run([Harness.rawmount, "bitmap", "list", "--json", img])
        let items = try JSONSerialization.jsonObject(with: Data(list.out.utf8)) as? [[String: Any]] ?? []
        XCTAssertEqual(items.count, 3)
        for item in items {
            let name = item["name"] as! String
            XCTAssertEqual(UInt64(item["granularity"] as! Int), flags[name]?.0, name)
            let dirty = try qemuDirty(img, name).reduce(0) { $0 + $1.length }
            XCTAssertEqual(UInt64(item["dirty-bytes"] as! Int), dirty, name)
        }
        try rm("clear", img, "fine")
        XCTAssertEqual(try qemuDirty(img, "fine"), [])
        try rm("remove", img, "huge")
        flags = try qemuBitmaps(img)
        XCTAssertEqual(Set(flags.keys), ["fine", "coarse"])
        XCTAssertEqual(flags["coarse"]?.1, ["auto"])
        try assertClean(img, "after every verb")
        for bad in [["add", img, "fine"], ["remove", img, "nope"], ["add", "--granularity", "3000", img, "x"], ["merge", img, "nope", "fine"]] {
            let r = try Harness.run([Harness.rawmount, "bitmap"] + bad, check: false)
            XCTAssertEqual(r.status, 1, bad.joined(separator: " "))
            XCTAssertTrue(r.err.contains(img), "\(bad): \(r.err)")
        }
        // A writer holds the image: changing verbs are refused; qemu-img agrees afterwards.
        try s.mount(img)
        let locked = try Harness.run([Harness.rawmount, "bitmap", "add", img, "late"], check: false)
        XCTAssertEqual(locked.status, 1, locked.err)
        try s.unmount()
        XCTAssertNil(try qemuBitmaps(img)["late"])
        let v2 = s.path("v2.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"])
        let r = try Harness.run([Harness.rawmount, "bitmap", "add", v2, "b"], check: false)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("version 2"), r.err)
    }

    /// A directory QEMU would refuse (reserved flag bit 2) is refused writable with the
    /// bitmap named; read-only still mounts, shows no view and changes nothing.
    func testBitmapQEMUWouldRefuseBlocksWritingOnly() throws {
        let s = try Scratch()
        let img = s.path("d.qcow2")
        try makeImage(img, "16M", bitmaps: [["evil"]])
        // The bitmaps extension names the directory; flags are bytes 12-15 of its first entry.
        let bytes = [UInt8](try Files.read(img))
        var at = 112, dir = 0
        while at + 8 < 65536 {
            let type = bytes[at ..< at + 4].reduce(0) { $0 << 8 | UInt32($1) }, len = Int(bytes[at + 4 ..< at + 8].reduce(0) { $0 << 8 | UInt32($1) })
            if type == 0x2385_2875 { dir = Int(bytes[at + 24 ..< at + 32].reduce(0) { $0 << 8 | UInt64($1) }); break }
            if type == 0 { break }
            at += 8 + (len + 7) / 8 * 8
        }
        XCTAssertGreaterThan(dir, 0)
        try Files.pwrite(img, [bytes[dir + 15] | 4], at: UInt64(dir + 15))
        let sha = try Files.sha(img)
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt], check: false)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("'evil'") && r.err.contains(img), r.err)
        try s.mount(img, options: ["--read-only"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.mnt), ["d.raw"])
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha)
    }

    /// kill -9 inside the store at close, held by the test pause at each of its two orderings:
    /// - new data, table, directory and their refcounts durable, the header not yet naming
    ///   them: the old directory stands, every bitmap still in use (not trusted), and the new
    ///   clusters only leak (their refcounts reached the disk first);
    /// - the header names the new directory, the old clusters not yet freed: the stored
    ///   bitmap is complete and trusted (auto, not in use), and the old clusters only leak.
    func testKillDuringTheStoreLeavesACompleteBitmapAndOnlyLeaks() throws {
        let s = try Scratch()
        let size: UInt64 = 16 << 20
        let writes: [(UInt64, UInt64)] = [(1 << 20, 1 << 20), (9 << 20 + 1, 10)]
        // The pause is 3 s; the store starts right after the unmount.
        for (delay, headerWritten) in [(UInt32(1_500_000), false), (4_500_000, true)] {
            let img = s.path("d\(delay).qcow2"), shadow = s.path("d.shadow")
            try makeImage(img, "\(size)", bitmaps: [["b0"]])
            FileManager.default.createFile(atPath: shadow, contents: Data(count: Int(size)))
            try s.mount(img, environment: ["RAWMOUNT_TEST_QCOW2_PAUSE_US": "3000000"])
            writeRanges(s.mnt + "/d\(delay).raw", shadow, writes)  // the fsync pauses at the L1 write
            guard let pid = try s.serverPid() else { XCTFail("no pid"); return }
            let unmount = Process()
            unmount.executableURL = URL(fileURLWithPath: Harness.rawmount)
            unmount.arguments = ["unmount", s.mnt]
            try unmount.run()
            usleep(delay)
            try s.killServer(pid, waiting: unmount)
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(check.status, 3, "expected leaks only: \(check.out)")
            if headerWritten {
                XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto"], "the new directory was not in place when the old clusters were freed")
                XCTAssertEqual(try qemuDirty(img, "b0"), expected(writes, granularity: 65536, size: size))
            } else {
                XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto", "in-use"], "the header named the new directory before it was durable")
            }
        }
    }

    /// SIGTERM and SIGINT close cleanly: the bitmaps are stored and trusted again.
    func testSignalsStoreTheBitmaps() throws {
        let s = try Scratch()
        let size: UInt64 = 8 << 20
        let img = s.path("d.qcow2"), shadow = s.path("d.shadow")
        try makeImage(img, "\(size)", bitmaps: [["-g", "4k", "b0"]])
        FileManager.default.createFile(atPath: shadow, contents: Data(count: Int(size)))
        var written: [(UInt64, UInt64)] = []
        for (n, sig) in [SIGTERM, SIGINT].enumerated() {
            try s.mount(img)
            let w = (UInt64(n + 1) << 20 + 3, UInt64(5000))
            written.append(w)
            writeRanges(s.mnt + "/d.raw", shadow, [w])
            guard let pid = try s.serverPid() else { XCTFail("no pid"); return }
            kill(pid, sig)
            var waited = 0
            while kill(pid, 0) == 0 && waited < 100 { usleep(50_000); waited += 1 }
            XCTAssertNotEqual(kill(pid, 0), 0, "signal \(sig): the server did not exit")
            try s.forgetMount(s.mnt)
            XCTAssertEqual(try qemuBitmaps(img)["b0"]?.1, ["auto"], "signal \(sig)")
            XCTAssertEqual(try qemuDirty(img, "b0"), expected(written, granularity: 4096, size: size), "signal \(sig)")
            try assertClean(img, "signal \(sig)")
        }
    }

    /// A libvirt-style incremental backup chain kept through rawmount mounts, with QEMU
    /// writing in between: a full copy, then per round a checkpoint (the old bitmap disabled,
    /// a new one added), writes and discards through a mount and through qemu-io, and an
    /// incremental taken from the `.dirty-` view's data extents applied to the copy. The copy
    /// always equals the disk, and the view's extents equal QEMU's reading of the bitmap.
    func testIncrementalBackupChainThroughMounts() throws {
        let s = try Scratch()
        let size: UInt64 = 24 << 20
        let img = s.path("vm.qcow2"), backup = s.path("backup.raw"), shadow = s.path("shadow.raw")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "\(size)"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 6M", img])
        try Harness.run(["qemu-img", "bitmap", "--add", img, "ck0"])
        try s.qemuRaw(img).write(to: URL(fileURLWithPath: backup))  // the full backup at checkpoint 0
        try Files.read(backup).write(to: URL(fileURLWithPath: shadow))
        var rng = SeededRandom(seed: 99)
        for round in 0..<3 {
            try s.mount(img)
            var writes: [(UInt64, UInt64)] = []
            for _ in 0..<12 {
                let n = 1 + rng.next() % 200_000
                writes.append((rng.next() % (size - n), n))
            }
            let punch = (rng.next() % (size - (1 << 20)), UInt64(300_000))
            writeRanges(s.mnt + "/vm.raw", shadow, writes, zero: [(punch.0, punch.1, 0x03)])
            try s.unmount()
            let q = (UInt64(round) << 20 + 777, UInt64(4096))
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5\(round) \(q.0) \(q.1)", img])
            let g = try Files.read(shadow)
            var gb = [UInt8](g)
            for k in 0 ..< Int(q.1) { gb[Int(q.0) + k] = UInt8(0x50 + round) }
            try Data(gb).write(to: URL(fileURLWithPath: shadow))

            // The incremental: every data extent of the view, copied into the backup.
            let name = "ck\(round)"
            try s.mount(img, options: ["--read-only"])
            let view = s.mnt + "/vm.dirty-\(name).raw"
            let extents = dataExtents(view)
            XCTAssertEqual(extents, try qemuDirty(img, name), "round \(round): the view and QEMU disagree")
            XCTAssertEqual(extents, expected(writes + [punch, q], granularity: 65536, size: size), "round \(round)")
            let src = open(view, O_RDONLY), dst = open(backup, O_WRONLY)
            var buf = [UInt8](repeating: 0, count: 1 << 20)
            for e in extents {
                var done: UInt64 = 0
                while done < e.length {
                    let n = Int(min(UInt64(buf.count), e.length - done))
                    XCTAssertEqual(pread(src, &buf, n, off_t(e.offset + done)), n)
                    XCTAssertEqual(pwrite(dst, buf, n, off_t(e.offset + done)), n)
                    done += UInt64(n)
                }
            }
            close(src); close(dst)
            try s.unmount()
            XCTAssertTrue(try Files.read(backup) == s.qemuRaw(img), "round \(round): the restored chain differs from the disk")
            XCTAssertTrue(try Files.read(shadow) == s.qemuRaw(img), "round \(round): the disk differs from what was written")
            // The checkpoint: the old bitmap stops, a new one starts.
            try Harness.run([Harness.rawmount, "bitmap", "disable", img, name])
            try Harness.run([Harness.rawmount, "bitmap", "add", img, "ck\(round + 1)"])
            try assertClean(img, "round \(round)")
        }
        let flags = try qemuBitmaps(img)
        XCTAssertEqual(flags["ck3"]?.1, ["auto"])
        XCTAssertEqual(flags["ck0"]?.1, [])
    }

    /// A bitmap cluster whose every bit is set is stored as table entry 1 (all ones, no data
    /// cluster), as the format allows: QEMU reads the same extents, qemu-img check is clean,
    /// and the image grows by no data cluster for it.
    func testAllOnesClustersAreStoredWithoutData() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("ones.qcow2")
        // 4 KiB clusters: one bitmap cluster holds 32768 granules of 512 B, 16 MiB of disk.
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "40M"])
        try Harness.run(["qemu-img", "bitmap", "--add", "-g", "512", img, "b0"])
        try s.mount(img)
        try Harness.run(["dd", "if=/dev/zero", "of=\(s.mnt)/ones.raw", "bs=1M", "count=33", "conv=notrunc,fsync", "status=none"])
        try s.unmount()
        try assertClean(img, "all-ones bitmap")
        XCTAssertEqual(try qemuDirty(img, "b0"), [Extent(offset: 0, length: 33 << 20)])
        // Its table: the first two entries are 1 (all ones), the third names a data cluster.
        let d = try Files.read(img)
        func be(_ o: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(d[o + $1]) } }
        // Header extensions start at the header length (4 bytes at 100); find the bitmaps one.
        var ext = Int((0..<4).reduce(UInt64(0)) { $0 << 8 | UInt64(d[100 + $1]) })
        var directory = 0
        while ext + 8 <= d.count {
            let type = (0..<4).reduce(UInt64(0)) { $0 << 8 | UInt64(d[ext + $1]) }
            let len = Int((0..<4).reduce(UInt64(0)) { $0 << 8 | UInt64(d[ext + 4 + $1]) })
            if type == 0 { break }
            if type == 0x2385_2875 { directory = Int(be(ext + 8 + 16)); break }
            ext += 8 + (len + 7) / 8 * 8
        }
        XCTAssertGreaterThan(directory, 0, "no bitmaps extension")
        let table = Int(be(directory))
        XCTAssertEqual([be(table), be(table + 8)], [1, 1], "all-ones clusters were written as data")
        XCTAssertNotEqual(be(table + 16), 1)
    }
}
