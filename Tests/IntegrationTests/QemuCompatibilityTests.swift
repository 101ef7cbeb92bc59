import Foundation
import XCTest

/// The qemu-img habits: sizes and creation options, `info`/`check` JSON, `map` and `convert`,
/// each checked against qemu-img itself.
final class QemuCompatibilityTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    private func json(_ text: String) throws -> Any { try JSONSerialization.jsonObject(with: Data(text.utf8)) }

    func testCreateTakesQemuImgSizesAndOptionsAndPrintsItsLine() throws {
        let s = try Scratch()
        let cases: [(format: String, args: [String], size: String)] = [
            ("qcow2", ["-o", "cluster_size=4k,lazy_refcounts=on"], "1.5G"),
            ("qcow2", [], "100000"),
            ("qed", [], "1.5G"),
            ("vdi", ["-o", "static=on"], "1M"),
            ("raw", [], "3M"),
        ]
        for (i, c) in cases.enumerated() {
            let ours = s.path("ours\(i).\(c.format)"), theirs = s.path("theirs\(i).\(c.format)")
            let r = try Harness.run([Harness.rawmount, "create", "-f", c.format] + c.args + [ours, c.size])
            let q = try Harness.run(["qemu-img", "create", "-f", c.format] + c.args + [theirs, c.size])
            let size = try json(try Harness.run(["qemu-img", "info", "--output=json", ours]).out) as? [String: Any]
            let want = try json(try Harness.run(["qemu-img", "info", "--output=json", theirs]).out) as? [String: Any]
            XCTAssertEqual(size?["virtual-size"] as? Int, want?["virtual-size"] as? Int, "\(c): virtual size")
            XCTAssertEqual(size?["cluster-size"] as? Int, want?["cluster-size"] as? Int, "\(c): cluster size")
            // qemu-img's line names its size as given; ours the (rounded) size created.
            let line = r.out.replacingOccurrences(of: "ours\(i)", with: "theirs\(i)")
            if c.size == "100000" {
                XCTAssertTrue(r.err.contains("rounded up to 100352"), r.err)
                XCTAssertEqual(line, q.out.replacingOccurrences(of: "size=100000", with: "size=100352"))
            } else if c.format != "qed" {
                XCTAssertEqual(line, q.out, "\(c): Formatting line")
            }
        }
        let lazy = try json(try Harness.run(["qemu-img", "info", "--output=json", s.path("ours0.qcow2")]).out) as? [String: Any]
        let data = (lazy?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        XCTAssertEqual(data?["lazy-refcounts"] as? Bool, true)
        // -b/-F as qemu-img spells them; the backing's size when none is given.
        try Harness.run([Harness.rawmount, "create", "-f", "qcow2", "-b", "ours0.qcow2", "-F", "qcow2", s.path("child.qcow2")])
        let child = try json(try Harness.run(["qemu-img", "info", "--output=json", s.path("child.qcow2")]).out) as? [String: Any]
        XCTAssertEqual(child?["backing-filename"] as? String, "ours0.qcow2")
        XCTAssertEqual(child?["backing-filename-format"] as? String, "qcow2")
        XCTAssertEqual(child?["virtual-size"] as? Int, 1536 << 20)
        // Refused as qemu-img refuses them: a fraction without a unit, an unknown option.
        for (args, mention) in [(["x1.qcow2", "1.5"], "1.5"), (["-o", "bogus=1", "x2.qcow2", "1M"], "bogus"), (["x3.qcow2", "12Q"], "12Q")] {
            let bad = try Harness.run([Harness.rawmount, "create", "-f", "qcow2"] + args.map { $0.hasSuffix(".qcow2") ? s.path($0) : $0 }, check: false)
            XCTAssertNotEqual(bad.status, 0, "\(args)")
            XCTAssertTrue(bad.err.contains(mention), bad.err)
        }
        XCTAssertEqual(try Harness.run([Harness.rawmount, "create", "-f", "raw", s.path("kib.raw"), "64KiB"]).status, 0)
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: s.path("kib.raw"))[.size] as? Int, 65536)
    }

    /// As qemu-img: `create` over an existing image replaces it (unless a mount holds it, or
    /// it is the new image's own backing file), and `info` on an image whose backing file is
    /// missing still describes it and names the missing file.
    func testCreateReplacesAnImageAndInfoNamesAMissingBackingFile() throws {
        let s = try Scratch()
        let img = s.path("again.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", img])
        let r = try Harness.run([Harness.rawmount, "create", "-f", "qcow2", img, "16M"])
        XCTAssertTrue(r.out.hasPrefix("Formatting"), r.out)
        let info = try json(try Harness.run(["qemu-img", "info", "--output=json", img]).out) as? [String: Any]
        XCTAssertEqual(info?["virtual-size"] as? Int, 16 << 20)
        let map = try Harness.run(["qemu-img", "map", "--output=json", img]).out
        XCTAssertFalse(map.contains("\"data\": true"), "the old image's data is still there: \(map)")
        // Held by a writable mount: refused before anything is printed, the image kept.
        try s.mount(img)
        let busy = try Harness.run([Harness.rawmount, "create", "-f", "qcow2", img, "4M"], check: false)
        XCTAssertEqual(busy.status, 1)
        XCTAssertEqual(busy.out, "")
        XCTAssertTrue(busy.err.contains("in use"), busy.err)
        try s.unmount()
        XCTAssertEqual((try json(try Harness.run(["qemu-img", "info", "--output=json", img]).out) as? [String: Any])?["virtual-size"] as? Int, 16 << 20)
        let own = try Harness.run([Harness.rawmount, "create", "-f", "qcow2", "-b", img, "-F", "qcow2", img], check: false)
        XCTAssertEqual(own.status, 1)
        XCTAssertTrue(FileManager.default.fileExists(atPath: img), "create removed its own backing file")

        let base = s.path("gone.qcow2"), child = s.path("child.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", child])
        try FileManager.default.removeItem(atPath: base)
        XCTAssertEqual(try Harness.run(["qemu-img", "info", child], check: false).status, 0)
        let ours = try Harness.run([Harness.rawmount, "info", child], check: false)
        XCTAssertEqual(ours.status, 0, ours.err)
        XCTAssertTrue(ours.out.contains("virtual size: 8.0 MiB"), ours.out)
        XCTAssertTrue(ours.out.contains("compression type: zlib"), "qemu-img's name for it: \(ours.out)")
        XCTAssertTrue(ours.out.contains("gone.qcow2") && ours.err.contains("not found"), ours.out + ours.err)
        let j = try json(try Harness.run([Harness.rawmount, "info", "--json", child]).out) as? [String: Any]
        XCTAssertEqual(j?["backing-filename"] as? String, "gone.qcow2")
        XCTAssertEqual((j?["missing-backing-files"] as? [String])?.count, 1)
        // A mount still needs the backing file.
        try s.assertMountRefused(["-r", child], mentions: ["gone.qcow2", "not found"], "missing backing file")
    }

    /// VMDK `extents` in info's format-specific data, field for field as qemu-img lists them
    /// (type as the descriptor names it or empty, grain size, compression), for every subformat.
    func testVMDKExtentsListedAsQemuImgListsThem() throws {
        let s = try Scratch()
        for sub in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "streamOptimized"] {
            let img = "x-\(sub).vmdk"
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sub)", s.path(img), "64M"])
            func extents(_ tool: [String]) throws -> [String] {
                let j = try json(try Harness.run(["env", "-C", s.dir] + tool + [img]).out) as? [String: Any]
                let data = (j?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
                return (data?["extents"] as? [[String: Any]] ?? []).map { e in e.keys.sorted().map { "\($0)=\(e[$0]!)" }.joined(separator: " ") }
            }
            let theirs = try extents(["qemu-img", "info", "--output=json"])
            XCTAssertFalse(theirs.isEmpty, sub)
            XCTAssertEqual(try extents([Harness.rawmount, "info", "--json"]), theirs, sub)
        }
    }

    /// Keys qemu-img info prints mean the same, with the same types, in rawmount's JSON.
    func testInfoJsonSpeaksQemuImgsKeys() throws {
        let s = try Scratch()
        let base = s.path("base.qcow2"), top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"])
        try Harness.run(["qemu-io", "-c", "write -P 1 0 1M", base])
        try Harness.run(["qemu-img", "snapshot", "-c", "first", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", base, "-F", "qcow2", top])
        try Harness.run(["qemu-img", "bitmap", "--add", top, "b0"])
        // Asked with a name relative to the folder (as people type it): qemu-img writes no "./".
        try Harness.run(["qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top])
        let ours = try json(try Harness.run(["env", "-C", s.dir, Harness.rawmount, "info", "--output=json", "--backing-chain", "top.qcow2"]).out) as? [[String: Any]] ?? []
        let theirs = try json(try Harness.run(["env", "-C", s.dir, "qemu-img", "info", "--output=json", "--backing-chain", "top.qcow2"]).out) as? [[String: Any]] ?? []
        XCTAssertEqual(ours.count, 2)
        XCTAssertEqual(ours.count, theirs.count)
        for (o, t) in zip(ours, theirs) {
            for key in ["filename", "format", "virtual-size", "cluster-size", "actual-size", "dirty-flag", "backing-filename",
                        "full-backing-filename", "backing-filename-format"] {
                XCTAssertEqual(o[key].map { "\($0)" }, t[key].map { "\($0)" }, "\(t["filename"] ?? ""): \(key)")
            }
            let od = (o["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
            let td = (t["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
            for key in ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"] {
                XCTAssertEqual(od[key].map { "\($0)" }, td[key].map { "\($0)" }, "format-specific \(key)")
            }
            let ob = (od["bitmaps"] as? [[String: Any]])?.map { "\($0["name"]!) \($0["granularity"]!) \($0["flags"]!)" }
            let tb = (td["bitmaps"] as? [[String: Any]])?.map { "\($0["name"]!) \($0["granularity"]!) \($0["flags"]!)" }
            XCTAssertEqual(ob, tb, "bitmaps")
            let os = (o["snapshots"] as? [[String: Any]])?.map { "\($0["id"]!) \($0["name"]!) \($0["vm-state-size"]!) \($0["date-sec"]!)" }
            let ts = (t["snapshots"] as? [[String: Any]])?.map { "\($0["id"]!) \($0["name"]!) \($0["vm-state-size"]!) \($0["date-sec"]!)" }
            XCTAssertEqual(os, ts, "snapshots")
        }
        XCTAssertNotNil(ours.first?["allocated-bytes"], "rawmount's own keys stay")

        // check --output=json, also after the image was damaged into leaking a cluster.
        let clean = try json(try Harness.run([Harness.rawmount, "check", "--output=json", top]).out) as? [String: Any]
        let qclean = try json(try Harness.run(["qemu-img", "check", "--output=json", top]).out) as? [String: Any]
        for key in ["filename", "format", "check-errors", "total-clusters", "allocated-clusters", "fragmented-clusters", "image-end-offset", "leaks", "corruptions"] {
            XCTAssertEqual(clean?[key].map { "\($0)" }, qclean?[key].map { "\($0)" }, "check \(key)")
        }
        // Fragmentation counted as qemu-img counts it: out-of-order clusters, a compressed
        // one, a zero-allocated one, and an L2 table copied for a snapshot.
        let frag = s.path("frag.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", frag, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -c 0 64k", "-c", "write 1M 128k", "-c", "write 64k 64k", "-c", "write -z 3M 64k",
                         "-c", "write 8M 64k", "-c", "write 5M 64k", frag])
        try Harness.run(["qemu-img", "snapshot", "-c", "s", frag])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write 1M 4k", frag])
        let ourFrag = try json(try Harness.run([Harness.rawmount, "check", "--output=json", frag]).out) as? [String: Any]
        let theirFrag = try json(try Harness.run(["qemu-img", "check", "--output=json", frag]).out) as? [String: Any]
        for key in ["allocated-clusters", "fragmented-clusters", "compressed-clusters", "total-clusters", "image-end-offset"] {
            XCTAssertEqual(ourFrag?[key].map { "\($0)" }, theirFrag?[key].map { "\($0)" }, "check \(key) of a fragmented image")
        }
        XCTAssertGreaterThan(theirFrag?["fragmented-clusters"] as? Int ?? 0, 1)
        let leaky = s.path("leaky.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", leaky, "8M"])
        try Harness.run(["qemu-io", "-c", "write 0 64k", leaky])
        // Drop the L1 entry: its L2 table and data cluster are now referenced by refcounts only.
        let l1 = try Files.read(leaky).subdata(in: 40..<48).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        try Files.pwrite(leaky, [UInt8](repeating: 0, count: 8), at: l1)
        let leaks = try Harness.run([Harness.rawmount, "check", "--output=json", leaky], check: false)
        let qleaks = try Harness.run(["qemu-img", "check", "--output=json", leaky], check: false)
        XCTAssertEqual(leaks.status, qleaks.status)
        let lj = try json(leaks.out) as? [String: Any], qj = try json(qleaks.out) as? [String: Any]
        XCTAssertEqual(lj?["leaks"] as? Int, qj?["leaks"] as? Int)
        XCTAssertEqual(lj?["leaks"] as? Int, 2)
    }

    /// `map` against `qemu-img map` for chains, zero clusters, compressed clusters and the
    /// formats qemu-img also reads; for Bochs (which QEMU cannot read) against the data itself.
    func testMapAgreesWithQemuImgMap() throws {
        let s = try Scratch()
        let base = s.path("m1.qcow2"), top = s.path("m2.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"])
        try Harness.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 1M", "-c", "write -P 3 6M 64k", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
        try Harness.run(["qemu-io", "-c", "write -P 2 512k 1M", "-c", "write -z 6M 64k", top])
        var images = [top, base]
        for (fmt, opts) in [("qed", [String]()), ("vdi", []), ("vmdk", []), ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"])] {
            let img = s.path("m\(images.count).\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt] + opts + [img, "8M"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 5 1M 1M", "-c", "write -P 6 5M 4k", img])
            images.append(img)
        }
        let compressed = s.path("c.qcow2")
        try Harness.run(["qemu-img", "convert", "-c", "-O", "qcow2", base, compressed])
        images.append(compressed)
        for img in images {
            let ours = try json(try Harness.run([Harness.rawmount, "map", "--output=json", img]).out) as? [[String: Any]]
            let theirs = try json(try Harness.run(["qemu-img", "map", "--output=json", img]).out) as? [[String: Any]]
            XCTAssertNotNil(ours)
            let show = { (rows: [[String: Any]]?) in (rows ?? []).map { r in
                ["start", "length", "depth", "present", "zero", "data", "offset"].map { "\(r[$0] ?? "-")" }.joined(separator: " ") } }
            XCTAssertEqual(show(ours), show(theirs), img)
        }
        // Human form: the data ranges with their host offsets.
        let human = try Harness.run([Harness.rawmount, "map", top]).out.split(separator: "\n").map { $0.split(separator: " ").prefix(3) }
        let qhuman = try Harness.run(["qemu-img", "map", top]).out.split(separator: "\n").map { $0.split(separator: " ").prefix(3) }
        XCTAssertEqual(human, qhuman)
        // --start-offset/--max-length window the same map.
        let window = try json(try Harness.run([Harness.rawmount, "map", "--output=json", "--start-offset", "1M", "--max-length", "2M", top]).out) as? [[String: Any]] ?? []
        XCTAssertEqual(window.first?["start"] as? Int, 1 << 20)
        XCTAssertEqual(window.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }, 2 << 20)

        // Bochs sparse: every non-zero 4 KiB block of the source lies in a data range.
        try Harness.tool("bximage")
        let src = s.path("src.raw")
        try Harness.run(["truncate", "-s", "10M", src])
        try Harness.run(["mkfs.ext2", "-q", "-F", src])
        let bochs = s.path("disk.img")
        try Harness.run(["bximage", "-func=convert", "-imgmode=sparse", "-q", src, bochs])
        let rows = try json(try Harness.run([Harness.rawmount, "map", "--output=json", bochs]).out) as? [[String: Any]] ?? []
        let data = rows.filter { $0["data"] as? Bool == true }.map { ($0["start"] as! Int, $0["length"] as! Int) }
        XCTAssertFalse(data.isEmpty)
        XCTAssertEqual(rows.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }, 10 << 20)
        let bytes = try Files.read(src)
        for block in stride(from: 0, to: bytes.count, by: 4096) where bytes[block..<block + 4096].contains(where: { $0 != 0 }) {
            XCTAssertTrue(data.contains { $0.0 <= block && block + 4096 <= $0.0 + $0.1 }, "data at \(block) is not in a data range")
        }
        XCTAssertLessThan(data.reduce(0) { $0 + $1.1 }, 10 << 20, "the unallocated pages are not data")
    }

    /// `convert` from any readable format (Bochs sparse, a qcow2 chain) to every writable one,
    /// sparse, with progress on a terminal only; checked by qemu-img compare and check.
    func testConvertWritesEveryFormatSparselyAndShowsProgressOnATerminal() throws {
        try Harness.tool("bximage")
        try Harness.tool("script")
        let s = try Scratch()
        let src = s.path("src.raw")
        try Harness.run(["truncate", "-s", "64M", src])
        try Harness.run(["mkfs.ext4", "-q", "-F", src])
        try Harness.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 40M 3M", src])
        let bochs = s.path("disk.img")
        try Harness.run(["bximage", "-func=convert", "-imgmode=sparse", "-q", src, bochs])
        // A Bochs sparse image to qcow2, with a progress bar on a terminal (script gives a pty).
        let out = s.path("out.qcow2")
        let tty = try Harness.run(["script", "-qec", "\(Harness.rawmount) convert -p -O qcow2 \(bochs) \(out)", "/dev/null"])
        XCTAssertTrue(tty.out.contains("100.0%") && tty.out.contains("/s)"), "no progress on the terminal: \(tty.out)")
        try Harness.run(["qemu-img", "check", out])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out]).status, 0)
        // -p into a pipe or a log: whole lines, no terminal redraws.
        let piped = try Harness.run([Harness.rawmount, "convert", "-p", "-O", "qed", bochs, s.path("piped.qed")])
        XCTAssertTrue(piped.err.contains("100.0% (") && piped.err.hasSuffix(")\n"), piped.err)
        XCTAssertFalse(piped.err.contains("\r") || piped.err.contains("\u{1B}"), piped.err)

        // A chain to every writable format; not a terminal: nothing on stderr.
        let top = s.path("top.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", out, "-F", "qcow2", top])
        try Harness.run(["qemu-io", "-c", "write -P 0x77 1M 512k", "-c", "write -z 40M 1M", top])
        let used = try json(try Harness.run(["qemu-img", "map", "--output=json", top]).out) as? [[String: Any]] ?? []
        let sourceData = used.filter { $0["data"] as? Bool == true }.reduce(0) { $0 + ($1["length"] as! Int) }
        for (fmt, opts) in [("raw", [String]()), ("qcow2", []), ("qed", []), ("vdi", []), ("vmdk", []), ("vmdk", ["-o", "subformat=monolithicFlat"])] {
            let dst = s.path("copy-\(fmt)\(opts.isEmpty ? "" : "-flat").\(fmt)")
            let r = try Harness.run([Harness.rawmount, "convert", "-p", "-O", fmt] + opts + ["--json", top, dst])
            XCTAssertEqual(r.err, "", "\(fmt): stderr is not a terminal")
            let summary = try json(r.out) as? [String: Any]
            let written = summary?["bytes-written"] as? Int ?? -1
            XCTAssertGreaterThan(written, 0)
            XCTAssertLessThanOrEqual(written, sourceData, "\(fmt): wrote more than the data")
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-F", fmt, top, dst]).status, 0, fmt)
            if fmt != "raw" { try Harness.run(["qemu-img", "check", "-f", fmt, dst]) }
        }
        // qemu-img replaces an existing destination, and so do we; never the source.
        let again = try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", top, s.path("copy-qcow2.qcow2")])
        XCTAssertEqual(again.status, 0)
        let onto = try Harness.run([Harness.rawmount, "convert", "-O", "qcow2", top, out], check: false)
        XCTAssertNotEqual(onto.status, 0)
        XCTAssertTrue(onto.err.contains("backing file of the source"), onto.err)
        try Harness.run(["qemu-img", "check", out])
        // What rawmount cannot write is refused before anything is created.
        let stream = try Harness.run([Harness.rawmount, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "-B", "base.qcow2", top, s.path("s.vmdk")], check: false)
        XCTAssertNotEqual(stream.status, 0)
        XCTAssertTrue(stream.err.contains("streamOptimized"), stream.err)
        XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("s.vmdk")))
    }
}
