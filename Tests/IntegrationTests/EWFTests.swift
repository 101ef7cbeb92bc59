import Foundation
import XCTest
import TestSupport

/// EWF evidence made by libewf's ewfacquire in every format it writes, judged by libewf's own
/// tools: bytes equal to the source and to ewfexport's output, stored digests checked as
/// ewfverify checks them, case metadata equal to ewfinfo's; damaged and hostile sets refused
/// naming the file and section.
final class EWFTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("ewfacquire")
    }

    /// A source disk: random, zero, repeated-byte and text runs, so chunks of every kind
    /// (incompressible, empty, compressible) occur.
    private func source(_ s: Scratch, name: String = "src.raw", bytes count: Int = 6 << 20, seed: UInt64 = 7) throws -> (path: String, bytes: Data) {
        var rng = SeededRandom(seed: seed)
        var d = Data(capacity: count)
        var k = 0
        while d.count < count {
            let n = min(48 * 1024 + 512 * (k % 7), count - d.count)
            switch k % 4 {
            case 0: d += rng.bytes(n)
            case 1: d += Data(count: n)
            case 2: d += Data(repeating: UInt8(truncatingIfNeeded: k), count: n)
            default: d += Data(String(repeating: "evidence line \(k) ", count: n / 16 + 1).utf8.prefix(n))
            }
            k += 1
        }
        let path = s.path(name)
        try d.write(to: URL(fileURLWithPath: path))
        return (path, d)
    }

    @discardableResult
    private func acquire(_ src: String, to target: String, _ options: [String]) throws -> String {
        try Harness.run(["ewfacquire", "-u", "-q"] + options + ["-t", target, src])
        let dir = (target as NSString).deletingLastPathComponent, stem = (target as NSString).lastPathComponent
        let first = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(stem + ".") && $0.lowercased().hasSuffix("01") }
        XCTAssertEqual(first.count, 1, "\(options): \(first)")
        return dir + "/" + first[0]
    }

    private func md5(_ path: String) throws -> String { String(try Harness.run(["md5sum", path]).out.prefix(32)) }

    /// What ewfexport makes of the set: the oracle's raw bytes.
    private func exported(_ s: Scratch, _ first: String) throws -> String {
        let out = s.path("export-\(UUID().uuidString.prefix(6))")
        try Harness.run(["ewfexport", "-u", "-q", "-f", "raw", "-t", out, first])
        return out + ".raw"
    }

    func testEveryFormatEwfacquireWritesReadsAsItsSource() throws {
        let s = try Scratch()
        let (src, _) = try source(s)
        let want = try md5(src)
        let cases: [(format: String, sectors: String, compression: String)] = [
            ("ewf", "64", "fast"), ("smart", "64", "best"), ("ftk", "128", "fast"), ("encase2", "64", "none"),
            ("encase3", "64", "best"), ("encase4", "64", "empty-block"), ("encase5", "256", "fast"), ("encase6", "16", "none"),
            ("encase6", "1024", "best"), ("encase7", "64", "fast"), ("linen5", "64", "none"), ("linen6", "32", "fast"),
            ("linen7", "64", "empty-block"), ("ewfx", "64", "best"),
        ]
        for (i, c) in cases.enumerated() {
            let first = try acquire(src, to: s.path("ev\(i)"), ["-f", c.format, "-b", c.sectors, "-c", c.compression])
            let what = "\(c.format) -b \(c.sectors) -c \(c.compression)"
            XCTAssertEqual(try md5(try exported(s, first)), want, "\(what): ewfexport")
            let hash = try Harness.run([Harness.rawmount, "hash", "-a", "md5", first]).out
            XCTAssertTrue(hash.contains(want), "\(what): \(hash)")
            let v = try Harness.run([Harness.rawmount, "verify", first], check: false)
            XCTAssertEqual(v.status, 0, "\(what): \(v.out) \(v.err)")
            XCTAssertTrue(v.out.contains("verified"), v.out)
            let info = try Harness.run([Harness.rawmount, "info", first]).out
            XCTAssertTrue(info.contains("format: ewf") && info.contains("(6291456 bytes)")
                          && info.contains("sectors per chunk: \(c.sectors)"), "\(what): \(info)")
        }
        // Mounted: the raw view is the source, read-only, and the evidence is unchanged.
        let first = s.path("ev5.E01")
        let before = try Files.sha(first)
        let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, first, s.mnt])
        try s.forgetMount(s.mnt)
        XCTAssertTrue(r.err.contains("read-only"), r.err)
        XCTAssertEqual(try Files.read(s.mnt + "/ev5.raw"), try Files.read(src))
        XCTAssertEqual(open(s.mnt + "/ev5.raw", O_WRONLY), -1)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try Files.sha(first), before)
    }

    /// A set of 105 segments (E01 ... E99, EAA ... EAF, as libewf names them) and SMART
    /// segments, found from the first file; random reads equal the source.
    func testSegmentSetsAreFoundFromTheFirstSegment() throws {
        let s = try Scratch()
        var rng = SeededRandom(seed: 3)
        let big = Data(rng.bytes(105 << 20))
        let src = s.path("big.raw")
        try big.write(to: URL(fileURLWithPath: src))
        let first = try acquire(src, to: s.path("set"), ["-f", "encase6", "-c", "none", "-S", "1MiB"])
        let names = try FileManager.default.contentsOfDirectory(atPath: s.dir).filter { $0.hasPrefix("set.") }
        XCTAssertTrue(names.contains("set.E99") && names.contains("set.EAA") && names.contains("set.EAB"), "\(names.sorted())")
        let info = try Harness.run([Harness.rawmount, "info", first]).out
        XCTAssertTrue(info.contains("segments: \(names.count)"), info)
        try s.mount(first)
        let raw = s.mnt + "/set.raw"
        XCTAssertEqual(try Files.size(raw), UInt64(big.count))
        for _ in 0..<200 {
            let at = rng.next() % UInt64(big.count - 70000), n = 1 + Int(rng.next() % 70000)
            XCTAssertEqual(try Files.pread(raw, count: n, at: at), big[Int(at)..<(Int(at) + n)], "at \(at)")
        }
        XCTAssertEqual(try md5(raw), try md5(src))
        try s.unmount()
        // A later segment is not the set: the user is told which file to open.
        let r = try Harness.run([Harness.rawmount, "info", s.path("set.E02")], check: false)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("segment 2") && r.err.contains("first segment"), r.err)
        // SMART and original-EWF sets: lowercase .s01/.e01 names, chunks inside table sections.
        let (small, _) = try source(s, name: "small.raw", bytes: 5 << 20)
        for f in ["smart", "ewf"] {
            let one = try acquire(small, to: s.path("old-\(f)"), ["-f", f, "-c", "best", "-S", "1MiB"])
            XCTAssertTrue(one.hasSuffix(f == "smart" ? ".s01" : ".e01"), one)
            XCTAssertTrue(try Harness.run([Harness.rawmount, "hash", "-a", "md5", one]).out.contains(try md5(small)), f)
        }
    }

    /// info shows what ewfinfo shows: case values, media, stored digests.
    func testCaseMetadataMatchesEwfinfo() throws {
        let s = try Scratch()
        let (src, _) = try source(s, bytes: 2 << 20)
        let first = try acquire(src, to: s.path("case"), [
            "-f", "encase6", "-C", "2026-0042", "-D", "Seized laptop, disk 1", "-e", "J. Examiner", "-E", "EV-7/a",
            "-N", "Found in the \"red\" bag", "-m", "removable", "-M", "logical", "-d", "sha1", "-c", "fast",
        ])
        let env = ["TZ=UTC"]
        let theirs = try Harness.run(["env"] + env + ["ewfinfo", first]).out
        let ours = try Harness.run(["env"] + env + [Harness.rawmount, "info", first]).out
        func value(_ text: String, _ label: String) -> String? {
            text.split(separator: "\n").first { $0.trimmingCharacters(in: .whitespaces).hasPrefix(label + ":") }
                .map { String($0.split(separator: ":", maxSplits: 1)[1]).trimmingCharacters(in: .whitespaces) }
        }
        let pairs = [("Case number", "case number"), ("Description", "description"), ("Examiner name", "examiner name"),
                     ("Evidence number", "evidence number"), ("Notes", "notes"), ("Acquisition date", "acquisition date"),
                     ("System date", "system date"), ("Operating system used", "operating system used"),
                     ("Software version used", "software version used"), ("Media type", "media type"), ("Is physical", "is physical"),
                     ("Bytes per sector", "bytes per sector"), ("Number of sectors", "sectors"), ("MD5", "stored MD5"), ("SHA1", "stored SHA1")]
        for (their, our) in pairs {
            let t = try XCTUnwrap(value(theirs, their), "ewfinfo has no \(their): \(theirs)")
            XCTAssertEqual(value(ours, our), t, "\(our) in:\n\(ours)")
        }
        let json = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "info", "--json", first]).out.utf8)) as? [String: Any]
        let details = try XCTUnwrap(json?["details"] as? [String: String])
        XCTAssertEqual(details["notes"], "Found in the \"red\" bag")
        XCTAssertEqual(details["stored MD5"], try md5(src))
    }

    /// verify (and hash --verify without a digest) against the stored MD5/SHA-1: 0 when they
    /// match, 1 when the stored digest differs (ewfverify fails it too), 2 when a chunk is
    /// damaged, named; a damaged chunk reads EIO through the mount, its neighbours do not.
    func testVerifyComparesTheStoredDigests() throws {
        let s = try Scratch()
        let (src, _) = try source(s, bytes: 3 << 20)
        let first = try acquire(src, to: s.path("v"), ["-f", "encase6", "-d", "sha1", "-c", "none"])
        XCTAssertEqual(try Harness.run([Harness.rawmount, "verify", first], check: false).status, 0)
        let h = try Harness.run([Harness.rawmount, "hash", "--verify", first], check: false)
        XCTAssertEqual(h.status, 0, h.out + h.err)
        XCTAssertTrue(h.out.contains("SHA1 computed") && h.out.contains("match"), h.out)
        let json = try Harness.run([Harness.rawmount, "verify", "--json", first]).out
        XCTAssertTrue(json.contains("\"verified\": true"), json)

        // A different MD5 in the hash and digest sections, checksums made right: a mismatch.
        var d = try Files.read(first)
        for sec in EWFFile.sections(d) where sec.type == "hash" || sec.type == "digest" {
            let data = sec.offset + 76
            d[data] ^= 0xFF
            let sumAt = data + (sec.type == "hash" ? 32 : 76)
            EWFFile.put32(&d, sumAt, EWFFile.adler32(d[data..<sumAt]))
        }
        let tampered = s.path("t.E01")
        try d.write(to: URL(fileURLWithPath: tampered))
        let t = try Harness.run([Harness.rawmount, "verify", tampered], check: false)
        XCTAssertEqual(t.status, 1, t.out + t.err)
        XCTAssertTrue(t.out.contains("MISMATCH"), t.out)
        XCTAssertNotEqual(try Harness.run(["ewfverify", "-q", tampered], check: false).status, 0)

        // One byte of a stored chunk changed: that chunk fails its checksum.
        var c = try Files.read(first)
        let sectors = try XCTUnwrap(EWFFile.sections(c).first { $0.type == "sectors" })
        let chunk5 = sectors.offset + 76 + 5 * (32768 + 4)
        c[chunk5 + 100] ^= 0x01
        let damaged = s.path("d.E01")
        try c.write(to: URL(fileURLWithPath: damaged))
        let v = try Harness.run([Harness.rawmount, "verify", damaged], check: false)
        XCTAssertEqual(v.status, 2, v.out + v.err)
        XCTAssertTrue(v.err.contains("d.E01") && v.err.contains("chunk 5") && v.err.contains("checksum"), v.err)
        XCTAssertNotEqual(try Harness.run(["ewfverify", "-q", damaged], check: false).status, 0)
        try s.mount(damaged)
        let fd = open(s.mnt + "/d.raw", O_RDONLY)
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(pread(fd, &buf, 4096, 5 * 32768 + 8192), -1)
        XCTAssertEqual(errno, EIO)
        XCTAssertEqual(pread(fd, &buf, 4096, 4 * 32768), 4096)
        XCTAssertEqual(pread(fd, &buf, 4096, 6 * 32768), 4096)
        XCTAssertEqual(Data(buf), try Files.pread(src, count: 4096, at: 6 * 32768))
        // A part of a chunk read (and checked) whole before: read alone, the same bytes.
        var whole = [UInt8](repeating: 0, count: 32768)
        XCTAssertEqual(pread(fd, &whole, 32768, 7 * 32768), 32768)
        XCTAssertEqual(pread(fd, &buf, 4096, 7 * 32768 + 12288), 4096)
        XCTAssertEqual(Data(buf), try Files.pread(src, count: 4096, at: 7 * 32768 + 12288))
        // A read of several whole chunks takes them in one preadv: the damaged chunk among
        // them fails the request; a run without it reads the source.
        let dfd = open(s.mnt + "/d.raw", O_RDONLY | 0o40000 /* O_DIRECT: one request of 4 chunks */)
        defer { close(dfd) }
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 * 32768, alignment: 4096)
        defer { big.deallocate() }
        XCTAssertEqual(pread(dfd, big.baseAddress, big.count, 4 * 32768), -1)
        XCTAssertEqual(errno, EIO)
        XCTAssertEqual(pread(dfd, big.baseAddress, big.count, 8 * 32768), big.count)
        XCTAssertEqual(Data(big), try Files.pread(src, count: big.count, at: 8 * 32768))
    }

    /// An error2 section (what EnCase and ewfacquire write for unreadable source sectors),
    /// added by hand as the format lays it out: info lists the ranges ewfinfo lists.
    func testAcquisitionErrorsAreShown() throws {
        let s = try Scratch()
        let (src, _) = try source(s, bytes: 1 << 20)
        let first = try acquire(src, to: s.path("e"), ["-f", "encase6", "-c", "fast"])
        var d = try Files.read(first)
        let done = try XCTUnwrap(EWFFile.sections(d).last)
        XCTAssertEqual(done.type, "done")
        d.removeSubrange(done.offset...)
        let ranges: [(UInt32, UInt32)] = [(100, 8), (2000, 64)]
        var body = Data(count: 520)
        EWFFile.put32(&body, 0, UInt32(ranges.count))
        EWFFile.put32(&body, 516, EWFFile.adler32(body[0..<516]))
        var entries = Data()
        for (first, count) in ranges {
            var e = Data(count: 8)
            EWFFile.put32(&e, 0, first); EWFFile.put32(&e, 4, count)
            entries += e
        }
        body += entries
        var sum = Data(count: 4)
        EWFFile.put32(&sum, 0, EWFFile.adler32(entries))
        body += sum
        let at = d.count
        d += EWFFile.descriptor("error2", at: at, next: at + 76 + body.count, size: 76 + body.count) + body
        d += EWFFile.descriptor("done", at: d.count, next: d.count, size: 0)
        let path = s.path("errors.E01")
        try d.write(to: URL(fileURLWithPath: path))
        let theirs = try Harness.run(["ewfinfo", path]).out
        XCTAssertTrue(theirs.contains("100") && theirs.contains("2000"), "ewfinfo does not read the section: \(theirs)")
        let ours = try Harness.run([Harness.rawmount, "info", path]).out
        XCTAssertTrue(ours.contains("acquisition errors: sectors 100-107, sectors 2000-2063"), ours)
        XCTAssertTrue(try Harness.run([Harness.rawmount, "hash", "-a", "md5", path]).out.contains(try md5(src)))
    }

    func testDamagedAndHostileSetsAreRefusedNamingTheFile() throws {
        let s = try Scratch()
        let (src, _) = try source(s, bytes: 4 << 20)
        try acquire(src, to: s.path("h"), ["-f", "encase6", "-c", "none", "-S", "1MiB"])
        let segs = try FileManager.default.contentsOfDirectory(atPath: s.dir).filter { $0.hasPrefix("h.E") }.sorted()
        XCTAssertGreaterThanOrEqual(segs.count, 3, "\(segs)")
        func copySet(_ name: String) throws -> String {
            for seg in segs { try FileManager.default.copyItem(atPath: s.path(seg), toPath: s.path(name + seg.dropFirst(1))) }
            return s.path(name + ".E01")
        }
        // The last segment cut short.
        let cut = try copySet("cut")
        let last = s.path("cut" + segs.last!.dropFirst(1))
        try Harness.run(["truncate", "-s", String(try Files.size(last) / 2), last])
        try s.assertMountRefused(["-r", cut], mentions: [String(last.split(separator: "/").last!), "truncated"], "truncated segment")
        // A middle segment missing.
        let gap = try copySet("gap")
        try FileManager.default.removeItem(atPath: s.path("gap.E02"))
        try s.assertMountRefused(["-r", gap], mentions: ["gap.E02", "missing"], "missing segment")
        // A segment of another acquisition (other media) in the middle.
        let (other, _) = try source(s, name: "other.raw", bytes: 5 << 20, seed: 9)
        try acquire(other, to: s.path("other"), ["-f", "encase6", "-c", "none", "-S", "1MiB"])
        let mixed = try copySet("mixed")
        try FileManager.default.removeItem(atPath: s.path("mixed.E02"))
        try FileManager.default.copyItem(atPath: s.path("other.E02"), toPath: s.path("mixed.E02"))
        try s.assertMountRefused(["-r", mixed], mentions: ["mixed.E02", "another set"], "foreign segment")

        let one = try acquire(src, to: s.path("one"), ["-f", "encase6", "-c", "fast"])
        let bytes = try Files.read(one)
        let secs = EWFFile.sections(bytes)
        // A section chain that loops back, its descriptor checksum made right.
        var loop = bytes
        let vol = try XCTUnwrap(secs.first { $0.type == "volume" })
        loop.replaceSubrange(vol.offset..<(vol.offset + 76), with: EWFFile.descriptor("volume", at: vol.offset, next: 13, size: 0))
        try loop.write(to: URL(fileURLWithPath: s.path("loop.E01")))
        try s.assertMountRefused(["-r", s.path("loop.E01")], mentions: ["loop.E01", "loop"], "section loop")
        // Table entries pointing past the segment (both copies, checksums made right).
        var far = bytes
        for t in secs where t.type == "table" || t.type == "table2" {
            let n = Int(EWFFile.le32(far, t.offset + 76))
            let entries = t.offset + 76 + 24
            EWFFile.put32(&far, entries + 4 * (n - 1), 0x7FFF_0000)
            EWFFile.put32(&far, entries + 4 * n, EWFFile.adler32(far[entries..<(entries + 4 * n)]))
        }
        try far.write(to: URL(fileURLWithPath: s.path("far.E01")))
        let fr = try Harness.run([Harness.rawmount, "hash", s.path("far.E01")], check: false)
        XCTAssertEqual(fr.status, 2)
        XCTAssertTrue(fr.err.contains("far.E01") && fr.err.contains("outside its chunk data"), fr.err)
        // A compressed chunk whose stream inflates to twice the chunk size: EIO, the chunk named.
        var big = bytes
        let table0 = try XCTUnwrap(secs.first { $0.type == "table" })
        let base = Int(EWFFile.le64(big, table0.offset + 76 + 8))
        let n0 = Int(EWFFile.le32(big, table0.offset + 76))
        let entry = try XCTUnwrap((0..<n0).first { EWFFile.le32(big, table0.offset + 100 + 4 * $0) & 0x8000_0000 != 0 && $0 > 0 })
        let at = base + Int(EWFFile.le32(big, table0.offset + 100 + 4 * entry) & 0x7FFF_FFFF)
        let stream = try Harness.run(["python3", "-c", "import sys,zlib; sys.stdout.write(zlib.compress(bytes(65536)).hex())"]).out
        let inflating = stride(from: 0, to: stream.count, by: 2).map { i -> UInt8 in
            UInt8(stream[stream.index(stream.startIndex, offsetBy: i)..<stream.index(stream.startIndex, offsetBy: i + 2)], radix: 16)!
        }
        big.replaceSubrange(at..<(at + inflating.count), with: inflating)
        try big.write(to: URL(fileURLWithPath: s.path("big.E01")))
        let bg = try Harness.run([Harness.rawmount, "hash", s.path("big.E01")], check: false)
        XCTAssertEqual(bg.status, 2)
        XCTAssertTrue(bg.err.contains("big.E01") && bg.err.contains("chunk \(entry)"), bg.err)
        // A damaged first table falls back to its table2 copy.
        var mirror = bytes
        let table = try XCTUnwrap(secs.first { $0.type == "table" })
        mirror[table.offset + 76 + 24 + 8] ^= 0xFF
        try mirror.write(to: URL(fileURLWithPath: s.path("mirror.E01")))
        XCTAssertEqual(try Harness.run([Harness.rawmount, "verify", s.path("mirror.E01")], check: false).status, 0)
        // So does a table whose header fails its checksum.
        var header = bytes
        header[table.offset + 76 + 1] ^= 0x01
        try header.write(to: URL(fileURLWithPath: s.path("header.E01")))
        XCTAssertEqual(try Harness.run([Harness.rawmount, "verify", s.path("header.E01")], check: false).status, 0)
        // EWF2 and logical evidence: refused by name, not shown as raw bytes.
        for (name, sig) in [("v2.Ex01", "EVF2\r\n\u{81}\0"), ("files.L01", "LVF\t\r\n\u{FF}\0")] {
            var b = bytes
            b.replaceSubrange(0..<8, with: Array(sig.unicodeScalars.map { UInt8($0.value) }))
            try b.write(to: URL(fileURLWithPath: s.path(name)))
            try s.assertMountRefused(["-r", s.path(name)], mentions: [name, name.hasSuffix("L01") ? "logical evidence" : "EWF2"], name)
        }
    }

    /// Small reads in every order through a mount (O_DIRECT): each chunk's first read checks it whole,
    /// later ones read (stored) or inflate (compressed) only as far as they need; every 4 KiB
    /// block, visited in random order, equals the source, for stored and compressed chunks.
    func testSmallReadsInAnyOrderReadTheSource() throws {
        let s = try Scratch()
        // Larger than the mount's 16 MiB chunk cache, so later reads miss it. Its all-zero
        // chunks are read again from the mount's zero marks, and its chunks of one other
        // byte value must not be taken for them.
        let (src, _) = try source(s, bytes: 40 << 20)
        for (name, options) in [("best", ["-c", "best", "-b", "64"]), ("none", ["-c", "none", "-b", "16"])] {
            let first = try acquire(src, to: s.path("r-\(name)"), ["-f", "encase6"] + options)
            try s.mount(first, options: ["-r"])
            let raw = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: s.mnt).first { $0.hasSuffix(".raw") })
            // O_DIRECT, so each read reaches the server as it is (no page cache, no readahead).
            let script = """
                import mmap, os, random, sys
                src = open(sys.argv[1], 'rb').read()
                fd = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECT)
                buf = mmap.mmap(-1, 4096)
                order = list(range(len(src) // 4096)); random.Random(11).shuffle(order)
                wrong = 0
                for extra, size in ((0, 4096), (1024, 2048)):
                    for b in order:
                        at = b * 4096 + extra
                        n = os.preadv(fd, [memoryview(buf)[:size]], at)
                        wrong += bytes(buf[:n]) != src[at:at + size]
                print(wrong)
                """
            let out = try Harness.run(["python3", "-c", script, src, s.mnt + "/" + raw]).out
            let wrong = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            XCTAssertEqual(wrong, 0, name)
            try s.unmount()
        }
    }

    /// Chunks a mount has checked are answered from the mapped segment (stored ones) or from
    /// zeros (zero ones) without a copy: the second read of every byte, buffered and
    /// O_DIRECT, equals the source. A segment that shrinks under the mount fails the read of
    /// what it lost (EIO, logged), never a crash or other bytes, and the rest still reads.
    func testCheckedChunksAreLentAndAShrunkSegmentFailsTheRead() throws {
        let s = try Scratch()
        let (src, data) = try source(s, bytes: 6 << 20)
        let first = try acquire(src, to: s.path("l"), ["-f", "encase6", "-c", "none"])
        try s.mount(first, options: ["-r"])
        let raw = s.mnt + "/l.raw"
        for pass in 0..<3 { XCTAssertTrue(try Files.read(raw) == data, "buffered pass \(pass)") }
        let fd = open(raw, O_RDONLY | 0o40000 /* O_DIRECT */)
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { big.deallocate() }
        for pass in 0..<2 {
            for at in stride(from: 0, to: data.count, by: big.count) {
                let n = pread(fd, big.baseAddress, big.count, off_t(at + 512))
                XCTAssertEqual(n, min(big.count, data.count - at - 512), "O_DIRECT pass \(pass) at \(at + 512)")
                if n > 0 { XCTAssertTrue(Data(big[0..<n]) == data[(at + 512) ..< (at + 512 + n)], "O_DIRECT pass \(pass) at \(at + 512)") }
            }
        }
        // The segment loses its second half under the mount.
        let half = try Files.size(first) / 2
        XCTAssertEqual(truncate(first, off_t(half)), 0)
        XCTAssertEqual(pread(fd, big.baseAddress, 65536, off_t(data.count - 65536 * 4)), -1)
        XCTAssertEqual(errno, EIO)
        XCTAssertEqual(pread(fd, big.baseAddress, 65536, 65536), 65536)
        XCTAssertTrue(Data(big[0..<65536]) == data[65536 ..< 131072])
        // The server logs after the kernel has failed the read: give it a moment.
        var log = ""
        for _ in 0..<100 where !log.contains("could not copy the image's mapped bytes") {
            usleep(50_000)
            log = Files.readAll(s.serverLog)
        }
        XCTAssertTrue(log.contains("could not copy the image's mapped bytes"), log)
        close(fd)
        try s.unmount()
    }

    /// The rest of rawmount works on evidence unchanged: partitions as files, the overlay
    /// for writes (the evidence untouched), convert to qcow2 (qemu-img compare equal).
    func testPartitionsOverlayAndConvert() throws {
        let s = try Scratch()
        let (src, _) = try source(s, bytes: 8 << 20)
        try Harness.run(["sfdisk", "-q", src], input: Data("label: dos\nstart=2048, size=8192, type=83\n".utf8))
        let first = try acquire(src, to: s.path("disk"), ["-f", "encase6", "-c", "fast"])
        let before = try Files.sha(first)
        let overlay = s.path("notes.qcow2")
        try s.mount(first, options: ["--overlay", overlay])
        XCTAssertEqual(try Files.pread(s.mnt + "/disk-p1.raw", count: 4096, at: 0), try Files.pread(src, count: 4096, at: 2048 * 512))
        try Files.pwrite(s.mnt + "/disk.raw", Array(repeating: 0xAB, count: 8192), at: 3 << 20)
        try s.unmount()
        XCTAssertEqual(try Files.sha(first), before)
        // (QEMU has no EWF driver: the overlay is checked without opening its backing file.)
        let bare = "json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"file\",\"filename\":\"\(overlay)\"}}"
        XCTAssertEqual(try Harness.run(["qemu-img", "check", bare], check: false).status, 0)
        let out = s.path("disk.qcow2")
        try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", first, out])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, src], check: false).status, 0)
    }
}

