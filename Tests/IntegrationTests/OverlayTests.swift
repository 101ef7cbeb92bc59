import Foundation
import XCTest

/// `mount --overlay OVERLAY.qcow2 EVIDENCE`: the examiner's job. Writes (e2fsck -y, debugfs)
/// land in a qcow2 over the evidence; the evidence's bytes and mtime never change, also
/// after kill -9; QEMU sees the chain and the overlay checks clean.
final class OverlayTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
        try Harness.tool("mkfs.ext4")
        try Harness.tool("fls")
    }

    /// A 64 MiB disk with one ext4 partition from sector 2048 holding `evidence/notes.txt`.
    func evidenceDisk(_ s: Scratch) throws -> String {
        let raw = s.path("disk.raw")
        try Harness.run(["truncate", "-s", "64M", raw])
        try Harness.run(["sfdisk", "-q", raw], input: Data("label: dos\nstart=2048, type=83\n".utf8))
        let tree = s.path("tree")
        try FileManager.default.createDirectory(atPath: tree + "/evidence", withIntermediateDirectories: true)
        try Data("the suspect's notes\n".utf8).write(to: URL(fileURLWithPath: tree + "/evidence/notes.txt"))
        let fs = s.path("fs.img")
        try Harness.run(["mkfs.ext4", "-q", "-d", tree, fs, "40M"])
        // Seized while mounted: a file written and synced, then the file system stopped
        // without a clean unmount, so its journal needs replaying.
        let live = s.path("live")
        try FileManager.default.createDirectory(atPath: live, withIntermediateDirectories: true)
        try Harness.run(["mount", "-o", "loop", fs, live])
        try Data("written just before seizure\n".utf8).write(to: URL(fileURLWithPath: live + "/evidence/late.txt"))
        try Harness.run(["sync", "-f", live + "/evidence/late.txt"])
        try s.shutDownFileSystem(live)
        try Harness.run(["umount", live])
        try Harness.run(["dd", "if=\(fs)", "of=\(raw)", "bs=512", "seek=2048", "conv=notrunc", "status=none"])
        return raw
    }

    func fingerprint(_ path: String) throws -> (String, Int, Int) {
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        return (try Files.sha(path), st.st_mtim.tv_sec, st.st_mtim.tv_nsec)
    }

    func testExaminerWritesLandInTheOverlayAndTheEvidenceNeverChanges() throws {
        try Harness.tool("debugfs")
        let s = try Scratch()
        let evidence = s.path("seized.vmdk")
        try Harness.run(["qemu-img", "convert", "-O", "vmdk", try evidenceDisk(s), evidence])
        chmod(evidence, 0o444)
        let before = try fingerprint(evidence)
        let acquired = String(try Harness.run([Harness.rawmount, "hash", evidence]).out.split(separator: " ").last!.dropLast())
        let overlay = s.path("work.qcow2")
        let out = try Harness.run([Harness.rawmount, "mount", "--overlay", overlay, evidence, s.mnt])
        s.registerMediaMount(s.mnt)  // unmounted by the scratch if the test stops early
        XCTAssertTrue(out.err.contains("created overlay"), out.err)
        // `list` says where the writes go (not a plain "rw" over the evidence).
        let listed = try Harness.run([Harness.rawmount, "list"]).out
        XCTAssertTrue(listed.contains("overlay (writes to \(overlay))"), listed)
        let rows = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "list", "--json"]).out.utf8)) as? [[String: Any]]
        XCTAssertEqual(rows?.first { $0["mountpoint"] as? String == s.mnt }?["overlay"] as? String, overlay)
        let p1 = s.mnt + "/seized-p1.raw"
        let listing = try Harness.run(["fls", "-r", p1]).out
        let inode = try XCTUnwrap(listing.split(separator: "\n").first { $0.hasSuffix("notes.txt") }?
            .split(separator: " ").last?.split(separator: ":").first, listing)
        XCTAssertEqual(try Harness.run(["icat", p1, String(inode)]).out, "the suspect's notes\n")
        // e2fsck replays the journal (exit 1: the file system was changed) into the overlay.
        let fsck = try Harness.run(["e2fsck", "-fy", p1], check: false)
        XCTAssertTrue(fsck.status == 0 || fsck.status == 1, fsck.out + fsck.err)
        XCTAssertTrue((fsck.out + fsck.err).contains("recovering journal"), "no journal to replay: \(fsck.out)\(fsck.err)")
        try Harness.run(["e2fsck", "-fn", p1])
        try Harness.run(["debugfs", "-w", "-R", "mkdir examiner-was-here", p1])
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertTrue(try fingerprint(evidence) == before, "the evidence changed")
        try Harness.run(["qemu-img", "check", overlay])
        let chain = try Harness.run(["qemu-img", "info", "--backing-chain", overlay]).out
        XCTAssertTrue(chain.contains("backing file: \(evidence)") && chain.contains("file format: vmdk"), chain)
        // QEMU's view of the overlay has the new directory at the partition's offset.
        let converted = s.path("work.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", overlay, converted])
        XCTAssertTrue(try Harness.run(["fls", "-o", "2048", converted]).out.contains("examiner-was-here"))

        // The same overlay again: the same state. Then kill -9 in the middle of writing.
        try Harness.run([Harness.rawmount, "mount", "--overlay", overlay, evidence, s.mnt])
        XCTAssertTrue(try Harness.run(["fls", p1]).out.contains("examiner-was-here"), "a second mount lost the overlay's state")
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/usr/bin/dd")
        writer.arguments = ["if=/dev/urandom", "of=\(s.mnt)/seized.raw", "bs=64k", "count=400", "conv=notrunc", "status=none"]
        try writer.run()
        usleep(200_000)
        let pid = try XCTUnwrap(try s.serverPid())
        try s.killServer(pid, waiting: writer)
        XCTAssertTrue(try fingerprint(evidence) == before, "the evidence changed after kill -9")
        let check = try Harness.run(["qemu-img", "check", overlay], check: false)
        XCTAssertTrue(check.status == 0 || check.status == 3, "overlay corrupt after kill -9 (not just leaks): \(check.out)")
        // The acquisition hash still verifies.
        let verify = try Harness.run([Harness.rawmount, "hash", "--verify", acquired, evidence], check: false)
        XCTAssertEqual(verify.status, 0, verify.err)
    }

    /// An overlay made for one evidence file is refused for another, naming both; nothing is
    /// mounted and neither file changes. A fine-grained overlay takes its cluster size.
    func testOverlayOfAnotherEvidenceIsRefused() throws {
        let s = try Scratch()
        let a = s.path("a.raw"), b = s.path("b.raw")
        try Harness.run(["truncate", "-s", "16M", a])
        try Harness.run(["truncate", "-s", "16M", b])
        let overlay = s.path("ov.qcow2")
        try Harness.run([Harness.rawmount, "mount", "--overlay", overlay, "--overlay-cluster-size", "4K", a, s.mnt])
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertTrue(try Harness.run(["qemu-img", "info", overlay]).out.contains("cluster_size: 4096"))
        let ovBefore = try Files.sha(overlay)
        try s.assertMountRefused(["--overlay", overlay, b], mentions: [overlay, a, b, "not onto"])
        XCTAssertEqual(try Files.sha(overlay), ovBefore)
        // The evidence itself named as its own overlay.
        try s.assertMountRefused(["--overlay", a, a], mentions: ["evidence image itself"])
    }
}
