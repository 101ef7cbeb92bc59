import Foundation
import XCTest
import TestSupport

/// `rawmount snapshot` against `qemu-img snapshot`: snapshots taken by one are read, applied
/// and deleted by the other; every step checks clean with qemu-img check, each snapshot reads
/// as the disk did when it was taken (qemu-img convert -l), and the list is qemu-img's.
final class SnapshotTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    private func check(_ image: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Harness.run(["qemu-img", "check", image], check: false)
        XCTAssertEqual(r.status, 0, "\(what): \(r.out.prefix(600))\(r.err.prefix(600))", file: file, line: line)
    }

    private func same(_ image: String, snapshot: String? = nil, as raw: String, _ what: String,
                      file: StaticString = #filePath, line: UInt = #line) throws {
        let s = try Scratch()
        let out = s.path("now.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw"] + (snapshot.map { ["-l", $0] } ?? []) + [image, out])
        XCTAssertEqual(try Files.sha(out), try Files.sha(raw), what, file: file, line: line)
    }

    func testSnapshotVerbsEndAsQemuImgsAndEachToolReadsTheOthers() throws {
        let s = try Scratch()
        let variants: [(String, [String])] = [
            ("64k", []), ("4k clusters, compat 0.10", ["-o", "cluster_size=4k,compat=0.10"]),
            ("extended L2", ["-o", "extended_l2=on,cluster_size=128k"]), ("64-bit refcounts, 512-byte clusters", ["-o", "refcount_bits=64,cluster_size=512"]),
        ]
        for (label, options) in variants {
            let img = s.path("d.qcow2"), states = (0..<3).map { s.path("state\($0).raw") }
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2"] + options + [img, "24M"])
            try Harness.run(["qemu-io", "-c", "write -P 1 0 3M", "-c", "write -c -P 2 8M 256k", "-c", "write -z 12M 64k", img])
            try Harness.run(["qemu-img", "convert", "-O", "raw", img, states[0]])
            // Ours takes the first, qemu-img the second.
            try Harness.run([Harness.rawmount, "snapshot", "-c", "first", img])
            try check(img, "\(label): after rawmount snapshot -c")
            try Harness.run(["qemu-io", "-c", "write -P 3 1M 2M", "-c", "write -P 4 8M 64k", "-c", "write -P 5 20M 1M", img])
            try Harness.run(["qemu-img", "convert", "-O", "raw", img, states[1]])
            try Harness.run(["qemu-img", "snapshot", "-c", "second", img])
            try Harness.run(["qemu-io", "-c", "write -P 6 0 512k", "-c", "discard 20M 1M", img])
            try Harness.run(["qemu-img", "convert", "-O", "raw", img, states[2]])
            try check(img, "\(label): after writes over two snapshots")
            try same(img, snapshot: "first", as: states[0], "\(label): our snapshot reads as the disk was")
            try same(img, snapshot: "second", as: states[1], "\(label): qemu-img's snapshot")
            // The list is qemu-img's, line for line, and info's JSON has the same snapshots.
            XCTAssertEqual(try Harness.run([Harness.rawmount, "snapshot", "-l", img]).out, try Harness.run(["qemu-img", "snapshot", "-l", img]).out, label)
            let snapshots = { (tool: [String]) throws -> NSArray? in
                let json = try JSONSerialization.jsonObject(with: Data(try Harness.run(tool + ["info", "--output=json", img]).out.utf8)) as? NSDictionary
                return json?["snapshots"] as? NSArray
            }
            XCTAssertEqual(try snapshots([Harness.rawmount]), try snapshots(["qemu-img"]), label)
            // Ours applies qemu-img's snapshot and then our own; qemu-img applies ours.
            try Harness.run([Harness.rawmount, "snapshot", "-a", "second", img])
            try check(img, "\(label): after rawmount snapshot -a second")
            try same(img, as: states[1], "\(label): the disk after -a second")
            try Harness.run([Harness.rawmount, "snapshot", "-a", "1", img])  // by ID
            try check(img, "\(label): after rawmount snapshot -a 1")
            try same(img, as: states[0], "\(label): the disk after -a 1")
            // Writing after a revert copies shared clusters: the snapshots stay as they were.
            try s.mount(img)
            let fh = try FileHandle(forUpdating: URL(fileURLWithPath: s.mnt + "/d.raw"))
            try fh.seek(toOffset: 1 << 20)
            fh.write(Data(repeating: 0x77, count: 100_000))
            try fh.synchronize()
            try fh.close()
            try s.unmount()
            try check(img, "\(label): after writing through the mount")
            try same(img, snapshot: "first", as: states[0], "\(label): snapshot 1 after writes")
            try same(img, snapshot: "second", as: states[1], "\(label): snapshot 2 after writes")
            try Harness.run(["qemu-img", "snapshot", "-a", "first", img])
            try same(img, as: states[0], "\(label): qemu-img applies our snapshot")
            // Deleting: ours deletes qemu-img's by name, then ours by ID; each checks clean.
            try Harness.run([Harness.rawmount, "snapshot", "-d", "second", img])
            try check(img, "\(label): after rawmount snapshot -d second")
            try same(img, snapshot: "first", as: states[0], "\(label): the other snapshot after a delete")
            try Harness.run([Harness.rawmount, "snapshot", "-d", "1", img])
            try check(img, "\(label): after deleting every snapshot")
            try same(img, as: states[0], "\(label): the disk after deleting every snapshot")
            XCTAssertEqual(try Harness.run(["qemu-img", "snapshot", "-l", img]).out, "", label)
            // Nothing leaked: every cluster the snapshots held is free again (a full check is clean above;
            // a fresh copy of the disk is no smaller than what is allocated).
            let alloc = try Harness.run(["qemu-img", "check", img]).out
            XCTAssertFalse(alloc.contains("leaked"), "\(label): \(alloc)")
            try FileManager.default.removeItem(atPath: img)
        }
    }

    func testSnapshotErrorsLocksAndOtherFormats() throws {
        let s = try Scratch()
        let img = s.path("e.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        XCTAssertEqual(try Harness.run([Harness.rawmount, "snapshot", "-l", img]).out, "", "no snapshots: nothing listed, as qemu-img")
        try Harness.run([Harness.rawmount, "snapshot", "-c", "a", img])
        for (args, wanted) in [(["-a", "nope"], "could not apply snapshot 'nope'"), (["-d", "nope"], "could not delete snapshot 'nope'")] {
            let r = try Harness.run([Harness.rawmount, "snapshot"] + args + [img], check: false)
            XCTAssertEqual(r.status, 1, r.err)
            XCTAssertTrue(r.err.contains(wanted) && r.err.contains("1 (a)"), r.err)
        }
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "snapshot", "-c", "x", "-d", "a", img], check: false).status, 0, "two actions")
        // A name that is a terminal escape is shown escaped.
        try Harness.run([Harness.rawmount, "snapshot", "-c", "evil\u{1B}]0;x\u{7}", img])
        XCTAssertFalse(try Harness.run([Harness.rawmount, "snapshot", "-l", img]).out.contains("\u{1B}"))
        // A mounted image is refused for changes; -l -U lists it anyway.
        try s.mount(img)
        let busy = try Harness.run([Harness.rawmount, "snapshot", "-c", "b", img], check: false)
        XCTAssertNotEqual(busy.status, 0)
        XCTAssertTrue(busy.err.contains("-U") || busy.err.contains("in use") || busy.err.contains("lock"), busy.err)
        XCTAssertTrue(try Harness.run([Harness.rawmount, "snapshot", "-l", "-U", img]).out.contains(" a "))
        try s.unmount()
        try check(img, "after the refused changes")
        // Other formats: nothing to list; changing fails, as qemu-img's does.
        for fmt in ["vmdk", "qed", "vdi"] {
            let other = s.path("o.\(fmt)")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, other, "8M"])
            XCTAssertEqual(try Harness.run([Harness.rawmount, "snapshot", "-l", other]).out, try Harness.run(["qemu-img", "snapshot", "-l", other]).out, fmt)
            for action in [["-c", "x"], ["-a", "x"], ["-d", "x"]] {
                let v = try Harness.run([Harness.rawmount, "snapshot"] + action + [other], check: false)
                XCTAssertEqual(v.status, try Harness.run(["qemu-img", "snapshot"] + action + [other], check: false).status, "\(fmt) \(action)")
                XCTAssertTrue(v.err.contains("only qcow2"), v.err)
            }
        }
        // An L1 naming one L2 table twice (QEMU never writes that) is refused, nothing changed:
        // the walks would otherwise cost entries times tables.
        let aliased = s.path("aliased.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", aliased, "1M"])
        try Harness.run(["qemu-io", "-c", "write -P 1 0 512", "-c", "write -P 2 32k 512", aliased])
        var bytes = try Data(contentsOf: URL(fileURLWithPath: aliased))
        let l1 = Int(bytes[40 ..< 48].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        bytes.replaceSubrange(l1 + 8 ..< l1 + 16, with: bytes[l1 ..< l1 + 8])
        try bytes.write(to: URL(fileURLWithPath: aliased))
        let sum = try Files.sha(aliased)
        let refused = try Harness.run([Harness.rawmount, "snapshot", "-c", "x", aliased], check: false)
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.err.contains("both name the L2 table"), refused.err)
        XCTAssertEqual(try Files.sha(aliased), sum, "a refused snapshot changed the image")
        // A snapshot of another disk size: applying it brings its size back, as qemu-img does.
        let sized = s.path("sized.qcow2"), before = s.path("sized.raw")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", sized, "1M"])
        try Harness.run(["qemu-io", "-c", "write -P 9 0 1M", sized])
        try Harness.run(["qemu-img", "convert", "-O", "raw", sized, before])
        try Harness.run([Harness.rawmount, "snapshot", "-c", "small", sized])
        try Harness.run([Harness.rawmount, "resize", sized, "64M"])  // moves the L1 table (512-byte clusters)
        try Harness.run(["qemu-io", "-c", "write -P 8 60M 1M", sized])
        try check(sized, "after growing past the L1 table with a snapshot")
        try Harness.run([Harness.rawmount, "snapshot", "-a", "small", sized])
        try check(sized, "after applying a smaller snapshot")
        XCTAssertTrue(try Harness.run(["qemu-img", "info", sized]).out.contains("(1048576 bytes)"))
        try same(sized, as: before, "the smaller snapshot's disk")
    }

    /// A kill -9 before each host write and sync of snapshot -c, -a and -d: the image checks
    /// clean but for leaked clusters and for COPIED flags cleared where a refcount is 1 (no
    /// order avoids a moment where flags and refcounts disagree; this is the safe way round:
    /// a writer copies such a cluster instead of overwriting a shared one, and check -r all
    /// sets them), and the disk and each snapshot read as before or after.
    func testAKillAtEveryWriteOfASnapshotEditLeavesAConsistentImage() throws {
        let s = try Scratch()
        let make = { (name: String) throws -> String in
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "8M"])
            try Harness.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 2M 64k", img])
            try Harness.run(["qemu-img", "snapshot", "-c", "old", img])
            try Harness.run(["qemu-io", "-c", "write -P 3 512k 1M", img])
            return img
        }
        let model = try make("model.qcow2")
        let active = s.path("active.raw"), old = s.path("old.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", model, active])
        try Harness.run(["qemu-img", "convert", "-O", "raw", "-l", "old", model, old])
        for (action, args) in [("create", ["-c", "new"]), ("apply", ["-a", "old"]), ("delete", ["-d", "old"])] {
            let count = try make("count-\(action).qcow2"), report = s.path("ops-\(action)")
            try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:0:eio", "RAWMOUNT_TEST_FAULT_REPORT=\(report)", Harness.rawmount, "snapshot"] + args + [count])
            let total = try Harness.writesAndSyncs(inReport: report)
            XCTAssertGreaterThan(total, 4, action)
            // Killed at sampled writes and syncs, and (every third) failed there with EIO instead:
            // the command then stops with an error and leaves the same guarantees.
            for n in stride(from: 1, through: total, by: max(1, total / 25)) {
                let img = try make("k.qcow2")
                let fault = n % 3 == 0 ? "eio" : "kill"
                let r = try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:\(n):\(fault)", Harness.rawmount, "snapshot"] + args + [img], check: false)
                XCTAssertNotEqual(r.status, 0, "\(action) op \(n) was not reached")
                if fault == "eio" { XCTAssertTrue(r.err.contains("could not \(action) snapshot"), r.err) }
                let c = try Harness.run(["qemu-img", "check", img], check: false)
                let errors = c.out.split(separator: "\n").filter { $0.hasPrefix("ERROR") }
                let safe = errors.allSatisfy { line in
                    guard line.hasPrefix("ERROR OFLAG_COPIED"), line.hasSuffix(" refcount=1"),
                          let value = line.split(separator: " ").first(where: { $0.hasPrefix("l1_entry=") || $0.hasPrefix("l2_entry=") }) else { return false }
                    return UInt64(value.split(separator: "=")[1], radix: 16).map { $0 >> 63 == 0 } ?? false
                }
                XCTAssertTrue(c.status == 0 || c.status == 3 || (c.status == 2 && safe), "\(action) op \(n): check exit \(c.status) \(c.out.prefix(400))")
                if c.status == 2 {
                    try Harness.run(["qemu-img", "check", "-q", "-r", "all", img], check: false)
                    XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", img], check: false).status, 0, "\(action) op \(n): check -r all")
                }
                let disk = s.path("k.raw")
                try Harness.run(["qemu-img", "convert", "-O", "raw", img, disk])
                let d = try Files.sha(disk), before = try Files.sha(active), reverted = try Files.sha(old)
                XCTAssertTrue(d == before || (action == "apply" && d == reverted), "\(action) op \(n): the disk is neither before nor after")
                let list = try Harness.run(["qemu-img", "snapshot", "-l", img]).out
                if list.contains(" old ") { try same(img, snapshot: "old", as: old, "\(action) op \(n): the old snapshot") }
                try FileManager.default.removeItem(atPath: img)
            }
        }
    }

    /// Damaged copies of an image with two snapshots (bytes changed at random, mostly in its
    /// metadata): every snapshot verb, resize, measure and compressed convert ends with exit 0
    /// or 1 in bounded time, never a crash or a hang.
    func testDamagedImagesNeverCrashTheVerbs() throws {
        let s = try Scratch()
        let base = s.path("base.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "4M"])
        try Harness.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 2M 64k", base])
        try Harness.run(["qemu-img", "snapshot", "-c", "s1", base])
        try Harness.run(["qemu-io", "-c", "write -P 3 512k 256k", base])
        try Harness.run(["qemu-img", "snapshot", "-c", "s2", base])
        let original = try Data(contentsOf: URL(fileURLWithPath: base))
        var rng = SeededRandom(seed: 29)
        let work = s.path("w.qcow2")
        let verbs: [[String]] = [["snapshot", "-c", "x", work], ["snapshot", "-a", "s1", work], ["snapshot", "-d", "s1", work],
                                 ["snapshot", "-l", work], ["resize", "--shrink", work, "1M"], ["resize", work, "64M"],
                                 ["measure", "-O", "qcow2", work], ["convert", "-c", "-O", "qcow2", work, s.path("o.qcow2")]]
        var outcomes: [Int32: Int] = [:]
        for _ in 0..<30 {
            var damaged = original
            for _ in 0 ..< 1 + Int(rng.next() % 8) {
                let at = rng.next() % 4 < 3 ? Int(rng.next() % (64 << 10)) : Int(rng.next() % UInt64(damaged.count))
                damaged[at] = UInt8(truncatingIfNeeded: rng.next())
            }
            for verb in verbs {
                try damaged.write(to: URL(fileURLWithPath: work))
                let r = try Harness.run(["timeout", "30", Harness.rawmount] + verb, check: false)
                XCTAssertTrue(r.status == 0 || r.status == 1, "\(verb): exit \(r.status) \(r.err.suffix(300))")
                outcomes[r.status, default: 0] += 1
            }
        }
        XCTAssertGreaterThan(outcomes[1] ?? 0, 0, "no damage was noticed: \(outcomes)")
    }
}
