import Foundation
import XCTest
import TestSupport

/// What a killed server leaves behind, and what the next writable open makes of it (issue 11).
final class CrashConsistencyTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func python(_ script: String, _ args: [String]) throws {
        try Harness.run(["python3", "-c", script] + args)
    }

    /// (blocks_allocated, file size) of a VDI.
    func vdiState(_ path: String) throws -> (count: UInt32, size: Int) {
        let d = try Files.read(path)
        var count: UInt32 = 0
        for k in 0..<4 { count |= UInt32(d[0x184 + k]) << (8 * UInt32(k)) }
        return (count, d.count)
    }

    /// `qemu-io` writes at `offset`, then the image reads back `expect` (the oracle, not us).
    func assertQemuWriteKeeps(_ img: String, writeAt offset: String, expect: Data, in s: Scratch,
                              file: StaticString = #filePath, line: UInt = #line) throws {
        let w = try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x22 \(offset) 4k", img], file: file, line: line)
        XCTAssertFalse(w.out.contains("also used") || w.err.contains("also used"), w.out + w.err, file: file, line: line)
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertEqual(check.status, 0, check.out + check.err, file: file, line: line)
        XCTAssertTrue(try s.qemuRaw(img).prefix(expect.count) == expect, "data under the QEMU write changed", file: file, line: line)
    }

    /// A map entry whose block blocks_allocated does not count (the old flush order, killed
    /// between map and header): the writable open recounts, so QEMU's next block is a new one.
    func testVDICountBelowTheMapIsRepairedOnOpen() throws {
        let s = try Scratch()
        let img = s.path("a.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "8M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 4k", img])
        try Files.pwrite(img, le(0, 4), at: 0x184)
        XCTAssertNotEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 0, "the crafted state is what QEMU calls corrupt")
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("repaired") && r.err.contains("blocks_allocated 0 -> 1"), r.err)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try vdiState(img).count, 1)
        try assertQemuWriteKeeps(img, writeAt: "5M", expect: Data(repeating: 0x11, count: 4096), in: s)
    }

    /// 100 blocks written but never mapped (killed before any flush): the file is cut back
    /// on the next writable open, so new blocks go where QEMU would put them.
    func testVDIOrphanedBlocksAreReleased() throws {
        let s = try Scratch()
        let img = s.path("b.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "64M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 4k", img])
        let clean = try vdiState(img)
        try python("import sys; f=open(sys.argv[1],'ab'); f.write(b'\\x99'*(100<<20))", [img])
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 0, "QEMU does not see orphans")
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("100 MiB of orphaned blocks released"), r.err)
        // Every block of the disk can be written now (before, the orphans ran it out of indices).
        let src = s.path("src")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=64", "status=none"])
        try Harness.run(["dd", "if=\(src)", "of=\(s.mnt)/b.raw", "bs=1M", "conv=notrunc,fsync", "status=none"])
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try vdiState(img).count, 64)
        XCTAssertEqual(try vdiState(img).size, clean.size + (63 << 20))
        try Harness.run(["qemu-img", "check", img])
        XCTAssertTrue(try s.qemuRaw(img) == (try Files.read(src)))
    }

    /// Mapped indices with a gap (map sectors persisted out of order): the block above the
    /// gap moves down, so indices are dense again and QEMU's rule holds.
    func testVDIGapInTheIndicesIsCompacted() throws {
        let s = try Scratch()
        let img = s.path("c.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "8M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x33 1M 1M", "-c", "write -P 0x55 2M 1M", img])
        // Guest block 1 (index 1) loses its map entry: index 1 is an orphan in the middle.
        let d = try Files.read(img)
        var bmap = 0
        for k in 0..<4 { bmap |= Int(d[0x154 + k]) << (8 * k) }
        try Files.pwrite(img, [0xFF, 0xFF, 0xFF, 0xFF], at: UInt64(bmap + 4))
        let expected = try s.qemuRaw(img)
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("1 blocks moved"), r.err)
        XCTAssertTrue(try Files.read(s.mnt + "/c.raw") == expected)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try vdiState(img).count, 2)
        XCTAssertTrue(try s.qemuRaw(img) == expected)
        var after = expected
        after.replaceSubrange((5 << 20)..<((5 << 20) + 4096), with: Data(repeating: 0x22, count: 4096))
        try assertQemuWriteKeeps(img, writeAt: "5M", expect: after, in: s)
    }

    /// Killed between the header and the map write of a flush: the header already counts the
    /// new block, so QEMU's next write takes another one and nothing is overwritten.
    func testVDIKillBetweenHeaderAndMapLeavesNoBlockToReuse() throws {
        let s = try Scratch()
        let img = s.path("d.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "8M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 4k", img])
        try s.mount(img, environment: ["RAWMOUNT_TEST_VDI_PAUSE_AFTER_HEADER_US": "30000000"])
        let raw = s.mnt + "/d.raw"
        guard let pid = try s.serverPid() else { XCTFail("no pid file for \(s.mnt)"); return }
        // A new block at 2M, then fsync: the flush writes the header and pauses before the map.
        let writer = try s.start(["dd", "if=/dev/zero", "of=\(raw)", "bs=4k", "count=1", "seek=512", "conv=notrunc,fsync", "status=none"])
        var waited = 0
        while try vdiState(img).count != 2 && waited < 200 { usleep(50_000); waited += 1 }
        XCTAssertEqual(try vdiState(img).count, 2, "the header was not written first")
        try s.killServer(pid, waiting: writer)
        // QEMU's next block is index 2: block 0 (guest 0) is not touched.
        let w = try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x22 5M 4k", img])
        XCTAssertFalse(w.out.contains("also used"), w.out)
        XCTAssertTrue(try s.qemuRaw(img).prefix(4096) == Data(repeating: 0x11, count: 4096), "fsync'd block 0 was overwritten")
        // And the next writable open makes the count agree with the map for qemu-img check.
        try s.mount(img)
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// VHDX, killed between a durable log entry and the table sectors it carries: the image
    /// holds a log to replay (QEMU refuses to read it as it is), and rawmount's replay on the
    /// next writable open gives the same disk as QEMU's replay, with the block whose data
    /// was durable before the log.
    func testVHDXKillBetweenLogAndTableIsReplayedAsQemuReplaysIt() throws {
        let s = try Scratch()
        let img = s.path("k.vhdx")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "16M"])
        try s.mount(img, environment: ["RAWMOUNT_TEST_VHDX_PAUSE_AFTER_LOG_US": "30000000"])
        let raw = s.mnt + "/k.raw"
        guard let pid = try s.serverPid() else { XCTFail("no pid file for \(s.mnt)"); return }
        let writer = try s.start(["dd", "if=/dev/urandom", "of=\(raw)", "bs=64k", "count=4", "seek=80", "conv=notrunc,fsync", "status=none"])
        // The log entry is durable once the headers carry its GUID and qemu-img sees a log.
        var waited = 0
        while !(try Harness.run(["qemu-img", "info", "-U", img], check: false).err.contains("replayed")) && waited < 200 { usleep(50_000); waited += 1 }
        try s.killServer(pid, waiting: writer)
        XCTAssertTrue(try Harness.run(["qemu-img", "info", img], check: false).err.contains("replayed"), "no log was left to replay")
        let theirs = s.path("theirs.vhdx")
        try FileManager.default.copyItem(atPath: img, toPath: theirs)
        try Harness.run(["qemu-img", "check", "-r", "all", theirs], check: false)
        try s.mount(img)  // replays
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        let cmp = try Harness.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", img, theirs], check: false)
        XCTAssertEqual(cmp.status, 0, cmp.out + cmp.err)
        // The block the log linked holds the written data (it was durable before the log).
        let data = try s.qemuRaw(img).subdata(in: 80 * 65536 ..< 84 * 65536)
        XCTAssertNotEqual(data, Data(count: data.count), "the replayed table does not name the written block")
    }

    /// qcow2, killed exactly between the two writes of an ordering (the test pause holds the
    /// server there): a new L2 table is durable but its L1 entry is not, and an unlink is
    /// durable but the refcount drop is not. Both must leave leaked clusters only (exit 3):
    /// the other order would leave an L1 naming a table that is not there, or a cluster
    /// referenced with refcount 0 (exit 2).
    func testQCOW2KillInsideEachOrderingLeavesOnlyLeaks() throws {
        for step in ["new L2 table, L1 not yet", "unlink, refcount drop not yet"] {
            let s = try Scratch()
            let img = s.path("o.qcow2")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", img])
            try s.mount(img, environment: ["RAWMOUNT_TEST_QCOW2_PAUSE_US": "30000000"])
            guard let pid = try serverPid(s) else { XCTFail("no pid"); return }
            let raw = s.mnt + "/o.raw"
            let writer = try s.start(step.hasPrefix("new")
                // 600 MiB lies under an L1 entry with no L2 table yet.
                ? ["dd", "if=/dev/zero", "of=\(raw)", "bs=64k", "count=1", "seek=9600", "conv=notrunc,fsync", "status=none"]
                : ["python3", "-c", "import ctypes, os, sys; f = os.open(sys.argv[1], os.O_RDWR); "
                   + "assert ctypes.CDLL(None).fallocate(f, 3, ctypes.c_long(0), ctypes.c_long(1 << 20)) == 0; os.fsync(f)", raw])
            usleep(2_000_000)  // the flush reaches the pause well within this
            XCTAssertTrue(writer.isRunning, "\(step): the fsync returned before the pause")
            try s.killServer(pid, waiting: writer)
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(check.status, 3, "\(step): \(check.out)\(check.err)")
            let data = try s.qemuRaw(img)
            let first = data.prefix(1 << 20)
            XCTAssertTrue(first == Data(repeating: 0x11, count: 1 << 20) || first == Data(count: 1 << 20), "\(step): the first MiB is torn")
            if step.hasPrefix("unlink") { XCTAssertEqual(first, Data(count: 1 << 20), "the durable unlink was lost") }
        }
    }

    /// The server's pid, from its pid file (root mounts).
    func serverPid(_ s: Scratch) throws -> pid_t? { try s.serverPid() }

    /// 64 x 1 MiB and 64 x 4 KiB writes to fresh areas, no fsync, then idle past the stated
    /// bound (PeriodicFlush: 1 s) and kill -9: every write is in the image (0 of 128 were).
    func testAcknowledgedWritesReachTheImageWithinTheBound() throws {
        for (format, create) in [("qed", ["-f", "qed"]), ("vdi", ["-f", "vdi"]), ("vmdk", ["-f", "vmdk"])] {
            let s = try Scratch()
            let img = s.path("w.\(format)")
            try Harness.run(["qemu-img", "create", "-q"] + create + [img, "160M"])
            try s.mount(img)
            let raw = s.mnt + "/w.raw"
            var expected = Data(count: 160 << 20)
            let fd = open(raw, O_WRONLY)
            var rng = SeededRandom(seed: 11)
            let base = rng.bytes(1 << 20)
            for i in 0..<64 {
                // Each write its own bytes: the base pattern with the write's number in front.
                var big = base
                big.replaceSubrange(0..<8, with: le(UInt64(i) + 1, 8))
                let small = Array(big[4096..<8192].reversed())
                let bigAt = i * (2 << 20), smallAt = (128 << 20) + i * (1 << 19) + 512
                XCTAssertEqual(big.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(bigAt)) }, 1 << 20)
                XCTAssertEqual(small.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(smallAt)) }, 4096)
                expected.replaceSubrange(bigAt..<(bigAt + big.count), with: big)
                expected.replaceSubrange(smallAt..<(smallAt + small.count), with: small)
            }
            sleep(3)
            guard let pid = try serverPid(s) else { XCTFail("\(format): no pid"); continue }
            try s.killServer(pid)
            close(fd)
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertTrue(check.status == 0 || check.status == 3, "\(format): \(check.out)\(check.err)")
            let got = try s.qemuRaw(img)
            var lost = 0
            for i in 0..<64 {
                for at in [i * (2 << 20), (128 << 20) + i * (1 << 19) + 512] where got[at..<(at + 4096)] != expected[at..<(at + 4096)] { lost += 1 }
            }
            XCTAssertEqual(lost, 0, "\(format): \(lost) of 128 acknowledged writes lost after idle + kill -9")
        }
    }

    /// `--read-only --force-share` next to a live writer: clusters it allocates after the
    /// mount show up (they read as zeros forever, from tables cached at mount time).
    func testForceShareFollowsALiveWriter() throws {
        for format in ["qcow2", "qed", "vmdk", "vdi"] {
            let s = try Scratch()
            let img = s.path("live.\(format)")
            try Harness.run(["qemu-img", "create", "-q", "-f", format, img, "64M"])
            try Harness.run(["qemu-io", "-f", format, "-c", "write -P 0x11 0 64k", img])
            try s.mount(img, options: ["-r", "-U"])
            let raw = s.mnt + "/live.raw"
            XCTAssertEqual(try Files.read(raw).prefix(65536), Data(repeating: 0x11, count: 65536))
            // New clusters (and, for qcow2/QED/VMDK, a new L2 / grain table) after the mount.
            try Harness.run(["qemu-io", "-f", format, "-c", "write -P 0x22 0 4k", "-c", "write -P 0x33 40M 64k", img])
            usleep(1_500_000)
            let now = try Files.read(raw)
            XCTAssertEqual(now.prefix(4096), Data(repeating: 0x22, count: 4096), "\(format): overwrite not seen")
            XCTAssertEqual(now.subdata(in: (40 << 20)..<((40 << 20) + 65536)), Data(repeating: 0x33, count: 65536), "\(format): new cluster not seen")
            try s.unmount()
        }
    }

    /// A killed QED writer leaves clusters appended but never linked: the writable open that
    /// repairs NEED_CHECK cuts them off and says how many.
    func testQEDRepairReleasesTheUnlinkedTail() throws {
        let s = try Scratch()
        let img = s.path("t.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "64M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 64k", "-c", "abort", img], check: false)
        let linkedSize = try Files.read(img).count
        try python("import sys; f=open(sys.argv[1],'ab'); f.write(b'\\x99'*(100*65536))", [img])
        try Files.pwrite(img, [0x02], at: 16)  // NEED_CHECK, as the crash leaves it
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("100 unreferenced clusters at the end of the file released"), r.err)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try Files.read(img).count, linkedSize)
        try Harness.run(["qemu-img", "check", img])
        XCTAssertEqual(try s.qemuRaw(img).prefix(65536), Data(repeating: 0x11, count: 65536))
    }

    /// A few rounds of scripts/crash.py (`make crash` runs long campaigns): kill -9 under a
    /// writer with fsync bookkeeping, then qemu-img check, the fsync'd data, a repairing
    /// remount and a QEMU write that must disturb nothing.
    func testKillNineRoundsLoseNoFsyncedWrite() throws {
        let script = Harness.packageRoot.appendingPathComponent("scripts/crash.py").path
        let r = try Harness.run(["env", "RAWMOUNT=\(Harness.rawmount)", "python3", script, "--rounds", "2", "--seed", "\(getpid())", "--json"])
        guard let json = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any],
              let table = json["table"] as? [String: [String: Int]] else { XCTFail("no table: \(r.out)\(r.err)"); return }
        XCTAssertEqual(Set(table.keys), ["raw", "qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx"])
        for (format, row) in table {
            XCTAssertEqual(row["rounds"], 2, format)
            XCTAssertEqual(row["corrupt_after_repair"], 0, "\(format): \(row) (seed \(json["seed"] ?? ""))")
            XCTAssertEqual(row["fsynced_lost"], 0, "\(format): \(row) (seed \(json["seed"] ?? ""))")
            XCTAssertEqual(row["disturbed_by_qemu"], 0, "\(format): \(row) (seed \(json["seed"] ?? ""))")
            XCTAssertEqual(row["snapshot_changed"], 0, "\(format): \(row) (seed \(json["seed"] ?? ""))")
            XCTAssertEqual(row["bitmaps_trusted"], 0, "\(format): a bitmap lost its in-use flag after kill -9: \(row) (seed \(json["seed"] ?? ""))")
        }
        print("crash rounds: \(r.out)")
    }
}