/// Just enough of the EWF layout to damage files on purpose (sections, Adler-32).
enum EWFFile {
    static func le32(_ d: Data, _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(d[d.startIndex + o + $1]) << (8 * $1) } }
    static func le64(_ d: Data, _ o: Int) -> UInt64 { UInt64(le32(d, o)) | UInt64(le32(d, o + 4)) << 32 }
    static func put32(_ d: inout Data, _ o: Int, _ v: UInt32) { for k in 0..<4 { d[d.startIndex + o + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) } }
    static func put64(_ d: inout Data, _ o: Int, _ v: UInt64) { put32(&d, o, UInt32(truncatingIfNeeded: v)); put32(&d, o + 4, UInt32(v >> 32)) }
    static func adler32(_ d: Data) -> UInt32 {
        var a: UInt32 = 1, b: UInt32 = 0
        for byte in d { a = (a + UInt32(byte)) % 65521; b = (b + a) % 65521 }
        return b << 16 | a
    }
    static func sections(_ d: Data) -> [(type: String, offset: Int, next: Int)] {
        var out: [(String, Int, Int)] = [], at = 13
        while at + 76 <= d.count && out.count < 10000 {
            let type = String(decoding: d[at..<(at + 16)].prefix { $0 != 0 }, as: UTF8.self)
            let next = Int(le64(d, at + 16))
            out.append((type, at, next))
            if next <= at { break }
            at = next
        }
        return out
    }
    static func descriptor(_ type: String, at: Int, next: Int, size: Int) -> Data {
        var d = Data(count: 76)
        d.replaceSubrange(0..<type.utf8.count, with: Array(type.utf8))
        put64(&d, 16, UInt64(next)); put64(&d, 24, UInt64(size))
        put32(&d, 72, adler32(d[0..<72]))
        return d
    }
}
