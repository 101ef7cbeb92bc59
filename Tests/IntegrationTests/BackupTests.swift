import Foundation
import XCTest
import TestSupport

/// `rawmount backup`: writes through a real mount between backups, each point restored
/// (and read by qemu-img straight from the chain) equal to a copy taken at that moment;
/// a kill at every write of a run, after which the next run still restores every point.
final class BackupTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    private func backup(_ image: String, _ dir: String, _ extra: [String] = [], env: [String] = []) throws -> CommandResult {
        try Harness.run(["env"] + env + [Harness.rawmount, "backup"] + extra + [image, dir], check: false)
    }

    /// The newest backup file of the chain in `dir`.
    private func newest(_ dir: String) throws -> String {
        let names = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".qcow2") && !$0.hasPrefix(".") }
        // <stem>.<kind>.<YYYYMMDDTHHMMSS>.<mmm>Z.qcow2: the time is the third and fourth parts.
        func time(_ n: String) -> String { n.split(separator: ".").dropFirst(2).prefix(2).joined(separator: ".") }
        return dir + "/" + names.sorted { time($0) < time($1) }.last!
    }

    /// Changes through the mount: data, a hole punched, zeros written, a write past 4 KiB
    /// alignment; a different mix each round.
    private func change(_ s: Scratch, _ image: String, round: Int, _ rng: inout SeededRandom) throws {
        try s.mount(image)
        let raw = s.mnt + "/disk.raw"
        for _ in 0..<(3 + round % 4) {
            let at = rng.next() % (60 << 20)
            try Files.pwrite(raw, rng.bytes(1 + Int(rng.next() % 200_000)), at: at)
        }
        let fd = open(raw, O_RDWR)
        let hole = off_t(rng.next() % (60 << 20)) & ~0xFFFF
        XCTAssertEqual(fallocate(fd, 0x02 | 0x01, hole, 1 << 20), 0)  // PUNCH_HOLE | KEEP_SIZE
        close(fd)
        try Files.pwrite(raw, [UInt8](repeating: 0, count: 300_000), at: rng.next() % (60 << 20))
        try s.unmount()
    }

    private func snapshot(_ image: String, _ to: String) throws {
        try Harness.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, to])
    }

    private func assertBitmapConsistent(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let info = try Harness.run(["qemu-img", "info", "--output=json", image]).out
        XCTAssertTrue(info.contains("\"name\": \"rawmount-backup\""), info, file: file, line: line)
        XCTAssertFalse(info.contains("in-use"), info, file: file, line: line)
    }

    func testEveryPointOfATenIncrementChainRestoresExactly() throws {
        let s = try Scratch()
        let image = s.path("disk.qcow2"), dir = s.path("backups")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 8M", "-c", "write -P 9 30M 2M", image])
        var rng = SeededRandom(seed: 17)
        var points: [(file: String, copy: String)] = []
        for round in 0...10 {
            if round > 0 { try change(s, image, round: round, &rng) }
            let copy = s.path("at-\(round).raw")
            try snapshot(image, copy)
            if round > 0 {
                // map --bitmap and --dry-run see the changes before the run copies them.
                let map = try Harness.run([Harness.rawmount, "map", "--output=json", "--bitmap", "rawmount-backup", image]).out
                XCTAssertTrue(map.contains("\"dirty\": true"), map)
                let dry = try backup(image, dir, ["--dry-run", "--json"])
                XCTAssertEqual(dry.status, 0, dry.err)
                XCTAssertTrue(dry.out.contains("\"kind\" : \"incremental\""), dry.out)
            }
            let r = try backup(image, dir, ["--json"] + (round == 5 ? ["--hash"] : []))
            XCTAssertEqual(r.status, 0, r.err)
            XCTAssertTrue(r.out.contains(round == 0 ? "\"kind\" : \"full\"" : "\"kind\" : \"incremental\""), r.out)
            try assertBitmapConsistent(image)
            let file = try newest(dir)
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", file], check: false).status, 0, file)
            points.append((file, copy))
        }
        // An incremental holds only what changed: far less than the disk.
        let incSizes = try points.dropFirst().map { try Files.size($0.file) }
        XCTAssertLessThan(incSizes.max()!, 8 << 20, "\(incSizes)")
        // qemu-img reads each point through its backing chain, equal to the copy taken then.
        for (i, p) in points.enumerated() {
            let c = try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", p.file, p.copy], check: false)
            XCTAssertEqual(c.status, 0, "point \(i): \(c.out)")
        }
        // rawmount's restore of a middle point, as raw and as qcow2.
        let out = s.path("restored.raw")
        try Harness.run([Harness.rawmount, "backup", "--restore", points[6].file, out])
        XCTAssertEqual(try Files.sha(out), try Files.sha(points[6].copy))
        try Harness.run([Harness.rawmount, "backup", "--restore", "-O", "qcow2", points[10].file, s.path("restored.qcow2")])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", s.path("restored.qcow2"), points[10].copy], check: false).status, 0)
        // verify: the whole chain; a point with its recorded hash; a damaged file.
        let v = try Harness.run([Harness.rawmount, "backup", "--verify", dir], check: false)
        XCTAssertEqual(v.status, 0, v.out + v.err)
        XCTAssertTrue(v.out.contains("chain sound (11 file(s))"), v.out)
        let v5 = try Harness.run([Harness.rawmount, "backup", "--verify", points[5].file], check: false)
        XCTAssertEqual(v5.status, 0, v5.out + v5.err)
        XCTAssertTrue(v5.out.contains("SHA-256 matches"), v5.out)
        try FileManager.default.removeItem(atPath: points[3].file)
        try FileManager.default.copyItem(atPath: points[2].file, toPath: points[3].file)
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "backup", "--verify", dir], check: false).status, 0)
    }

    /// A kill -9 before each host write and sync of a full and of an incremental run; the
    /// next run (no kill) completes, and every point restores exactly.
    func testAKillAtEveryWriteOfARunLosesNoPoint() throws {
        let s = try Scratch()
        let template = s.path("template.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", template, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 2M", "-c", "write -P 9 9M 1M", template])
        var rng = SeededRandom(seed: 23)
        for kind in ["full", "incremental"] {
            // Count the operations of an undisturbed run.
            let image = s.path("count.qcow2"), dir = s.path("count-dir")
            try prepare(template, image, dir, incremental: kind == "incremental", &rng, s)
            let report = s.path("ops-\(kind)")
            XCTAssertEqual(try backup(image, dir, env: ["RAWMOUNT_TEST_FAULT=write,sync:0:eio", "RAWMOUNT_TEST_FAULT_REPORT=\(report)"]).status, 0)
            let total = try Harness.writesAndSyncs(inReport: report)
            XCTAssertGreaterThan(total, 5, (try? String(contentsOfFile: report, encoding: .utf8)) ?? report)
            for n in 1...total {
                let image = s.path("k.qcow2"), dir = s.path("k-dir")
                try? FileManager.default.removeItem(atPath: dir)
                let copies = try prepare(template, image, dir, incremental: kind == "incremental", &rng, s)
                let killed = try backup(image, dir, env: ["RAWMOUNT_TEST_FAULT=write,sync:\(n):kill"])
                XCTAssertNotEqual(killed.status, 0, "\(kind) op \(n) was not reached")
                let again = try backup(image, dir)
                XCTAssertEqual(again.status, 0, "\(kind) op \(n): \(again.err)")
                // The chain: its earlier points, and the newest one equal to the disk now.
                let final = try newest(dir)
                XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", final, image], check: false).status, 0,
                               "\(kind) op \(n): newest point")
                for (file, copy) in copies {
                    XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", file, copy], check: false).status, 0,
                                   "\(kind) op \(n): \(file)")
                }
                XCTAssertEqual(try Harness.run([Harness.rawmount, "backup", "--verify", dir], check: false).status, 0, "\(kind) op \(n)")
                try assertBitmapConsistentOrFullNext(image, dir)
            }
        }
    }

    /// A fresh image from the template, and (incremental) one backup of it and a change
    /// through qemu-io after it: the points made so far with copies of their disks.
    @discardableResult
    private func prepare(_ template: String, _ image: String, _ dir: String, incremental: Bool,
                         _ rng: inout SeededRandom, _ s: Scratch) throws -> [(String, String)] {
        try? FileManager.default.removeItem(atPath: image)
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: template, toPath: image)
        guard incremental else { return [] }
        XCTAssertEqual(try backup(image, dir).status, 0)
        let copy = image + ".point0.raw"
        try snapshot(image, copy)
        let point0 = try newest(dir)
        let at: UInt64 = 5 << 20 | 4096  // the same change every time: the runs' operations line up
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 \(at / 512 * 512) 64k", "-c", "write -z 9M 64k", image])
        return [(point0, copy)]
    }

    /// After the runs: the bitmap is consistent, or (a kill while it was reset) the next run
    /// says it takes a full backup rather than trusting it.
    private func assertBitmapConsistentOrFullNext(_ image: String, _ dir: String) throws {
        let info = try Harness.run(["qemu-img", "info", "--output=json", image]).out
        if info.contains("in-use") {
            let dry = try backup(image, dir, ["--dry-run"])
            XCTAssertTrue(dry.out.contains("full backup") && dry.out.contains("inconsistent"), dry.out)
        }
    }

    func testOtherFormatsAreToldWhy() throws {
        let s = try Scratch()
        let vmdk = s.path("disk.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", vmdk, "16M"])
        try FileManager.default.createDirectory(atPath: s.path("b"), withIntermediateDirectories: true)
        let r = try backup(vmdk, s.path("b"))
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.err.contains("only qcow2") && r.err.contains("--overlay"), r.err)
        let m = try Harness.run([Harness.rawmount, "map", "--bitmap", "x", vmdk], check: false)
        XCTAssertNotEqual(m.status, 0)
        XCTAssertTrue(m.err.contains("only qcow2"), m.err)
        // A mounted image is in use: the backup refuses rather than racing its writer.
        let q = s.path("busy.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "16M"])
        try s.mount(q)
        let busy = try backup(q, s.path("b"))
        XCTAssertEqual(busy.status, 2)
        XCTAssertTrue(busy.err.contains("busy.qcow2"), busy.err)
        let busyDry = try backup(q, s.path("b"), ["--dry-run"])
        XCTAssertEqual(busyDry.status, 2, "a dry run beside a writer: \(busyDry.out)")
        try s.unmount()
        // A read-only mount: the dry run (it changes nothing) runs beside it, the backup
        // itself (it resets the bitmap) does not.
        try s.mount(q, options: ["-r"])
        let dry = try backup(q, s.path("b"), ["--dry-run", "--json"])
        XCTAssertEqual(dry.status, 0, dry.err)
        XCTAssertTrue(dry.out.contains("\"kind\" : \"full\""), dry.out)
        let refused = try backup(q, s.path("b"))
        XCTAssertEqual(refused.status, 2)
        XCTAssertTrue(refused.err.contains("busy.qcow2") && refused.err.contains("does not allow writing"), refused.err)
        // backup has no -U: the refusal says to free the image, not to force-share it.
        XCTAssertTrue(refused.err.contains("unmount it") && !refused.err.contains("-U"), refused.err)
        try s.unmount()
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: s.path("b")).filter { !$0.hasPrefix(".") }, [])
    }
}
